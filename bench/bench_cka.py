"""CKA throughput: full-data linear CKA against the streaming minibatch (debiased) CKA.

Both sides compare the same two representations of the same images, with the widths of two
``resnet18-shapes`` layers flattened (``layer1.0``: 64 x 16 x 16, ``layer4.1``: 512 x 4 x 4).
The baseline is :func:`surgery.cka` on all images at once (its Gram matrix is ``n x n``); the
contenders stream :class:`surgery.MinibatchCKA` over batches of a few sizes (a ``b x b`` Gram
per batch). Calls alternate round-robin, so a change in machine load hits every row; the table
gives the median images per second and the ratio to the baseline, measured in this one run,
plus the size of the largest Gram matrix each holds.

Usage:
    python bench/bench_cka.py [--images 1024] [--batch 16 64 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery import MinibatchCKA, cka  # noqa: E402
from surgery.devices import faithful, resolve_device  # noqa: E402
from timing import measure, synchronizer  # noqa: E402

WIDTHS = {"layer1.0": 64 * 16 * 16, "layer4.1": 512 * 4 * 4}


def features(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two related ReLU representations of ``n`` images (float32, as hooks capture them)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 64, generator=g)
    x = torch.relu(latent @ torch.randn(64, WIDTHS["layer1.0"], generator=g))
    y = torch.relu(torch.tanh(latent) @ torch.randn(64, WIDTHS["layer4.1"], generator=g)
                   + 0.5 * torch.randn(n, WIDTHS["layer4.1"], generator=g))
    return x, y


def minibatch(x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    acc = MinibatchCKA()
    for xb, yb in zip(x.split(batch), y.split(batch)):
        acc.update(xb, yb)
    return float(acc.compute())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", help="where the features live: cpu, cuda, cuda:N or auto "
                                          "(env SURGERY_DEVICE; default auto)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    faithful(device)
    x, y = (t.to(device) for t in features(args.images))
    n = args.images

    functions = {"full linear CKA": lambda: cka(x, y, estimator="biased"), "full debiased CKA": lambda: cka(x, y)}
    functions.update({f"minibatch CKA, batch {b}": (lambda b=b: minibatch(x, y, b)) for b in args.batch})
    values = {name: fn() for name, fn in functions.items()}
    medians = measure(functions, args.repeats, sync=synchronizer(device))
    baseline = medians["full linear CKA"]

    print(f"torch {torch.__version__}, {device}, {args.threads} threads, {n} images, features {WIDTHS['layer1.0']} vs "
          f"{WIDTHS['layer4.1']}, median of {args.repeats}\n")
    print("| estimator | images/s | ratio to full linear CKA | largest Gram (KiB) | CKA |")
    print("|---|---|---|---|---|")
    for name, seconds in medians.items():
        side = n if name.startswith("full") else min(int(name.rsplit(" ", 1)[1]), n)
        gram_kib = side * side * 8 / 2**10  # float64
        print(f"| {name} | {n / seconds:,.0f} | {baseline / seconds:.2f}x | {gram_kib:,.0f} | {values[name]:.4f} |")


if __name__ == "__main__":
    main()
