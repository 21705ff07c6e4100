"""The Space's Explain on a GPU against the CPU: latency per family, and how far the answers move.

For each family, the same variants are loaded twice, into a CPU :class:`space.session.Session`
and into one on the GPU, and the Explain request (fused GradCAM + gradient saliency of every
variant, then the comparisons against FP32; no HTTP, no PNG encoding) is timed on both,
interleaved, medians of ``--repeats``. Then both answer the same image and the table gives the
largest absolute difference of logits, probabilities, GradCAM and saliency maps (maps in [0, 1])
per variant, and whether the top-1 class agrees. Analysis runs in float32 with TF32 off
(:func:`surgery.devices.faithful`); ``--tf32`` adds the same measurements with TF32 allowed.

Families without a local zoo use stand-in variants built from untrained weights (see
``bench/bench_app.py``): an INT8 or sparse ResNet costs the same to run whatever its weights.
On a machine without an NVIDIA GPU it says so and exits with status 0.

Usage:
    python bench/bench_gpu.py [--zoo zoo/resnet18-shapes] [--families resnet18-shapes resnet50-imagenet]
                              [--repeats 7] [--device cuda:0] [--tf32]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_app import stand_in_zoo  # noqa: E402
from space.examples import PHOTOS, photo_path  # noqa: E402
from space.session import Session  # noqa: E402
from space.zoo_source import FamilyZoo, LoadedVariant, SourceConfig, resolve  # noqa: E402
from surgery import compression  # noqa: E402
from surgery.devices import describe, faithful, resolve_device  # noqa: E402
from surgery.images import load_image  # noqa: E402
from surgery.registry import get_family  # noqa: E402
from timing import measure, synchronizer  # noqa: E402


def copy_to(zoo: FamilyZoo) -> FamilyZoo:
    """The same variants as independent copies (each Session moves its own models)."""
    return FamilyZoo(zoo.family, {name: LoadedVariant(v.name, copy.deepcopy(v.model), v.config, v.location)
                                  for name, v in zoo.variants.items()}, zoo.origin)


def max_logit_difference(cpu: FamilyZoo, gpu: FamilyZoo, name: str, x: torch.Tensor) -> float:
    with torch.no_grad():
        a = cpu.variants[name].model(x[None])
        b = gpu.variants[name].model(x[None].to(next(gpu.variants[name].model.parameters()).device)).cpu()
    return float((a - b).abs().max())


def differences(cpu: Session, gpu: Session, family: str, x: torch.Tensor, label: str) -> None:
    a, b = cpu.explain(family, x, "gradient"), gpu.explain(family, x, "gradient")
    for name in a.variants:  # the family's default columns
        u, v = a.variants[name], b.variants[name]
        logits = max_logit_difference(cpu.zoo(family), gpu.zoo(family), name, x)
        print(f"| {family} | {name} | {label} | {logits:.2e} | {(u.probabilities - v.probabilities).abs().max():.2e} | "
              f"{(u.gradcam - v.gradcam).abs().max():.2e} | {(u.saliency - v.saliency).abs().max():.2e} | "
              f"{'yes' if u.prediction == v.prediction else 'NO'} |", flush=True)


def latency(cpu: Session, gpu: Session, family: str, x: torch.Tensor, repeats: int,
            device: torch.device) -> dict[str, float]:
    calls = {"cpu": lambda: cpu.explain(family, x, "gradient"), "gpu": lambda: gpu.explain(family, x, "gradient")}
    return {k: 1e3 * s for k, s in measure(calls, repeats, warmup=2, sync=synchronizer(device)).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, help="resnet18-shapes zoo (fp32/, int8/, sparse90/); else stand-ins")
    parser.add_argument("--families", nargs="+",
                        default=["resnet18-shapes", "resnet18-cifar10", "resnet50-imagenet", "mobilenetv2-imagenet"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the CPU side")
    parser.add_argument("--device", default="cuda", help="the GPU: cuda or cuda:N")
    parser.add_argument("--tf32", action="store_true", help="also measure with TF32 allowed in cuDNN and matmuls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        print(f"no CUDA GPU on this machine (PyTorch {torch.__version__}, built with CUDA {torch.version.cuda}): "
              "nothing to measure")
        return 0
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    faithful(device)
    photo = photo_path(PHOTOS[1])  # chelsea
    print(f"GPU {describe(device)}; CPU side {args.threads} threads; torch {torch.__version__}; "
          f"image {photo.name}; gradient saliency; median of {args.repeats}\n")
    zoos = {name: (resolve(SourceConfig(families=(name,), zoo=args.zoo, source="local"))[name]
                   if args.zoo and name == "resnet18-shapes" else stand_in_zoo(name)) for name in args.families}
    cache = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    sessions = {name: (Session({name: zoo}, cache / "cpu", device="cpu"),
                       Session({name: copy_to(zoo)}, cache / "gpu", device=device)) for name, zoo in zoos.items()}
    print(f"NNCF quantizers on the GPU: {compression.quantizer_backend(device)}\n")
    modes = [("float32", False)] + ([("TF32", True)] if args.tf32 else [])
    rows = []
    print("| family | variant | GPU math | max abs logit diff | prob diff | GradCAM diff | saliency diff | same top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for label, tf32 in modes:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        for name, (cpu, gpu) in sessions.items():
            x = load_image(photo, get_family(name).input_size)
            differences(cpu, gpu, name, x, label)
            rows.append((name, label, latency(cpu, gpu, name, x, args.repeats, device)))
    print("\n| family | GPU math | Explain on CPU (ms) | Explain on GPU (ms) | CPU / GPU |")
    print("|---|---|---|---|---|")
    for name, label, ms in rows:
        print(f"| {name} | {label} | {ms['cpu']:.1f} | {ms['gpu']:.1f} | {ms['cpu'] / ms['gpu']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
