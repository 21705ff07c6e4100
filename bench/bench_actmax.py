"""Activation maximisation: time per step and per channel as the batch of channels grows.

All channels of a call are optimised together as one batch, so the cost per channel should fall
as the batch grows until the machine is saturated. Each configuration runs ``--steps`` steps
``--repeats`` times (interleaved); the table gives medians and, per channel, the ratio to a batch
of one measured in the same run.

Usage:
    python bench/bench_actmax.py --zoo zoo/resnet18-shapes [--channels 1 4 16] [--steps 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery import activation_maximization, load_variant  # noqa: E402
from surgery.architectures import architecture_of  # noqa: E402
from surgery.devices import faithful, resolve_device  # noqa: E402
from timing import CLOCKS, measure, synchronizer  # noqa: E402

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True, help="zoo directory with fp32/int8/sparse90")
    parser.add_argument("--variants", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--layer", help="module name (default: each model's GradCAM layer, from its architecture)")
    parser.add_argument("--channels", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--gradients", nargs="+", default=["ste", "true"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: process CPU time, steadier than wall time on a machine shared with other jobs")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (env SURGERY_DEVICE; default auto)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    device = resolve_device(args.device)
    faithful(device)

    print(f"torch {torch.__version__}, {device}, {args.threads} threads, {args.clock} clock, "
          f"{args.steps} steps, median of {args.repeats}\n")
    print("| variant | layer | gradient | channels | s per step | ms per step per channel | per-channel ratio to 1 |")
    print("|---|---|---|---|---|---|---|")
    for variant in args.variants:
        model, config = load_variant(args.zoo / variant, device=device)
        size = config["architecture"]["input_size"]
        layer = args.layer or architecture_of(model).gradcam_layer
        gradients = args.gradients if variant == "int8" else ["true"]
        for gradient in gradients:
            runs = {n: (lambda n=n: activation_maximization(model, layer, list(range(n)), steps=args.steps,
                                                            size=size, gradient=gradient,
                                                            progress=lambda step, total: None))
                    for n in args.channels}
            per_step = {n: s / args.steps for n, s in measure(runs, args.repeats, clock, warmup=0, sync=synchronizer(device)).items()}
            base = per_step[args.channels[0]] / args.channels[0]
            for n in args.channels:
                per_channel = per_step[n] / n
                print(f"| {variant} | {layer} | {gradient} | {n} | {per_step[n]:.3f} | {per_channel * 1e3:.1f} | "
                      f"{per_channel / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
