"""The study's "worse than retraining" rule on simulated zoos where nothing is worse: its false-positive rate.

Every simulated zoo has K FP32 seeds and a ladder of L "compressed variants" that are, in
truth, one more draw each from the seeds' distribution: any flag is a false positive. Each
model sees the same ``--images`` images (batches of ``--batch``, ``--groups`` jackknife groups,
as the study streams them) and is measured as the study measures it:

- top-1 accuracy (a model's own metric): image difficulty shared by every model, a quality per
  model and noise per model and image;
- top-1 agreement with FP32 (a comparison): class scores shared by every model plus noise whose
  size varies from model to model, so some seeds agree less with everyone;
- linear CKA with FP32 (a comparison, minibatch debiased CKA with its jackknife): features
  shared by every model plus noise of a per-model size;
- a Gaussian "pair model" with no image noise, ``S(i, j) = a_i + a_j + e_ij``, from all
  between-model spread (``a``) to all pair spread (``e``): the comparison rule across the mixes
  a real metric may have.

Each value is judged by :func:`study.null.verdict` against the seeds exactly as
``study.gather`` does (a model's own metric: the seeds' values; a comparison: the pairs of
FP32 with the other seeds as the centre, every seed pair as the spread), and each metric's
first level worse along the ladder by :func:`study.null.fixed_sequence`. Beside it: the same
bound with the images' standard error of the contrast added to the seeds' spread, and the
previous rule, the min/max band of the seeds with a jackknife interval of the contrast
excluding 0, with the reading it was used with (the first flag met from the mildest level).

Prints per metric and K: the share of variants flagged worse and the share of ladders with any
first-level claim (family-wise error), each with its standard error over the simulated zoos.

Usage:
    python bench/bench_null.py [--replications 2000] [--seeds 3 5] [--ladder 5] [--images 256]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.null import Null, fixed_sequence, verdict  # noqa: E402
from surgery.similarity.cka import MinibatchCKA  # noqa: E402
from surgery.similarity.stats import Jackknife, group_of, grouped_mean  # noqa: E402

ALPHA = 0.05
CLASSES, FEATURES = 10, 32
PAIR_MIXES = ((1.0, 0.0), (1.0, 0.5), (1.0, 1.0), (0.5, 1.0), (0.0, 1.0))  # (between-model sd, pair sd)


def old_rule(value: Jackknife, null: list[Jackknife], higher: bool) -> bool:
    """The study's previous rule: the contrast's interval excludes 0 and the value is outside the seeds' range."""
    c = (value - Jackknife.mean(null)).estimate(1 - ALPHA)
    v, values = float(value.value), [float(j.value) for j in null]
    below = c.excludes(0.0) and c.high < 0 and v < min(values)
    above = c.excludes(0.0) and c.low > 0 and v > max(values)
    return below if higher else above


class Zoo:
    """One simulated zoo: ``models`` models (the K seeds first, then the ladder) on the same images."""

    def __init__(self, rng: np.random.Generator, models: int, images: int, batch: int, groups: int) -> None:
        self.groups = group_of(np.arange(images), groups, batch)
        self.G, self.batch, self.models = groups, batch, models
        difficulty = rng.normal(1.6, 1.0, images)
        quality = rng.normal(0.0, 0.15, models)
        self.correct = (difficulty[None] + quality[:, None] + rng.normal(0, 0.6, (models, images)) > 0).astype(float)
        scores = rng.normal(0, 1, (images, CLASSES))
        scores[np.arange(images), rng.integers(0, CLASSES, images)] += 2.0
        noise = np.exp(rng.normal(np.log(0.8), 0.25, models))
        self.pred = (scores[None] + noise[:, None, None] * rng.normal(0, 1, (models, images, CLASSES))).argmax(-1)
        shared = rng.normal(0, 1, (images, FEATURES)) * np.linspace(2.0, 0.3, FEATURES)
        spread = np.exp(rng.normal(np.log(1.0), 0.3, models))
        self.features = shared[None] + spread[:, None, None] * rng.normal(0, 1, (models, images, FEATURES))

    def top1(self, k: int) -> Jackknife:
        return grouped_mean(self.correct[k], self.groups)

    def agreement(self, j: int, k: int) -> Jackknife:
        return grouped_mean((self.pred[j] == self.pred[k]).astype(float), self.groups)

    def cka(self, j: int, k: int) -> Jackknife:
        acc = MinibatchCKA()
        for start in range(0, self.features.shape[1], self.batch):
            acc.update(self.features[j, start:start + self.batch], self.features[k, start:start + self.batch])
        return acc.jackknife(self.G)


def flags(value: Jackknife, null: Null, old_null: list[Jackknife]) -> tuple[bool, bool, bool]:
    """The study's rule, the same bound with the images' standard error added (the issue's first
    candidate), and the old rule, on one value (higher is better)."""
    v = verdict(value, null, True, ALPHA)
    with_images = False
    if v["testable"]:
        t = scipy_stats.t.ppf(1 - ALPHA, null.seeds - 1)
        scale = math.sqrt(v["spread"] ** 2 * (1 + 1 / len(null.centre)) + (v["se_images"] or 0.0) ** 2)
        with_images = float(value.value) < v["centre"] - t * scale
    return v["worse"], with_images, old_rule(value, old_null, True)


def judge_zoo(zoo: Zoo, seeds: int, ladder: int) -> dict[str, list[tuple[bool, bool, bool]]]:
    """Per metric: the three rules' flags for each variant of the ladder."""
    out = {}
    values = [zoo.top1(k) for k in range(zoo.models)]
    null = Null(values[:seeds], values[:seeds], seeds)
    variants = range(seeds, seeds + ladder)
    out["top-1 (own metric)"] = [flags(values[v], null, values[:seeds]) for v in variants]
    for title, pair in (("agreement with FP32", zoo.agreement), ("linear CKA with FP32", zoo.cka)):
        centre = [pair(0, k) for k in range(1, seeds)]
        spread = centre + [pair(j, k) for j in range(1, seeds) for k in range(j + 1, seeds)]
        null = Null(centre, spread, seeds)
        out[title] = [flags(pair(0, v), null, spread) for v in variants]
    return out


def judge_pairs(rng: np.random.Generator, seeds: int, ladder: int, between: float,
                within: float) -> list[tuple[bool, bool, bool]]:
    """The pair model ``S(i, j) = a_i + a_j + e_ij`` without image noise (jackknives with no spread)."""
    a = rng.normal(0, between, seeds + ladder)

    def value(i: int, j: int) -> Jackknife:
        s = a[i] + a[j] + rng.normal(0, within)
        return Jackknife(s, np.full(2, s), 1)

    centre = [value(0, k) for k in range(1, seeds)]
    spread = centre + [value(j, k) for j in range(1, seeds) for k in range(j + 1, seeds)]
    null = Null(centre, spread, seeds)
    return [flags(value(0, v), null, spread) for v in range(seeds, seeds + ladder)]


def summarise(rows: list[list[tuple[bool, bool, bool]]]) -> dict[str, float]:
    """Rates over the zoos; each rate's s.e. from the zoos' own rates (the variants of one zoo share its seeds)."""
    levels = [f"level{i}" for i in range(len(rows[0]))]
    flagged = np.array(rows, dtype=float)  # [zoos, ladder, rule]
    out, zoos = {}, len(rows)
    for k, rule in enumerate(("new", "images", "old")):
        out[rule] = flagged[:, :, k].mean()
        out[f"{rule}_se"] = flagged[:, :, k].mean(1).std(ddof=1) / math.sqrt(zoos)
    # The new rules' reading: fixed-sequence testing; the old one's: the first flag met from the mildest level.
    for k, rule in enumerate(("new", "images")):
        fw = np.array([fixed_sequence(levels, dict(zip(levels, flagged[z, :, k])))[0] is not None
                       for z in range(zoos)], dtype=float)
        out[f"fw_{rule}"], out[f"fw_{rule}_se"] = fw.mean(), fw.std(ddof=1) / math.sqrt(zoos)
    out["fw_old"] = flagged[:, :, 2].any(1).mean()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replications", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 5])
    p.add_argument("--ladder", type=int, default=5)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    print(f"{args.replications} simulated zoos per K, a ladder of {args.ladder} null variants each, "
          f"{args.images} images (batches of {args.batch}, {args.groups} jackknife groups); rule at alpha = {ALPHA}")
    print("| metric | K | study's rule: flagged | family-wise over the ladder | with the images' s.e. added: flagged "
          "| family-wise | old band: flagged | old reading: family-wise |")
    print("|---|---|---|---|---|---|---|---|")
    for seeds in args.seeds:
        rng = np.random.default_rng([args.seed, seeds])
        results: dict[str, list] = {}
        for _ in range(args.replications):
            zoo = Zoo(rng, seeds + args.ladder, args.images, args.batch, args.groups)
            for metric, flags in judge_zoo(zoo, seeds, args.ladder).items():
                results.setdefault(metric, []).append(flags)
            for between, within in PAIR_MIXES:
                results.setdefault(f"pair model, sd between {between}, pair {within}", []).append(
                    judge_pairs(rng, seeds, args.ladder, between, within))
        for metric, rows in results.items():
            r = summarise(rows)
            print(f"| {metric} | {seeds} | {r['new']:.3f} ± {r['new_se']:.3f} | {r['fw_new']:.3f} ± {r['fw_new_se']:.3f} "
                  f"| {r['images']:.3f} ± {r['images_se']:.3f} | {r['fw_images']:.3f} ± {r['fw_images_se']:.3f} "
                  f"| {r['old']:.3f} | {r['fw_old']:.3f} |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
