"""Per-class damage: which classes a compressed network forgets (Hooker et al. 2019; Good et al. 2022).

- Per class, the recall change against FP32 on the same images, with the Bonett & Price (2012)
  adjusted Wald interval for a difference of paired proportions, and McNemar's test on that
  class's images (exact binomial on the discordant pairs, mid-p: Fagerland, Lydersen & Laake
  2013, "The McNemar test for binary matched-pairs data: mid-p and asymptotic are better than
  exact conditional", BMC Med. Res. Methodol.). P-values are Holm-corrected over the classes;
  a class is *significantly hurt* when its recall fell and its corrected p < 1 - confidence.
- With several seeds per arm (FP32 seeds vs seeds of the compressed rung), Hooker et al.'s own
  test: Welch's t on the per-class recalls of the models of each arm, Holm-corrected too.
- Compression-identified exemplars (Hooker et al.): images the compressed model gets wrong
  while every FP32 seed gets them right.
- Recall distortion (Good et al. 2022, "Recall distortion in neural network pruning and the
  undecayed pruning algorithm", NeurIPS): the least-squares slope of a class's recall change on
  its FP32 recall, with a jackknife interval over image groups. Noise in the FP32 recall alone
  gives a negative slope (regression to the mean), so the same slope of each FP32 seed against
  FP32 is reported beside it as the null.

Example:
    >>> p = mcnemar_midp(hurt=12, helped=2)
    >>> holm([0.01, 0.04, 0.3])
    [0.03, 0.08, 0.3]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats as scipy_stats

from study.zoo import REFERENCE
from surgery.similarity import Estimate, Jackknife
from surgery.variants import parse_variant

if TYPE_CHECKING:
    from study.gather import Study


def mcnemar_midp(hurt: int, helped: int) -> float:
    """Two-sided mid-p McNemar test: ``hurt`` images right under FP32 only, ``helped`` the reverse."""
    n = hurt + helped
    if n == 0:
        return 1.0
    k = min(hurt, helped)
    p = 2 * (scipy_stats.binom.cdf(k, n, 0.5) - 0.5 * scipy_stats.binom.pmf(k, n, 0.5))
    return float(min(1.0, p))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error over the list)."""
    m = len(pvalues)
    order = np.argsort(pvalues, kind="stable")
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
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
    """Per class: recalls, the change with its interval, McNemar's mid-p and its Holm correction."""
    rows = []
    for c in range(num_classes):
        mine = labels == c
        n = int(mine.sum())
        if n == 0:
            rows.append({"class": c, "images": 0})
            continue
        hurt = int((right_ref[mine] & ~right[mine]).sum())
        helped = int((~right_ref[mine] & right[mine]).sum())
        rows.append({"class": c, "images": n, "recall_fp32": float(right_ref[mine].mean()),
                     "recall": float(right[mine].mean()), "hurt": hurt, "helped": helped,
                     "change": paired_difference(hurt, helped, n, confidence).to_dict(),
                     "p": mcnemar_midp(hurt, helped)})
    tested = [r for r in rows if r["images"]]
    for r, p in zip(tested, holm([r["p"] for r in tested])):
        r["p_holm"] = p
        r["hurt_significantly"] = bool(p < 1 - confidence and r["hurt"] > r["helped"])
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


def welch(study: "Study", rung: str, num_classes: int, confidence: float) -> dict | None:
    """Welch's t per class between the FP32 seeds' recalls and the rung's seeds' recalls (Hooker et al.)."""
    arm = [n for n in study.shards if parse_variant(n).base == rung]
    if len(arm) < 2 or len(study.seeds) < 2:
        return None

    def recalls(name: str) -> np.ndarray:
        a = study.shards[name].arrays
        labels, right = a["label"].astype(int), a["correct"].astype(bool)
        return np.array([right[labels == c].mean() if (labels == c).any() else np.nan for c in range(num_classes)])

    base = np.stack([recalls(n) for n in study.seeds])
    comp = np.stack([recalls(n) for n in arm])
    rows = []
    for c in range(num_classes):
        a, b = base[:, c], comp[:, c]
        if np.all(a == a[0]) and np.all(b == b[0]):
            p = 1.0 if a[0] == b[0] else 0.0  # no variance in either arm: t is undefined
        else:
            p = float(scipy_stats.ttest_ind(b, a, equal_var=False).pvalue)
        rows.append({"class": c, "recall_fp32_mean": float(a.mean()), "recall_mean": float(b.mean()), "p": p})
    for r, p in zip(rows, holm([r["p"] for r in rows])):
        r["p_holm"] = p
        r["hurt_significantly"] = bool(p < 1 - confidence and r["recall_mean"] < r["recall_fp32_mean"])
    return {"fp32_models": study.seeds, "compressed_models": arm, "classes": rows}


def exemplars(study: "Study", name: str) -> list[int]:
    """Stream positions the compressed model gets wrong while every FP32 seed gets them right."""
    right_seeds = np.all([study.shards[s].arrays["correct"].astype(bool) for s in study.seeds], axis=0)
    wrong = ~study.shards[name].arrays["correct"].astype(bool)
    return np.flatnonzero(right_seeds & wrong).tolist()


def class_damage(study: "Study") -> dict:
    """Per compressed variant (and per FP32 seed, as the null): the tables of the module docstring."""
    confidence = study.settings["confidence"]
    ref = study.shards[REFERENCE].arrays
    labels, right_ref = ref["label"].astype(int), ref["correct"].astype(bool)
    num_classes = study.num_classes
    out = {}
    for name in [*study.seeds[1:], *study.compressed]:
        right = study.shards[name].arrays["correct"].astype(bool)
        rows = per_class(labels, right_ref, right, num_classes, confidence)
        entry = {"classes": rows, "hurt": [r["class"] for r in rows if r.get("hurt_significantly")],
                 "recall_distortion": recall_distortion(labels, right_ref, right, study.groups, num_classes,
                                                        study.G, confidence)}
        if name in study.compressed:
            entry["exemplars"] = exemplars(study, name)
            if parse_variant(name).seed == 0:
                entry["welch"] = welch(study, name, num_classes, confidence)
        out[name] = entry
    return out
