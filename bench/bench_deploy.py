"""What compression buys when deployed: OpenVINO against PyTorch, per variant of a zoo, in one run.

For each variant (sorted FP32 first): the IR's stored weight type and file size (and, for sparse
variants, ``model.bin`` zipped and the bitmask encoding; see :mod:`hub_export.openvino`), latency
at batch 1 and throughput at batch 32 with OpenVINO (static shapes, same thread count) and with
PyTorch (the NNCF model as it is: INT8 is fake-quantized in float), and the top-1 agreement of the
OpenVINO model with the PyTorch variant and with the PyTorch FP32 model on the family's held-out
images. All timed calls alternate round-robin (``bench/timing.py``), so a change in machine load
hits every row alike; the ratios are to FP32 with OpenVINO measured in this same run.

Usage:
    nice python bench/bench_deploy.py ZOO [--images 1000] [--repeats 30] [--threads 2] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub_export import openvino as deploy  # noqa: E402
from surgery import compression, load_variant  # noqa: E402
from surgery.checkpoint import CONFIG_FILE  # noqa: E402
from surgery.variants import parse_variant  # noqa: E402
from timing import measure  # noqa: E402


STATIC = ("variant", "stored_weights", "ir_bytes", "deployable_bytes", "bitmask_bytes", "openvino_version")


def torch_forward(model: torch.nn.Module, x: torch.Tensor):
    def run() -> None:
        with torch.inference_mode(), compression.forward_lock(model):
            model(x)
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path)
    parser.add_argument("--images", type=int, default=1000, help="held-out images for agreement")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds at batch 1 (batch 32: a third)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, help="keep the IR folders here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    names = sorted((d.name for d in args.zoo.iterdir() if (d / CONFIG_FILE).is_file()),
                   key=lambda n: parse_variant(n).order)
    if "fp32" not in names:
        raise SystemExit(f"{args.zoo}: no fp32 variant to compare against")
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        variants, reports = {}, {}
        for name in names:
            variants[name] = load_variant(args.zoo / name)
            reports[name] = deploy.export(args.zoo / name, out / name, measure_speed=False)
        config = variants["fp32"].config
        images = deploy.held_out_images(config, args.images)
        size = config["architecture"]["input_size"]
        x1, x32 = torch.rand(1, 3, size, size), torch.rand(deploy.THROUGHPUT_BATCH, 3, size, size)
        ov1 = {n: deploy.compile_ir(out / n / deploy.IR_XML, 1, args.threads) for n in names}
        ov32 = {n: deploy.compile_ir(out / n / deploy.IR_XML, deploy.THROUGHPUT_BATCH, args.threads) for n in names}
        a1, a32 = x1.numpy(), x32.numpy()
        latency = measure({**{("ov", n): (lambda c=ov1[n]: c(a1)) for n in names},
                           **{("pt", n): torch_forward(variants[n].model, x1) for n in names}}, args.repeats)
        batch = measure({**{("ov", n): (lambda c=ov32[n]: c(a32)) for n in names},
                         **{("pt", n): torch_forward(variants[n].model, x32) for n in names}},
                        max(3, args.repeats // 3))
        fp32_torch = deploy.torch_predict(variants["fp32"].model, images) if images is not None else None
        rows = {}
        for n in names:
            static = {k: v for k, v in deploy.summary(reports[n]).items() if k in STATIC}
            row = {**static, "ov_latency_ms": latency["ov", n] * 1e3,
                   "pt_latency_ms": latency["pt", n] * 1e3,
                   "ov_throughput": deploy.THROUGHPUT_BATCH / batch["ov", n],
                   "pt_throughput": deploy.THROUGHPUT_BATCH / batch["pt", n],
                   "safetensors_bytes": variants[n].config["weights"]["bytes"]}
            if images is not None:
                ours = deploy.predict(ov32[n], images)
                row["agreement_with_pytorch"] = float((ours == deploy.torch_predict(variants[n].model, images)).mean())
                row["agreement_with_fp32"] = float((ours == fp32_torch).mean())
            rows[n] = row
    print_table(rows, args, len(images) if images is not None else 0, load_before, os.getloadavg())
    if args.json:
        args.json.write_text(json.dumps({"machine": deploy.machine(), "threads": args.threads,
                                         "openvino": deploy.OPENVINO_VERSION, "torch": torch.__version__,
                                         "load_before": load_before, "rows": rows}, indent=2) + "\n")


def print_table(rows: dict[str, dict], args: argparse.Namespace, images: int, before, after) -> None:
    base = rows["fp32"]
    print(f"CPU: {deploy.machine()}; {args.threads} threads for both runtimes; OpenVINO {deploy.OPENVINO_VERSION}, "
          f"torch {torch.__version__}; medians of {args.repeats} rounds (batch 1) and {max(3, args.repeats // 3)} "
          f"(batch 32), interleaved; agreement on {images} held-out images; load average "
          f"{before[0]:.1f} before, {after[0]:.1f} after\n")
    print("| variant | IR weights | model.bin (MB) | deployable (MB) | size vs FP32 | OpenVINO b1 (ms) | "
          "PyTorch b1 (ms) | OpenVINO b32 (img/s) | PyTorch b32 (img/s) | b1 speed-up vs FP32 OV | "
          "b32 speed-up vs FP32 OV | agrees with PyTorch variant | agrees with FP32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        extra = f" (bitmask {r['bitmask_bytes'] / 1e6:.2f})" if r.get("bitmask_bytes") else ""
        agree = (f"{r['agreement_with_pytorch']:.1%} | {r['agreement_with_fp32']:.1%}"
                 if "agreement_with_fp32" in r else "- | -")
        print(f"| {parse_variant(n).title} | {r['stored_weights']} | {r['ir_bytes'] / 1e6:.2f} | "
              f"{r['deployable_bytes'] / 1e6:.2f}{extra} | {r['deployable_bytes'] / base['deployable_bytes']:.3f}x | "
              f"{r['ov_latency_ms']:.2f} | {r['pt_latency_ms']:.2f} | {r['ov_throughput']:.1f} | "
              f"{r['pt_throughput']:.1f} | {base['ov_latency_ms'] / r['ov_latency_ms']:.2f}x | "
              f"{r['ov_throughput'] / base['ov_throughput']:.2f}x | {agree} |")


if __name__ == "__main__":
    main()
