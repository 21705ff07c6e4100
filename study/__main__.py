"""``python -m study``: the compression study of one zoo, in one process or spread over several.

Usage:
    python -m study --zoo DIR --out DIR [--images N] [--seed S] [--device D] [...]
        every variant, then the report: OUT/report.html, OUT/metrics.json, OUT/figures/*.png,
        OUT/shards/ (the per-variant measurements);
    python -m study collect --zoo DIR --variant NAME [--variant NAME ...] --shards DIR [...]
        one or more variants' shards (run on several processes or machines with the same settings);
    python -m study report --zoo DIR --shards DIR [DIR ...] --out DIR
        gather the shards into one report (the zoo is read for class names and weight hashes only:
        the exemplars' maps were drawn when collecting).

Same zoo, settings and machine: the same ``metrics.json``, byte for byte. ``--images`` accepts
``all`` (the whole held-out split; 10,000 for Fashion-MNIST). ``--cache-root R`` writes into
``R/<hash of the zoo's weights>/`` instead of ``--out`` (what the Space's Study tab reads).

Example:
    $ python -m study --zoo zoo/resnet18-shapes --out study/shapes --images 1000 --seed 0
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import sys
from dataclasses import fields, replace
from pathlib import Path

from study.collect import ModelCache, collect_variant, data_seed
from study.gather import gather
from study.images import held_out
from study.page import exemplar_items, figures, render_page
from study.settings import Settings
from study.shard import Shard, find_shards
from study.zoo import StudyZoo
from surgery.checkpoint import CheckpointError
from surgery.devices import faithful, resolve_device

logger = logging.getLogger("study")

_HELP = {
    "images": "held-out images ('all': the whole held-out split)",
    "seed": "draws the images",
    "batch_size": "images per forward pass (also the unit of the jackknife groups)",
    "groups": "jackknife groups of batches (batch k in group k %% G)",
    "deletion_images": "images scored by deletion/insertion, spread over the stream",
    "deletion_steps": "steps of the deletion and insertion curves",
    "tolerance": "pointing-game tolerance in pixels",
    "top_fraction": "share of top pixels whose IoU compares two maps",
    "match_images": "images for the layer-matching check (SVCCA/PWCCA of all block pairs)",
    "exemplars": "compression-identified exemplars drawn per variant",
    "confidence": "confidence of every interval",
    "eval_samples": "shapes: generate this many held-out images",
    "device": "auto (a CUDA GPU when present), cpu, cuda, cuda:N (env SURGERY_DEVICE; default auto)",
    "data_root": "data of families other than shapes",
}


def _images(text: str) -> int | None:
    return None if text == "all" else int(text)


def _add_settings(p: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        default = getattr(Settings(), f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if f.name == "images":
            p.add_argument(flag, type=_images, default=default, help=_HELP[f.name])
        elif f.name in ("eval_samples",):
            p.add_argument(flag, type=int, default=default, help=_HELP[f.name])
        else:
            p.add_argument(flag, type=str if default is None else type(default), default=default, help=_HELP[f.name])


def _settings(args: argparse.Namespace) -> Settings:
    s = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    device = resolve_device(s.device)  # a bad --device fails before any work
    faithful(device)  # no TF32: GPU answers stay comparable with CPU ones
    return replace(s, device=str(device))


def parser(command: str | None) -> argparse.ArgumentParser:
    prog = "python -m study" + (f" {command}" if command else "")
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--zoo", type=Path, required=True, help="a zoo directory: DIR/fp32, DIR/fp32-seed1, DIR/int8, ...")
    if command == "collect":
        p.add_argument("--variant", action="append", required=True, help="variant to measure (repeatable)")
        p.add_argument("--shards", type=Path, required=True, help="directory the shards go to")
    if command == "report":
        p.add_argument("--shards", type=Path, nargs="+", required=True, help="shard files or directories")
    if command in (None, "report"):
        out = p.add_mutually_exclusive_group(required=True)
        out.add_argument("--out", type=Path, help="where report.html, metrics.json and figures/ go")
        out.add_argument("--cache-root", type=Path, help="write into CACHE_ROOT/<hash of the zoo's weights>/")
    if command in (None, "collect"):
        _add_settings(p)
    return p


def output_dir(zoo: StudyZoo, out: Path | None, cache_root: Path | None) -> Path:
    """``out``, or the directory of this zoo's weights under ``cache_root``."""
    return Path(out) if out is not None else Path(cache_root) / zoo.digest()


def collect(zoo_dir: Path, names: list[str], shards_dir: Path, s: Settings) -> list[Path]:
    zoo = StudyZoo.open(zoo_dir)
    s.validate()
    data = held_out(zoo.family, s, data_seed(zoo))
    models = ModelCache(zoo, s.device)
    paths = []
    for name in names:
        logger.info("collecting %s", name)
        paths.append(collect_variant(zoo, name, s, data, models).save(shards_dir))
    return paths


def report(zoo_dir: Path, shard_paths: list[Path], out: Path) -> dict:
    """Gather the shards and write the page, the figures and metrics.json."""
    zoo = StudyZoo.open(zoo_dir)
    shards = [Shard.load(p) for p in find_shards(shard_paths)]
    for sh in shards:
        if sh.name in zoo.configs and zoo.sha256(sh.name) != sh.meta["weights_sha256"]:
            raise ValueError(f"shard {sh.name} was measured on other weights than {zoo.root / sh.name}")
    metrics = gather(shards)
    limit = metrics["settings"]["exemplars"]
    gallery = {sh.name: exemplar_items(sh, metrics["classes"][sh.name]["exemplars"], limit) for sh in shards
               if metrics["classes"].get(sh.name, {}).get("exemplars")}
    pictures = figures(metrics, gallery, zoo.family.class_names)
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for key, png in pictures.items():
        (out / "figures" / f"{key}.png").write_bytes(png)
    encoded = {k: base64.b64encode(v).decode("ascii") for k, v in pictures.items()}
    (out / "report.html").write_text(render_page(metrics, zoo.family.class_names, encoded))
    text = json.dumps(_json_ready(metrics), indent=1, sort_keys=True, allow_nan=False)
    (out / "metrics.json").write_text(text + "\n")
    logger.info("wrote %s and %s", out / "report.html", out / "metrics.json")
    return metrics


def _json_ready(value):
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def study_all(zoo_dir: Path, out: Path | None, s: Settings, cache_root: Path | None = None) -> dict:
    """Every variant of the zoo, then the report (the one-process path)."""
    zoo = StudyZoo.open(zoo_dir)
    target = output_dir(zoo, out, cache_root)
    collect(zoo_dir, zoo.names, target / "shards", s)
    return report(zoo_dir, [target / "shards"], target)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("collect", "report") else None
    args = parser(command).parse_args(argv[1:] if command else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if command == "collect":
            collect(args.zoo, args.variant, args.shards, _settings(args))
        elif command == "report":
            zoo = StudyZoo.open(args.zoo)
            report(args.zoo, args.shards, output_dir(zoo, args.out, args.cache_root))
        else:
            study_all(args.zoo, args.out, _settings(args), args.cache_root)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
