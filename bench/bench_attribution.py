"""Fused GradCAM + gradient saliency (``surgery.explain``) against separate Captum calls.

The baseline is what one would write with Captum: ``LayerGradCam`` at the same layer (plus the
same bilinear upsampling) and ``Saliency``, each with its own forward and backward. Two baselines:

- *maps*: Captum is handed the target classes for free (computed outside the timing);
- *same outputs*: what ``explain`` returns, the prediction (logits, probabilities) and both maps
  of the predicted class; Captum needs a forward pass for the prediction before it can start.

The fused pass costs one forward F and one full backward B; the *maps* baseline costs
2F + B + (the short backward from the logits to the layer), so its ratio is bounded by
(2F + B) / (F + B): below 1.6 wherever the backward costs more than two thirds of the forward.
Calls alternate round-robin, so a change in machine load hits all; the table gives medians and
ratios measured in this one run (``--clock cpu`` for CPU time, steadier on a shared machine).

Usage:
    python bench/bench_attribution.py --zoo zoo/resnet18-shapes [--batch 1 8] [--repeats 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from captum.attr import LayerAttribution, LayerGradCam, Saliency

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery import explain, gradcam, load_variant, saliency  # noqa: E402
from surgery.architectures import architecture_of  # noqa: E402
from surgery.devices import faithful, resolve_device  # noqa: E402
from timing import CLOCKS, measure, synchronizer  # noqa: E402

def captum_maps(model, x, target, layer):
    cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
    grad = Saliency(model).attribute(x.clone().requires_grad_(), target=target)
    return cam, grad


def captum_same_outputs(model, x, layer):
    with torch.no_grad():
        probabilities = model(x).softmax(1)
    return probabilities, captum_maps(model, x, probabilities.argmax(1), layer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True, help="zoo directory with fp32/int8/sparse90")
    parser.add_argument("--variants", nargs="+", default=["fp32", "int8", "sparse90"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (env SURGERY_DEVICE; default auto)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: process CPU time, steadier than wall time on a machine shared with other jobs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    faithful(device)

    print(f"torch {torch.__version__}, {device}, {args.threads} threads, {args.clock} clock, "
          f"median of {args.repeats}\n")
    print("| variant | batch | fused explain (ms) | Captum maps (ms) | speed-up | Captum same outputs (ms) | "
          "speed-up | surgery gradcam + saliency (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in args.variants:
        model, config = load_variant(args.zoo / variant, device=device)
        size = config["architecture"]["input_size"]
        layer = model.get_submodule(architecture_of(model).gradcam_layer)  # the one explain() uses
        for batch in args.batch:
            x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)
            with torch.no_grad():
                target = model(x).argmax(1)
            seconds = measure({
                "fused": lambda: explain(model, x),
                "maps": lambda: captum_maps(model, x, target, layer),
                "same": lambda: captum_same_outputs(model, x, layer),
                "separate": lambda: (gradcam(model, x, target), saliency(model, x, target)),
            }, args.repeats, CLOCKS[args.clock], warmup=2, sync=synchronizer(device))
            ms = {name: 1e3 * value for name, value in seconds.items()}
            print(f"| {variant} | {batch} | {ms['fused']:.1f} | {ms['maps']:.1f} | {ms['maps'] / ms['fused']:.2f}x | "
                  f"{ms['same']:.1f} | {ms['same'] / ms['fused']:.2f}x | {ms['separate']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
