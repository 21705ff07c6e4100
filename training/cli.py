"""``python -m training {fp32,int8,sparse,evaluate,zoo}``; ``torchrun --nproc_per_node=N -m training ...`` for DDP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from surgery.checkpoint import CheckpointError, read_config, write_config
from surgery.data import IN_MEMORY, build_dataset
from surgery.loading import load_variant
from surgery.registry import FAMILIES, ModelFamily, Recipe, get_family
from training import distributed
from training.loop import accuracy_metrics, predict
from training.variants import Job, derive_int8, derive_sparse, train_fp32

logger = logging.getLogger("training")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="CIFAR-10 root, ImageNet folder (train/, val/) or Fashion-MNIST folder "
                   "(default: Debian's); not needed for shapes")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 / Fashion-MNIST into --data-root")
    p.add_argument("--device", default=None,
                   help="auto (cuda when present), cpu, cuda, cuda:N (env SURGERY_DEVICE; default auto)")
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
    p.add_argument("--push-to-hub", metavar="ORG",
                   help="push each variant to ORG/<family>-<variant> with its model card as soon as it is "
                        "built and evaluated (token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create missing repos as private")
    _common(p)
    return top


def _job(family: ModelFamily, args, ctx: distributed.Context, train: bool = True) -> Job:
    """Datasets and settings of a run; ``train=False`` skips the training set (``evaluate``)."""
    with distributed.main_first(ctx):  # rank 0 downloads, the others then read
        eval_set = build_dataset(family, "eval", args.data_root, download=args.download, samples=args.eval_samples)
        train_set = (build_dataset(family, "train", args.data_root, download=args.download,
                                   samples=args.train_samples) if train else None)
    # Shapes live in memory: worker processes would only copy them. Files need decoding workers.
    workers = args.workers if args.workers is not None else (0 if family.dataset in IN_MEMORY
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
    return build_zoo(args, ctx, on_built=_hub_pusher(args, ctx))


def _hub_pusher(args, ctx: distributed.Context) -> Callable[[str, Path], None] | None:
    """With ``--push-to-hub ORG``: a callback pushing each built variant (rank 0 only), checked up front."""
    if not args.push_to_hub:
        return None
    from hub_export.push import check_can_push, push_variant  # the Hub client only when pushing

    check_can_push(args.push_to_hub, args.family)

    def on_built(name: str, directory: Path) -> None:
        if ctx.is_main:
            push_variant(directory.parent, name, args.push_to_hub, private=args.private)

    return on_built


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


def build_zoo(args, ctx: distributed.Context,
              on_built: Callable[[str, Path], None] | None = None) -> dict:
    """FP32, then INT8 and sparse derived from it, and optionally the seed control.

    ``on_built(name, directory)`` runs after each variant is saved (e.g. to push it to the Hub).
    """
    built = on_built or (lambda name, directory: None)
    family = get_family(args.family)
    job = _job(family, args, ctx)
    c = family.compression
    started = time.perf_counter()
    fp32_recipe = _override(family.fp32, args)
    overall = tqdm(total=3 + args.seed_control, desc=f"zoo {family.name}", unit="model", disable=not ctx.is_main)
    fp32, metrics, reference = train_fp32(job, fp32_recipe, args.out / "fp32")
    results = {"fp32": metrics}
    built("fp32", args.out / "fp32")
    overall.update()
    _, results["int8"] = derive_int8(job, fp32, _override(c.int8, args), c.calibration_samples,
                                     args.out / "int8", reference)
    built("int8", args.out / "int8")
    overall.update()
    name = f"sparse{round(c.sparsity * 100)}"
    _, results[name] = derive_sparse(job, fp32, _override(c.sparse, args), c.sparsity, c.sparsity_ramp,
                                     args.out / name, reference, variant=name)
    built(name, args.out / name)
    overall.update()
    if args.seed_control:
        control = f"fp32-seed{args.seed + 1}"
        control_job = Job(**{**job.__dict__, "seed": args.seed + 1})
        _, results[control], _ = train_fp32(control_job, fp32_recipe, args.out / control, variant=control)
        built(control, args.out / control)
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
