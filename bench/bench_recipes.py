"""Which recipe of a variant stays closest to FP32, judged on images no recipe was fitted to.

For a family without its training data (``mobilenetv2-imagenet``) a recipe is chosen before the
labelled images are read. Each ZOO is one candidate recipe's build (its ``fp32`` and the variant
``--variant``); all share one FP32 model. Two held-out judges, per candidate:

- the held-out photo crops (``surgery.data.photos.HeldOutCrops``, what the zoo reports): agreement
  with FP32 and mean KL divergence from FP32's outputs;
- synthetic images drawn from FP32's BatchNorm statistics (ZeroQ, :mod:`training.synthetic`) with
  ``--seed`` (the zoo fits its own with the job's seed, 0): mean KL and agreement. Generated at
  ``--size`` (the refit's), shown to the networks at their input size; cached under ``--cache``.

Across 25 sparse50 recipes (README, "Do the held-out photos choose well?") the labelled figure
ranked with the synthetic images' KL (Spearman 0.63) and not with the photo crops' agreement
(-0.09), so the rule this prints is: the lowest synthetic KL wins, and a candidate replaces the
first ZOO (the current recipe) only where it is lower by more than two paired standard errors.

The rule's false-switch rate is measured on the candidates' own images: the per-image KL differences
from the current recipe, each candidate's centred on 0 (no candidate better), resampled over images
with replacement (one draw of images for all candidates, which keeps their correlation), and the rule
applied to each draw; ``--null-draws`` draws, printed with its binomial standard error.

Usage:
    python bench/bench_recipes.py ZOO [ZOO ...] --variant sparse50 [--synthetic 64] [--cache DIR] [--null-draws N]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery import compression, load_variant  # noqa: E402
from surgery.checkpoint import CONFIG_FILE  # noqa: E402
from surgery.data.photos import HeldOutCrops  # noqa: E402
from surgery.similarity.agreement import output_divergence  # noqa: E402
from training.synthetic import cached_batchnorm_images  # noqa: E402


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with compression.forward_lock(model):
        return torch.cat([model.eval()(x[i:i + batch]) for i in range(0, len(x), batch)])


def paired_se(difference: torch.Tensor) -> float:
    """Standard error of the mean of per-image differences."""
    return float(difference.std() / len(difference) ** 0.5)


def choose(differences: torch.Tensor) -> int | None:
    """The rule on ``[candidates, images]`` KL differences from the current recipe: the index of the
    candidate that replaces it (the lowest mean, lower by more than two paired standard errors), or None."""
    means = differences.mean(1)
    best = int(means.argmin())
    return best if float(means[best]) < -2 * paired_se(differences[best]) else None


def false_switch_rate(differences: torch.Tensor, draws: int, seed: int = 0) -> float:
    """How often :func:`choose` replaces the current recipe when no candidate is better: the
    differences centred per candidate, images resampled with replacement (see the module docstring)."""
    null = differences - differences.mean(1, keepdim=True)
    generator = torch.Generator().manual_seed(seed)
    n = null.shape[1]
    switches = sum(choose(null[:, torch.randint(n, (n,), generator=generator)]) is not None for _ in range(draws))
    return switches / draws


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoos", type=Path, nargs="+", help="one zoo per candidate recipe; the first is the current")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--synthetic", type=int, default=64, help="held-out synthetic images")
    parser.add_argument("--size", type=int, default=160, help="side the synthetic images are generated at")
    parser.add_argument("--seed", type=int, default=1, help="their seed (the zoo's refit draws seed 0)")
    parser.add_argument("--cache", type=Path, help="where they are cached (default: the first zoo's .synthetic)")
    parser.add_argument("--null-draws", type=int, default=2000, help="resamples measuring the rule's false-switch rate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    missing = [str(zoo) for zoo in args.zoos if not (zoo / "fp32" / CONFIG_FILE).is_file()
               or not (zoo / args.variant / CONFIG_FILE).is_file()]
    if missing:
        raise SystemExit(f"no fp32 or no {args.variant} checkpoint in: {', '.join(missing)}")
    fp32, config = load_variant(args.zoos[0] / "fp32")
    size = int(config["architecture"]["input_size"])
    synthetic = cached_batchnorm_images(fp32, args.synthetic, args.size, args.cache or args.zoos[0] / ".synthetic",
                                        seed=args.seed)
    judges = {"photos": HeldOutCrops(size).images.float() / 255,
              "synthetic": F.interpolate(synthetic, size=size, mode="bilinear", antialias=True)}
    reference = {name: logits(fp32, x) for name, x in judges.items()}
    rows, kl = {}, {}
    for zoo in args.zoos:
        model, _ = load_variant(zoo / args.variant)
        row = {}
        for name, x in judges.items():
            out = logits(model, x)
            divergence = output_divergence(reference[name], out).double()
            row[name] = (float((out.argmax(1) == reference[name].argmax(1)).double().mean()), float(divergence.mean()))
            if name == "synthetic":
                kl[zoo] = divergence
        rows[zoo] = row
    current = kl[args.zoos[0]]
    print(f"{args.variant}: {len(judges['photos'])} held-out photo crops, {args.synthetic} held-out synthetic images "
          f"(seed {args.seed}, {args.size} px)")
    print("| candidate | photo agreement | photo KL | synthetic agreement | synthetic KL | vs current (paired SE) |")
    print("|---|---|---|---|---|---|")
    for zoo, row in rows.items():
        difference = kl[zoo] - current
        print(f"| {zoo} | {100 * row['photos'][0]:.1f}% | {row['photos'][1]:.3f} | {100 * row['synthetic'][0]:.1f}% "
              f"| {row['synthetic'][1]:.3f} | {float(difference.mean()):+.3f} ({paired_se(difference):.3f}) |")
    candidates = args.zoos[1:]
    chosen, rate = None, 0.0
    if candidates:
        differences = torch.stack([kl[zoo] - current for zoo in candidates])
        chosen, rate = choose(differences), false_switch_rate(differences, args.null_draws)
    print("the current recipe stays (no candidate lower by two paired SEs)" if chosen is None
          else f"{candidates[chosen]} replaces the current recipe")
    print(f"the rule's false-switch rate with {len(candidates)} candidate(s), none better (centred bootstrap, "
          f"{args.null_draws} draws): {100 * rate:.1f}% (SE {100 * (rate * (1 - rate) / args.null_draws) ** 0.5:.1f})")
    return {"rows": {str(z): r for z, r in rows.items()},
            "replaces": None if chosen is None else str(candidates[chosen]), "false_switch_rate": rate}


if __name__ == "__main__":
    main()
