"""Coverage of the 95% intervals on synthetic representations with known population values.

:class:`surgery.similarity.synthetic.SyntheticPair` (Gaussian rows, 4 positions per image,
correlated within an image) has closed-form linear CKA, SVCCA and PWCCA. Each replication draws
new images and builds every interval; the table gives the share of replications whose interval
holds the population value, for

- the delete-a-group jackknife the study uses (CKA over minibatches, CCA over moment groups);
- the percentile bootstrap over images it replaced (CCA refitted on images drawn with
  replacement, CKA on minibatches drawn with replacement), for comparison;

and the share of bootstrap intervals that miss their own point estimate. A nominal 95% interval
should cover about 95% (binomial standard error over R replications: sqrt(.95 .05 / R)).

``--regime report``: SVCCA and PWCCA in the study's regime instead,
:class:`surgery.similarity.synthetic.SpectrumPair` (512 channels with a power-law spectrum, 16
positions per image correlated by ``--within-image``, ``--rows-per-direction`` rows per
channel): the plug-in estimate, the jackknife bias-corrected one the study reports (SVCCA's kept
dimensions fixed from all images) and its interval, and the shuffled-images baseline; for PWCCA
both Morcos et al.'s (every direction, L1 weights) and the study's (SVCCA's subspaces, variance
weights: ``study.collect.PWCCA_KEEP``, ``PWCCA_WEIGHTS``).

Usage:
    python bench/bench_coverage.py [--replications 1000] [--images 320] [--batch 16] [--groups 20] [--boot 200]
    python bench/bench_coverage.py --regime report [--replications 100] [--rows-per-direction 8] [--within-image 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.collect import PWCCA_KEEP, PWCCA_WEIGHTS  # noqa: E402
from surgery.similarity.cca import CORRECTION_ERROR, MomentAccumulator, cca_scores, moments  # noqa: E402
from surgery.similarity.cka import MinibatchCKA  # noqa: E402
from surgery.similarity.stats import percentile_interval, resample_counts  # noqa: E402
from surgery.similarity.synthetic import SpectrumPair, SyntheticPair  # noqa: E402


def one(model: SyntheticPair, seed: int, images: int, batch: int, groups: int, boot: int) -> dict:
    x, y = model.sample(images, seed)
    cca, cka = MomentAccumulator(groups), MinibatchCKA()
    for k, (xb, yb) in enumerate(zip(x.split(batch), y.split(batch))):
        cca.update(xb.reshape(-1, 4), yb.reshape(-1, 4), k % groups, len(xb))
        cka.update(xb.flatten(1), yb.flatten(1))
    jk = {**cca.jackknife(), "cka": cka.jackknife(groups)}
    out = {f"jackknife {k}": (float(j.value), *map(float, j.interval())) for k, j in jk.items()}
    if boot:
        counts = resample_counts(images, boot, seed + 10**6)
        reps = []
        for c in counts:
            idx = torch.from_numpy(np.repeat(np.arange(images), c))
            reps.append(cca_scores(moments(x[idx].reshape(-1, 4), y[idx].reshape(-1, 4))))
        for m in ("svcca", "pwcca"):
            low, high = percentile_interval(np.array([r[m] for r in reps]), 0.95)
            out[f"bootstrap {m}"] = (float(jk[m].value), float(low), float(high))
        cross, sx, sy = cka.batch_values()
        b = resample_counts(len(cross), boot, seed + 2 * 10**6) / len(cross)
        from surgery.similarity.cka import _cka_from_means

        reps = _cka_from_means(*(np.tensordot(b, a, axes=1) for a in (cross, sx, sy)))[:, 0, 0]
        low, high = percentile_interval(reps, 0.95)
        out["bootstrap cka"] = (float(jk["cka"].value), float(low), float(high))
    return out


def report_regime(model: SpectrumPair, seed: int, images: int, batch: int, groups: int) -> dict:
    """One replication in the study's regime: ``{name: (estimate, low, high, truth)}``."""
    x, y = model.sample(images, seed)
    acc = MomentAccumulator(groups)
    for k, (xb, yb) in enumerate(zip(x.split(batch), y.split(batch))):
        shifted = torch.cat([yb[-1:], yb[:-1]])  # each image paired with the previous one: the shuffled baseline
        acc.update(xb.reshape(-1, model.channels), yb.reshape(-1, model.channels), k % groups, len(xb),
                   shifted.reshape(-1, model.channels))
    out = {}
    for shuffled in (False, True):
        jks = acc.jackknife(shuffled=shuffled)  # PWCCA as Morcos et al.
        jks["pwcca (study)"] = acc.jackknife(("pwcca",), pwcca_keep=PWCCA_KEEP, pwcca_weights=PWCCA_WEIGHTS,
                                             shuffled=shuffled)["pwcca"]
        for m, jk in jks.items():
            truth = 0.0 if shuffled else model.svcca(jk.extra["kept"]) if m == "svcca" else \
                model.pwcca() if m == "pwcca" else model.pwcca(jk.extra["kept"], PWCCA_WEIGHTS)
            tag = f"{m}{' shuffled' if shuffled else ''}"
            low, high = jk.interval()
            out[f"{tag}, plug-in"] = (float(jk.value), float(low), float(high), truth)
            corrected = jk.bias_corrected(acc.group_rows, CORRECTION_ERROR[m.split()[0]])
            low, high = corrected.interval()
            out[f"{tag}, bias-corrected"] = (float(corrected.value), float(low), float(high), truth)
    return out


def main_report(args: argparse.Namespace) -> None:
    model = SpectrumPair(within_image=args.within_image)
    images = args.rows_per_direction * model.channels // model.positions
    start = time.perf_counter()
    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    for seed in range(args.replications):
        for k, v in report_regime(model, seed, images, args.batch, args.groups).items():
            rows.setdefault(k, []).append(v)
    print(f"{args.replications} replications, {model.channels} channels, {images} images x {model.positions} positions "
          f"({args.rows_per_direction} rows per direction; within-image correlation {args.within_image}), batches of "
          f"{args.batch}, {args.groups} jackknife groups; {time.perf_counter() - start:.0f} s")
    print("| estimate | population | mean estimate | bias | s.d. | mean 95% half-width / 1.96 | coverage |")
    print("|---|---|---|---|---|---|---|")
    for k, values in rows.items():
        v = np.array(values)
        err = v[:, 0] - v[:, 3]
        cover = np.mean((v[:, 1] <= v[:, 3]) & (v[:, 3] <= v[:, 2]))
        print(f"| {k} | {v[:, 3].mean():.4f} | {v[:, 0].mean():.4f} | {err.mean():+.4f} | {err.std():.4f} | "
              f"{np.mean(v[:, 2] - v[:, 1]) / 2 / 1.96:.4f} | {cover:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", choices=("synthetic", "report"), default="synthetic")
    p.add_argument("--replications", type=int, default=1000)
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--groups", type=int, default=20)
    p.add_argument("--boot", type=int, default=200, help="bootstrap replicates (0: jackknife only)")
    p.add_argument("--rows-per-direction", type=int, default=8, help="--regime report: rows per channel")
    p.add_argument("--within-image", type=float, default=0.0, help="--regime report: correlation of an image's rows")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.regime == "report":
        main_report(args)
        return
    model = SyntheticPair()
    truth = {"cka": model.cka, "svcca": model.svcca, "pwcca": model.pwcca}
    start = time.perf_counter()
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for seed in range(args.replications):
        for k, v in one(model, seed, args.images, args.batch, args.groups, args.boot).items():
            rows.setdefault(k, []).append(v)
    se = (0.95 * 0.05 / args.replications) ** 0.5
    print(f"{args.replications} replications, {args.images} images x {model.positions} positions, batches of "
          f"{args.batch}, {args.groups} jackknife groups, {args.boot} bootstrap replicates; "
          f"{time.perf_counter() - start:.0f} s; binomial s.e. of a 95% coverage: {se:.3f}")
    print(f"{'interval':<18} {'population':>10} {'mean est.':>10} {'coverage':>9} {'misses own est.':>16} {'mean width':>11}")
    for k, values in sorted(rows.items()):
        v = np.array(values)
        t = truth[k.split()[1]]
        cover = np.mean((v[:, 1] <= t) & (t <= v[:, 2]))
        miss = np.mean((v[:, 0] < v[:, 1]) | (v[:, 0] > v[:, 2]))
        print(f"{k:<18} {t:>10.4f} {v[:, 0].mean():>10.4f} {cover:>9.3f} {miss:>16.3f} {np.mean(v[:, 2] - v[:, 1]):>11.4f}")


if __name__ == "__main__":
    main()
