"""``python -m training {fp32,quantize,int8,sparse,evaluate,zoo}``; ``torchrun --nproc_per_node=N -m training ...`` for DDP.

Example:
    python -m training zoo --family resnet18-shapes --out zoo/resnet18-shapes --ladder --seeds 2
    python -m training quantize --bits 4 --activation-bits 8 --fp32 zoo/resnet18-shapes/fp32 --out zoo/w4a8
    python -m training sparse --sparsity 0.98 --fp32 zoo/resnet18-shapes/fp32 --out zoo/sparse98
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from surgery.checkpoint import CONFIG_FILE, CheckpointError, read_config, write_config
from surgery.data import IN_MEMORY, build_dataset
from surgery.devices import resolve_device
from surgery.loading import load_variant
from surgery.registry import FAMILIES, ModelFamily, Recipe, get_family
from surgery.variants import DEFAULT_ZOO, LADDER, VariantSpec, parse_variant, quantized_name, seed_name, sparse_name
from training import distributed
from training.loop import accuracy_metrics, predict
from training.variants import Job, derive_quantized, derive_sparse, train_fp32

logger = logging.getLogger("training")

OnBuilt = Callable[[str, Path], None]


@dataclass(frozen=True)
class Settings:
    """Where the data comes from, where training runs and how long: what every command shares."""

    data_root: str | None = None
    download: bool = False
    device: str | None = None  # surgery.devices.resolve_device: None is $SURGERY_DEVICE, else auto
    seed: int = 0
    workers: int | None = None
    train_samples: int | None = None
    eval_samples: int | None = None
    max_steps: int | None = None  # truncates every epoch of every stage
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


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


def _variant_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    try:
        return [parse_variant(n).name for n in names]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    families = sorted(FAMILIES)

    p = sub.add_parser("fp32", help="train the FP32 model of a family")
    p.add_argument("--family", required=True, choices=families)
    p.add_argument("--out", required=True, type=Path)
    _common(p)
    _recipe_overrides(p)

    for name, text in (("quantize", "derive a quantized model: NNCF post-training quantization + QAT"),
                       ("int8", "shorthand for `quantize --bits 8`"),
                       ("sparse", "derive a sparse model: NNCF global magnitude pruning, ramped while fine-tuning")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--fp32", required=True, type=Path, help="the FP32 checkpoint directory")
        p.add_argument("--out", required=True, type=Path)
        _common(p)
        _recipe_overrides(p)
        if name == "sparse":
            p.add_argument("--sparsity", type=float, help="target fraction of zero weights (default: the family's, 0.9)")
        else:
            if name == "quantize":
                p.add_argument("--bits", required=True, type=int,
                               help="weight bit width, 2..8 (first conv and classifier stay at 8)")
                p.add_argument("--activation-bits", type=int, help="activation bit width, 2..8 (default: --bits)")
            p.add_argument("--calibration-samples", type=int, help="images for NNCF's range calibration")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint and store the metrics in its config.json")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--fp32", type=Path, help="FP32 checkpoint to measure agreement against")
    _common(p)

    p = sub.add_parser("zoo", help="variants of a family, OUT/<variant> each (default: the family's zoo, e.g. "
                                   f"{','.join(DEFAULT_ZOO)}); built ones are skipped, interrupted ones resume")
    p.add_argument("--family", required=True, choices=families)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--variants", type=_variant_list,
                   help="comma-separated variant names (fp32, int8, int4, w4a8, sparse95, int4-seed1, ...)")
    p.add_argument("--ladder", action="store_true", help=f"add the whole ladder: {','.join(LADDER)}")
    p.add_argument("--seeds", type=int, default=1,
                   help="K: also train the FP32 seed controls fp32-seed1 .. fp32-seed<K-1>")
    p.add_argument("--seed-control", action="store_true", help="the same as --seeds 2")
    p.add_argument("--push-to-hub", metavar="ORG",
                   help="push each variant to ORG/<family>-<variant> with its model card as soon as it is "
                        "built and evaluated (token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create missing repos as private")
    p.add_argument("--epochs", type=int, help="every stage's epochs (with --max-steps: a quick smoke zoo)")
    _common(p)
    return top


def _job(family: ModelFamily, s: Settings, ctx: distributed.Context, train: bool = True) -> Job:
    """Datasets and settings of a run; ``train=False`` skips the training set (``evaluate``)."""
    with distributed.main_first(ctx):  # rank 0 downloads, the others then read
        eval_set = build_dataset(family, "eval", s.data_root, download=s.download, samples=s.eval_samples)
        train_set = (build_dataset(family, "train", s.data_root, download=s.download,
                                   samples=s.train_samples) if train else None)
    # Shapes live in memory: worker processes would only copy them. Files need decoding workers.
    workers = s.workers if s.workers is not None else (0 if family.dataset in IN_MEMORY
                                                         else min(4, os.cpu_count() or 1))
    return Job(family, train_set, eval_set, ctx, seed=s.seed, workers=workers)


def _override(recipe: Recipe, s: Settings, fine_tunes: bool = True) -> Recipe:
    """The recipe with the command line's settings; a variant that is not fine-tuned keeps its 0 epochs."""
    steps = min(filter(None, (recipe.steps_per_epoch, s.max_steps)), default=None)
    return recipe.with_overrides(epochs=s.epochs if fine_tunes else None, lr=s.lr, batch_size=s.batch_size,
                                 steps_per_epoch=steps)


def _reference(job: Job, model: torch.nn.Module) -> torch.Tensor:
    """FP32's held-out logits, for the comparisons of the variants derived from it."""
    logits, _ = predict(model, job.eval_set, job.ctx.device, workers=job.workers)
    return logits


def _family_of(checkpoint: Path) -> ModelFamily:
    return get_family(read_config(checkpoint)["family"])


def derive(job: Job, spec: VariantSpec, fp32: torch.nn.Module, reference: torch.Tensor | None, out: Path,
           s: Settings, calibration_samples: int | None = None) -> dict:
    """Derive the compressed variant ``spec`` from ``fp32`` with the family's recipe for it."""
    c = job.family.compression
    recipe = _override(c.for_variant(spec), s, fine_tunes=not spec.post_training)
    if spec.kind == "quantized":
        _, metrics = derive_quantized(job, fp32, recipe, spec, calibration_samples or c.calibration_samples,
                                      out, reference, activation_ranges=c.activation_ranges,
                                      batchnorm_correction=c.batchnorm_correction,
                                      bias_correction=c.bias_correction)
    else:
        _, metrics = derive_sparse(job, fp32, recipe, spec, c.sparsity_ramp, out, reference,
                                   allocation=c.sparsity_allocation, batchnorm_correction=c.batchnorm_correction,
                                   dense_below=c.dense_below)
    return metrics


def run(args, ctx: distributed.Context) -> dict:
    s = Settings.from_args(args)
    if args.command == "fp32":
        family = get_family(args.family)
        _, metrics, _ = train_fp32(_job(family, s, ctx), _override(family.fp32, s), args.out)
        return {"fp32": metrics}
    if args.command in ("quantize", "int8", "sparse"):
        family = _family_of(args.fp32)
        source_seed = parse_variant(read_config(args.fp32)["variant"]).seed
        if args.command == "sparse":
            name = sparse_name(args.sparsity or family.compression.sparsity, source_seed)
        else:
            bits = 8 if args.command == "int8" else args.bits
            name = quantized_name(bits, args.activation_bits if args.command == "quantize" else None, source_seed)
        job = _job(family, Settings(**{**s.__dict__, "seed": s.seed + source_seed}), ctx)
        fp32, _ = load_variant(args.fp32, device=ctx.device)
        metrics = derive(job, parse_variant(name), fp32, _reference(job, fp32), args.out, s,
                         getattr(args, "calibration_samples", None))
        return {name: metrics}
    if args.command == "evaluate":
        return {"evaluate": evaluate(args, ctx)}
    seeds = max(args.seeds, 2 if args.seed_control else 1)
    return build_zoo(args.family, args.out, args.variants, ladder=args.ladder, seeds=seeds, settings=s, ctx=ctx,
                     on_built=_hub_pusher(args, ctx))


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
    job = _job(family, Settings.from_args(args), ctx, train=False)
    model, _ = load_variant(args.checkpoint, device=ctx.device)
    reference = _reference(job, load_variant(args.fp32, device=ctx.device)[0]) if args.fp32 else None
    logits, labels = predict(model, job.eval_set, ctx.device, workers=job.workers)
    metrics = {**config.get("metrics", {}), **accuracy_metrics(logits, labels, family.class_names, reference)}
    if ctx.is_main:
        write_config(args.checkpoint, {**config, "metrics": metrics})
    return metrics


def zoo_variants(variants: Iterable[str] | None = None, ladder: bool = False, seeds: int = 1) -> list[str]:
    """The variant names a zoo build makes, in build order: each compressed variant after the FP32
    model it is derived from (``fp32``, or ``fp32-seed<k>`` for ``<variant>-seed<k>``).

    Example:
        >>> zoo_variants(["int4", "sparse95"])
        ['fp32', 'int4', 'sparse95']
        >>> zoo_variants(seeds=2)
        ['fp32', 'int8', 'sparse90', 'fp32-seed1']
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    wanted = [*(variants or DEFAULT_ZOO), *(LADDER if ladder else ()), *(seed_name("fp32", k) for k in range(1, seeds))]
    order: list[str] = []
    for name in wanted:
        spec = parse_variant(name)
        for needed in ([seed_name("fp32", spec.seed)] if spec.kind != "fp32" else []) + [spec.name]:
            if needed not in order:
                order.append(needed)
    return order


def _already_built(directory: Path, family: str, name: str) -> bool:
    """A finished checkpoint of this variant is there (a build that stopped half-way left none:
    only its resume state, which the rebuild continues from)."""
    if not (directory / CONFIG_FILE).exists():
        return False
    try:
        config = read_config(directory)
    except CheckpointError as exc:
        logger.warning("rebuilding %s: %s", directory, exc)
        return False
    if (config["family"], config["variant"]) != (family, name):
        raise CheckpointError(f"{directory}: holds {config['family']}/{config['variant']}, not {family}/{name}; "
                              "choose another --out")
    return True


def build_zoo(family: str, out: str | Path, variants: Iterable[str] | None = None, *, ladder: bool = False,
              seeds: int = 1, settings: Settings | None = None, ctx: distributed.Context | None = None,
              on_built: OnBuilt | None = None) -> dict[str, dict]:
    """Build the variants of ``family`` into ``out/<variant>/`` (see :func:`zoo_variants`); returns
    each variant's metrics.

    Variants already in ``out`` are skipped (their metrics are read back); an interrupted stage
    resumes after its last finished epoch. Compressed variants are derived from the zoo's FP32
    model of their seed, trained first if missing. ``on_built(name, directory)`` runs (rank 0) after
    each variant this call saves, e.g. to push it to the Hub or show it in an app.

    Example:
        >>> build_zoo("resnet18-shapes", "zoo/shapes", ["fp32", "int4", "sparse95"],
        ...           settings=Settings(max_steps=2), on_built=lambda name, d: print(name, d))
    """
    spec_family, out = get_family(family), Path(out)
    s = settings or Settings()
    ctx = ctx or distributed.Context(device=resolve_device(s.device))
    names = zoo_variants(variants or spec_family.zoo, ladder, seeds)
    seeded = [n for n in names if parse_variant(n).seed]
    if seeded and not spec_family.has_fp32_seeds:
        others = ", ".join(f"fp32-recipe{k} (torchvision's {w}, another recipe)"
                           for k, w in enumerate(spec_family.other_recipes, 1))
        raise ValueError(f"{family} has no FP32 seeds: its FP32 is torchvision's {spec_family.pretrained} weights as "
                         f"they are, so another seed would give the same model ({', '.join(seeded)})"
                         + (f"; its other training run is {others}" if others else ""))
    started = time.perf_counter()
    jobs: dict[int, Job] = {}
    sources: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}  # seed -> FP32 model, its held-out logits
    results: dict[str, dict] = {}

    def job_for(seed: int) -> Job:
        if not jobs:
            jobs[0] = _job(spec_family, s, ctx)
        if seed not in jobs:
            jobs[seed] = Job(**{**jobs[0].__dict__, "seed": s.seed + seed})
        return jobs[seed]

    def source(seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
        if seed not in sources:
            model, _ = load_variant(out / seed_name("fp32", seed), device=ctx.device)
            sources[seed] = (model, _reference(job_for(seed), model))
        return sources[seed]

    overall = tqdm(total=len(names), desc=f"zoo {spec_family.name}", unit="model", disable=not ctx.is_main)
    for name in names:
        spec, directory = parse_variant(name), out / name
        if _already_built(directory, spec_family.name, name):
            logger.info("%s: already built in %s, skipped", name, directory)
            results[name] = read_config(directory).get("metrics", {})
        else:
            if spec.kind == "fp32":
                model, results[name], logits = train_fp32(job_for(spec.seed), _override(spec_family.fp32, s),
                                                          directory, variant=name)
                sources[spec.seed] = (model, logits)
            else:
                fp32, reference = source(spec.seed)
                results[name] = derive(job_for(spec.seed), spec, fp32, reference, directory, s)
            if on_built is not None and ctx.is_main:
                on_built(name, directory)
        overall.update()
    overall.close()
    logger.info("zoo %s (%s) built in %.1f s", spec_family.name, ", ".join(names), time.perf_counter() - started)
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
