"""``python -m training {fp32,int8,sparse,evaluate,zoo}``; ``torchrun --nproc_per_node=N -m training ...`` for DDP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from surgery.checkpoint import CheckpointError, read_config, write_config
from surgery.data import build_dataset
from surgery.loading import load_variant
from surgery.registry import FAMILIES, ModelFamily, Recipe, get_family
from surgery.variants import DEFAULT_ZOO, parse_variant, seed_name
from training import distributed
from training.loop import accuracy_metrics, predict
from training.variants import Job, derive_int8, derive_sparse, train_fp32

logger = logging.getLogger("training")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="CIFAR-10 root or ImageNet folder (train/, val/); not needed for shapes")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-root")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: 0 for shapes, else up to 4)")
    p.add_argument("--train-samples", type=int, help="cap (or, for shapes, set) the training set size")
    p.add_argument("--eval-samples", type=int, help="cap (or, for shapes, set) the held-out set size")
    p.add_argument("--max-steps", type=int, help="truncate every epoch of every stage to this many steps")


def _recipe_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    families = sorted(FAMILIES)

    p = sub.add_parser("fp32", help="train the FP32 model of a family")
    p.add_argument("--family", required=True, choices=families)
    p.add_argument("--out", required=True, type=Path)
    _common(p)
    _recipe_overrides(p)

    for name, text in (("int8", "derive INT8: NNCF post-training quantization + QAT"),
                       ("sparse", "derive a sparse model: NNCF global magnitude pruning, ramped while fine-tuning")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--fp32", required=True, type=Path, help="the FP32 checkpoint directory")
        p.add_argument("--out", required=True, type=Path)
        _common(p)
        _recipe_overrides(p)
        if name == "sparse":
            p.add_argument("--sparsity", type=float, help="target fraction of zero weights (default 0.9)")
        else:
            p.add_argument("--calibration-samples", type=int, help="images for NNCF's range calibration")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint and store the metrics in its config.json")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--fp32", type=Path, help="FP32 checkpoint to measure agreement against")
    _common(p)

    p = sub.add_parser("zoo", help="all variants of a family: OUT/fp32, OUT/int8, OUT/sparse90 [, OUT/fp32-seed1]")
    p.add_argument("--family", required=True, choices=families)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed-control", action="store_true",
                   help="also train OUT/fp32-seed<seed+1>: an FP32 model differing only in its seed")
    p.add_argument("--variants", help="comma-separated variants to build instead of the default zoo "
                                      "(fp32, fp32-seed<k>, int8, sparse<percent>); built ones are skipped")
    _common(p)
    return top


def _job(family: ModelFamily, args, ctx: distributed.Context, train: bool = True) -> Job:
    """Datasets and settings of a run; ``train=False`` skips the training set (``evaluate``)."""
    with distributed.main_first(ctx):  # rank 0 downloads, the others then read
        eval_set = build_dataset(family, "eval", args.data_root, download=args.download, samples=args.eval_samples)
        train_set = (build_dataset(family, "train", args.data_root, download=args.download,
                                   samples=args.train_samples) if train else None)
    # Shapes live in memory: worker processes would only copy them. Files need decoding workers.
    workers = args.workers if args.workers is not None else (0 if family.dataset == "shapes"
                                                             else min(4, os.cpu_count() or 1))
    return Job(family, train_set, eval_set, ctx, seed=args.seed, workers=workers)


def _override(recipe: Recipe, args) -> Recipe:
    steps = min(filter(None, (recipe.steps_per_epoch, args.max_steps)), default=None)
    return recipe.with_overrides(epochs=getattr(args, "epochs", None), lr=getattr(args, "lr", None),
                                 batch_size=getattr(args, "batch_size", None), steps_per_epoch=steps)


def _fp32_reference(job: Job, fp32_dir: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    model, _ = load_variant(fp32_dir, device=job.ctx.device)
    logits, _ = predict(model, job.eval_set, job.ctx.device, workers=job.workers)
    return model, logits.argmax(1)


def _family_of(checkpoint: Path) -> ModelFamily:
    return get_family(read_config(checkpoint)["family"])


def run(args, ctx: distributed.Context) -> dict:
    if args.command == "fp32":
        family = get_family(args.family)
        _, metrics, _ = train_fp32(_job(family, args, ctx), _override(family.fp32, args), args.out)
        return {"fp32": metrics}
    if args.command in ("int8", "sparse"):
        family = _family_of(args.fp32)
        job = _job(family, args, ctx)
        fp32, reference = _fp32_reference(job, args.fp32)
        c = family.compression
        if args.command == "int8":
            samples = args.calibration_samples or c.calibration_samples
            _, metrics = derive_int8(job, fp32, _override(c.int8, args), samples, args.out, reference)
        else:
            sparsity = args.sparsity or c.sparsity
            _, metrics = derive_sparse(job, fp32, _override(c.sparse, args), sparsity, c.sparsity_ramp,
                                       args.out, reference, variant=args.out.name)
        return {args.command: metrics}
    if args.command == "evaluate":
        return {"evaluate": evaluate(args, ctx)}
    return build_zoo(args, ctx)


def evaluate(args, ctx: distributed.Context) -> dict:
    config = read_config(args.checkpoint)
    family = get_family(config["family"])
    job = _job(family, args, ctx, train=False)
    model, _ = load_variant(args.checkpoint, device=ctx.device)
    reference = _fp32_reference(job, args.fp32)[1] if args.fp32 else None
    logits, labels = predict(model, job.eval_set, ctx.device, workers=job.workers)
    metrics = {**config.get("metrics", {}), **accuracy_metrics(logits, labels, family.class_names, reference)}
    if ctx.is_main:
        write_config(args.checkpoint, {**config, "metrics": metrics})
    return metrics


def zoo_plan(args) -> list[str]:
    """The variants ``zoo`` builds: ``--variants``, else the default zoo (and the seed control)."""
    if args.variants:
        names = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
    else:
        names = list(DEFAULT_ZOO) + ([seed_name("fp32", args.seed + 1)] if args.seed_control else [])
    for name in names:
        spec = parse_variant(name)  # ValueError with the grammar
        if not (spec.kind == "fp32" or (spec.seed == 0 and (name == "int8" or spec.kind == "sparse"))):
            raise ValueError(f"zoo --variants: {name!r} cannot be built by this version "
                             "(fp32, fp32-seed<k>, int8 and sparse<percent> can)")
    if not names:
        raise ValueError("zoo --variants: give at least one variant")
    return names


def build_zoo(args, ctx: distributed.Context) -> dict:
    """FP32, then the variants derived from it (INT8, sparse) and seed controls, as planned by
    :func:`zoo_plan`. A variant whose ``config.json`` exists is skipped; a derived variant
    whose FP32 model is built already starts from that one."""
    family = get_family(args.family)
    plan = zoo_plan(args)
    todo = [name for name in plan if not (args.out / name / "config.json").exists()]
    for name in sorted(set(plan) - set(todo), key=plan.index):
        logger.info("%s/%s: built already in %s, skipped", family.name, name, args.out / name)
    derived = any(parse_variant(name).kind != "fp32" for name in todo)
    if derived and "fp32" not in todo and not (args.out / "fp32" / "config.json").exists():
        todo.insert(0, "fp32")  # every derived variant starts from this FP32 model
    if not todo:
        return {}
    job = _job(family, args, ctx)
    c = family.compression
    started = time.perf_counter()
    fp32_recipe = _override(family.fp32, args)
    overall = tqdm(total=len(todo), desc=f"zoo {family.name}", unit="model", disable=not ctx.is_main)
    results: dict = {}
    fp32 = reference = None
    if "fp32" in todo:
        fp32, results["fp32"], reference = train_fp32(job, fp32_recipe, args.out / "fp32")
        overall.update()
    for name in (n for n in todo if n != "fp32"):
        spec = parse_variant(name)
        if spec.kind == "fp32":  # a seed control: the same recipe with another seed
            control_job = Job(**{**job.__dict__, "seed": spec.seed})
            _, results[name], _ = train_fp32(control_job, fp32_recipe, args.out / name, variant=name)
        else:
            if fp32 is None:  # built in an earlier run: the same weights, read back exactly
                fp32, reference = _fp32_reference(job, args.out / "fp32")
            if name == "int8":
                _, results[name] = derive_int8(job, fp32, _override(c.int8, args), c.calibration_samples,
                                               args.out / name, reference)
            else:
                _, results[name] = derive_sparse(job, fp32, _override(c.sparse, args), spec.sparsity,
                                                 c.sparsity_ramp, args.out / name, reference, variant=name)
        overall.update()
    overall.close()
    logger.info("zoo %s built in %.1f s", family.name, time.perf_counter() - started)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # torchrun starts N processes on the same cores: split the threads instead of oversubscribing.
    torch.set_num_threads(max(torch.get_num_threads() // int(os.environ.get("WORLD_SIZE", "1")), 1))
    try:
        ctx = distributed.init(args.device)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    try:
        results = run(args, ctx)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as exc:
        logger.error("%s", exc)
        return 2
    finally:
        distributed.shutdown(ctx)
    if ctx.is_main:
        summary = {k: {m: v for m, v in r.items() if m != "per_class_top1"} for k, r in results.items()}
        logger.info("results:\n%s", json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
