"""Per-class damage: the classes a compressed network hurts more than it hurts itself as a whole.

Hooker, Courville, Clark, Dauphin & Frome (2019, "What Do Compressed Deep Neural Networks
Forget?") call a class impacted when its recall changes *more than the model's overall
accuracy does*, beyond what retraining alone does to it. A class is **hurt** here when both hold:

1. **More than the rest, on the same images.** Per image, the change from FP32 to the variant
   is -1 (right under FP32 only), +1 (right under the variant only) or 0. Given those changes,
   the class's images should look like a random draw of its size from all images; the exact
   conditional (permutation) test of the class's total change against that draw, one-sided,
   mid-p (Lancaster 1961), Holm-corrected over the classes. An even drop over every class flags
   none; one class damaged beyond the rest flags that class.
2. **Beyond retraining.** The class's relative recall (its recall minus the other classes')
   lies below the FP32 seeds' prediction bound (:func:`study.null.verdict`): classes that any
   new seed moves a lot are not blamed on compression.

The *detectable drop* of a class is the fewest of its images that must be lost (none gained,
the other classes as observed) for (1) to pass Holm's first step over ten classes: with 25
images a class, 2 when no other image changes, 4 to 7 when 5 to 20 other images change each way.

Also: the recall change per class with the Bonett & Price (2012) adjusted Wald interval for
paired proportions; compression-identified exemplars (Hooker et al.: wrong under the variant,
right under every FP32 seed); recall distortion (Good et al. 2022, "Recall distortion in neural
network pruning and the undecayed pruning algorithm", NeurIPS: the slope of a class's recall
change on its FP32 recall, jackknife interval; noise in the FP32 recall alone gives a negative
slope, so each FP32 seed's slope is beside it); with several seeds per arm, Welch's t per class
on the relative recall (NaN where both arms have no variance: the test is undefined).

Example:
    >>> p = relative_change_p(hurt=12, helped=0, n=25, hurt_rest=10, helped_rest=9, n_rest=225)
    >>> holm([0.01, 0.04, 0.3])
    [0.03, 0.08, 0.3]
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special
from scipy import stats as scipy_stats

from study.measurements import Study
from study.null import Null, verdict
from study.zoo import REFERENCE
from surgery.similarity import Estimate, Jackknife
from surgery.variants import parse_variant


def _log_choose(n: np.ndarray | int, k: np.ndarray | int) -> np.ndarray:
    return special.gammaln(np.asarray(n) + 1.0) - special.gammaln(np.asarray(k) + 1.0) - \
        special.gammaln(np.asarray(n) - np.asarray(k) + 1.0)


def relative_change_p(hurt: int, helped: int, n: int, hurt_rest: int, helped_rest: int, n_rest: int) -> float:
    """One-sided mid-p: is the class's change (``helped - hurt`` of its ``n`` images) below what a
    random draw of ``n`` images from all of them gives, the other classes holding the rest?

    Exact: the draw's numbers of -1s and +1s follow the multivariate hypergeometric distribution
    of all images' changes (``hurt + hurt_rest`` of -1, ``helped + helped_rest`` of +1, zeros).
    """
    total, minus, plus = n + n_rest, hurt + hurt_rest, helped + helped_rest
    zeros = total - minus - plus
    km = np.arange(min(minus, n) + 1)[:, None]
    kp = np.arange(min(plus, n) + 1)[None, :]
    kz = n - km - kp
    valid = (kz >= 0) & (kz <= zeros)
    log_p = _log_choose(minus, km) + _log_choose(plus, kp) + _log_choose(zeros, np.clip(kz, 0, None)) - \
        _log_choose(total, n)
    pmf = np.where(valid, np.exp(np.where(valid, log_p, -np.inf)), 0.0)
    change = kp - km
    observed = helped - hurt
    return float(min(1.0, pmf[change < observed].sum() + 0.5 * pmf[change == observed].sum()))


def detectable_loss(n: int, hurt_rest: int, helped_rest: int, n_rest: int, alpha: float, tests: int) -> int | None:
    """The fewest images of a class of ``n`` that must be lost, none gained, for its Holm-corrected
    p over ``tests`` classes to fall below ``alpha`` (None: no loss is enough)."""
    for k in range(1, n + 1):
        if tests * relative_change_p(k, 0, n, hurt_rest, helped_rest, n_rest) < alpha:
            return k
    return None


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error over the list); NaN (untestable) stays NaN
    and does not count as a test."""
    tested = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(tested, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (len(tested) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def paired_difference(hurt: int, helped: int, n: int, confidence: float) -> Estimate:
    """Recall change ``(helped - hurt) / n`` with the Bonett-Price adjusted Wald interval."""
    z = scipy_stats.norm.ppf((1 + confidence) / 2)
    value = (helped - hurt) / n
    p12, p21 = (helped + 1) / (n + 2), (hurt + 1) / (n + 2)
    centre = p12 - p21
    half = z * math.sqrt(max(p12 + p21 - centre ** 2, 0.0) / (n + 2))
    # The adjusted centre shrinks towards 0; the half-width always covers the shift (see tests).
    return Estimate(value, max(-1.0, min(centre - half, value)), min(1.0, max(centre + half, value)), n, "image",
                    confidence, "Bonett-Price", 0)


def per_class(labels: np.ndarray, right_ref: np.ndarray, right: np.ndarray, num_classes: int,
              confidence: float = 0.95) -> list[dict]:
    """Per class: recalls, the change with its interval, the change beyond the other classes', the
    exact test of (1) in the module docstring, its Holm correction and the detectable drop."""
    alpha = 1 - confidence
    hurt_all = right_ref & ~right
    helped_all = ~right_ref & right
    rows = []
    for c in range(num_classes):
        mine = labels == c
        n, n_rest = int(mine.sum()), int((~mine).sum())
        if n == 0:
            rows.append({"class": c, "images": 0})
            continue
        hurt, helped = int(hurt_all[mine].sum()), int(helped_all[mine].sum())
        hurt_rest, helped_rest = int(hurt_all[~mine].sum()), int(helped_all[~mine].sum())
        rest_change = (helped_rest - hurt_rest) / n_rest if n_rest else 0.0
        rows.append({"class": c, "images": n, "recall_fp32": float(right_ref[mine].mean()),
                     "recall": float(right[mine].mean()), "hurt": hurt, "helped": helped,
                     "change": paired_difference(hurt, helped, n, confidence).to_dict(),
                     "beyond_rest": round((helped - hurt) / n - rest_change, 6),
                     "p": relative_change_p(hurt, helped, n, hurt_rest, helped_rest, n_rest) if n_rest else math.nan,
                     "rest": (hurt_rest, helped_rest, n_rest)})
    tested = [r for r in rows if r["images"]]
    for r, p in zip(tested, holm([r["p"] for r in tested])):
        hurt_rest, helped_rest, n_rest = r.pop("rest")
        lost = detectable_loss(r["images"], hurt_rest, helped_rest, n_rest, alpha, len(tested)) if n_rest else None
        r["p_holm"] = p
        r["detectable_drop"] = None if lost is None else round(lost / r["images"], 6)
        r["hurt_more"] = bool(p < alpha)
    return rows


def _recalls(labels: np.ndarray, right: np.ndarray, groups: np.ndarray, num_classes: int, G: int) -> Jackknife:
    """Per-class recall ``[C]`` and its leave-one-group-out values ``[G, C]``."""
    hits = np.zeros((G, num_classes))
    counts = np.zeros((G, num_classes))
    np.add.at(hits, (groups, labels), right.astype(np.float64))
    np.add.at(counts, (groups, labels), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = hits.sum(0) / counts.sum(0)
        leave_out = (hits.sum(0) - hits) / (counts.sum(0) - counts)
    return Jackknife(value, leave_out, len(labels))


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0:
        return math.nan
    return float(np.polyfit(x, y, 1)[0])


def recall_distortion(labels, right_ref, right, groups, num_classes: int, G: int, confidence: float) -> dict | None:
    """Slope of the per-class recall change on the FP32 recall, with its jackknife interval."""
    base = _recalls(labels, right_ref, groups, num_classes, G)
    other = _recalls(labels, right, groups, num_classes, G)
    value = _slope(base.value, other.value - base.value)
    leave_out = np.array([_slope(b, o - b) for b, o in zip(base.leave_out, other.leave_out)])
    if not np.isfinite(value):
        return None
    return Jackknife(value, leave_out, len(labels)).estimate(confidence).to_dict()


def relative_recalls(labels: np.ndarray, right: np.ndarray, groups: np.ndarray, num_classes: int,
                     G: int) -> Jackknife:
    """Per class, recall minus the recall of the other classes' images (``[C]``), as a jackknife."""
    hits = np.zeros((G, num_classes))
    counts = np.zeros((G, num_classes))
    np.add.at(hits, (groups, labels), right.astype(np.float64))
    np.add.at(counts, (groups, labels), 1.0)

    def relative(h: np.ndarray, c: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return h / c - (h.sum(-1, keepdims=True) - h) / (c.sum(-1, keepdims=True) - c)

    return Jackknife(relative(hits.sum(0), counts.sum(0)),
                     relative(hits.sum(0) - hits, counts.sum(0) - counts), len(labels))


def _relative(study: Study, name: str) -> Jackknife:
    a = study.shards[name].arrays
    return relative_recalls(a["label"].astype(int), a["correct"].astype(bool), study.groups, study.num_classes,
                            study.G)


def welch(study: Study, rung: str, num_classes: int, confidence: float) -> dict | None:
    """Welch's t per class between the FP32 seeds' and the rung's seeds' relative recalls (Hooker et al.)."""
    arm = [n for n in study.shards if parse_variant(n).base == rung]
    if len(arm) < 2 or len(study.seeds) < 2:
        return None
    base = np.stack([_relative(study, n).value for n in study.seeds])
    comp = np.stack([_relative(study, n).value for n in arm])
    rows = []
    for c in range(num_classes):
        a, b = base[:, c], comp[:, c]
        if np.all(a == a[0]) and np.all(b == b[0]):
            p = math.nan  # no variance in either arm: t is undefined
        else:
            p = float(scipy_stats.ttest_ind(b, a, equal_var=False).pvalue)
        rows.append({"class": c, "relative_fp32_mean": float(a.mean()), "relative_mean": float(b.mean()), "p": p})
    for r, p in zip(rows, holm([r["p"] for r in rows])):
        r["p_holm"] = p
        r["hurt_significantly"] = bool(p < 1 - confidence and r["relative_mean"] < r["relative_fp32_mean"])
    return {"fp32_models": study.seeds, "compressed_models": arm, "classes": rows}


def exemplars(study: Study, name: str) -> list[int]:
    """Stream positions the compressed model gets wrong while every FP32 seed gets them right."""
    right_seeds = np.all([study.shards[s].arrays["correct"].astype(bool) for s in study.seeds], axis=0)
    wrong = ~study.shards[name].arrays["correct"].astype(bool)
    return np.flatnonzero(right_seeds & wrong).tolist()


def class_damage(study: Study) -> dict:
    """Per compressed variant (and per FP32 seed, against ``fp32``): the tables of the module docstring."""
    confidence = study.confidence
    alpha = 1 - confidence
    ref = study.shards[REFERENCE].arrays
    labels, right_ref = ref["label"].astype(int), ref["correct"].astype(bool)
    num_classes = study.num_classes
    seeds = {s: _relative(study, s) for s in study.seeds}
    out = {}
    for name in [*study.seeds[1:], *study.compressed]:
        right = study.shards[name].arrays["correct"].astype(bool)
        rows = per_class(labels, right_ref, right, num_classes, confidence)
        compressed = name in study.compressed
        if compressed:
            relative = _relative(study, name)
            for r in rows:
                if r["images"]:
                    null = [j[r["class"]] for j in seeds.values() if np.isfinite(j.value[r["class"]])]
                    v = verdict(relative[r["class"]], Null(null, null, len(null)), True, alpha, confidence)
                    r["seed_rule"] = {k: v[k] for k in ("testable", "side", "worse", "bound", "centre") if k in v}
                    r["hurt_significantly"] = bool(r["hurt_more"] and v["worse"])
        entry = {"classes": rows, "hurt_more": [r["class"] for r in rows if r.get("hurt_more")],
                 "hurt": [r["class"] for r in rows if r.get("hurt_significantly")],
                 "recall_distortion": recall_distortion(labels, right_ref, right, study.groups, num_classes,
                                                        study.G, confidence)}
        if compressed:
            entry["exemplars"] = exemplars(study, name)
            if parse_variant(name).seed == 0:
                entry["welch"] = welch(study, name, num_classes, confidence)
        out[name] = entry
    return out
