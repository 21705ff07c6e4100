"""Shards -> the study: the seed null, the dose-response reading, and the layer-matching check.

Every statistic is a :class:`surgery.similarity.Jackknife` over the same ``G`` groups of images
(batch ``k`` in group ``k % G``), so contrasts between variants on the same images get their
own intervals.

**The seed null.** For a metric of one model (top-1, pointing game, deletion AUC...) the null
is the FP32 seeds' values; for a comparison with FP32 (agreement, map correlation, CKA and
SVCCA/PWCCA per block) it is every pairwise FP32-vs-FP32 comparison. A compressed variant is
*worse than the band* when both hold:

1. the paired contrast (variant) - (mean of the null values), on the same images, has a
   jackknife interval that excludes 0 on the bad side;
2. its point value lies outside the range of the null values (the band drawn), on the bad side.

(1) accounts for the images, (2) for the spread between seeds, which with K seeds is known only
from K (or K(K-1)/2) values: no interval for the seed-to-seed variance is claimed.

Example:
    >>> metrics = gather([Shard.load(p) for p in find_shards([Path("shards")])])
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from study.classes import class_damage
from study.shard import Shard
from study.zoo import REFERENCE
from surgery.registry import get_family
from surgery.similarity import Jackknife, MinibatchCKA, group_of, grouped_mean
from surgery.similarity.cca import CCA_METHODS
from surgery.variants import parse_variant, sort_variants

MAP_METHODS = ("gradcam", "saliency")
# name -> (title, higher is better)
SINGLE = {"top1": ("top-1 accuracy", True)}
for _m in MAP_METHODS:
    SINGLE.update({f"{_m}.pointing_game": (f"{_m} pointing game", True),
                   f"{_m}.pointing_game_tolerant": (f"{_m} pointing game (tolerant)", True),
                   f"{_m}.energy_in_mask": (f"{_m} energy in mask", True),
                   f"{_m}.deletion_auc": (f"{_m} deletion AUC", False),
                   f"{_m}.insertion_auc": (f"{_m} insertion AUC", True)})
REPRESENTATIONS = ("cka",) + CCA_METHODS


class Study:
    """The shards of one study, checked to share settings and images."""

    def __init__(self, shards: list[Shard]) -> None:
        if not shards:
            raise ValueError("no shards to gather")
        first = shards[0].meta
        for sh in shards:
            for key in ("settings_digest", "images_digest", "family"):
                if sh.meta[key] != first[key]:
                    raise ValueError(f"shard {sh.name} was measured with other {key.split('_')[0]} than "
                                     f"{shards[0].name}: collect every shard with the same settings")
        self.shards = {sh.name: sh for sh in shards}
        names = sort_variants(self.shards)
        self.shards = {n: self.shards[n] for n in names}
        if REFERENCE not in self.shards:
            raise ValueError(f"no {REFERENCE} shard among {', '.join(names)}")
        self.settings = first["settings"]
        self.n = first["images"]
        self.blocks = first["blocks"]
        family = get_family(first["family"])
        self.num_classes = family.num_classes
        self.G = self.settings["groups"]
        self.batch = self.settings["batch_size"]
        self.groups = group_of(np.arange(self.n), self.G, self.batch)
        self.seeds = [n for n in names if parse_variant(n).kind == "fp32"]
        self.compressed = [n for n in names if parse_variant(n).kind != "fp32"]
        # A pretrained FP32 used as it is has no seeds: with no other training run there is no null,
        # and no variant is said to differ from retraining.
        self.no_null = None if family.has_fp32_seeds or len(self.seeds) > 1 else (
            f"The FP32 model of {family.name} is torchvision's pretrained {family.pretrained}, used as it is: it has "
            "no seeds, and this zoo holds no other training run (fp32-recipe1), so there is no null and no "
            "variant is said to differ from retraining.")
        for sh in shards:
            for ref in sh.meta["references"]:
                if ref in self.shards and sh.meta["reference_sha256"][ref] != self.shards[ref].meta["weights_sha256"]:
                    raise ValueError(f"shard {sh.name} compared with other {ref} weights than the {ref} shard")

    # -- statistics as jackknives --------------------------------------------------------------

    def single(self, name: str, metric: str) -> Jackknife | None:
        a = self.shards[name].arrays
        key = "correct" if metric == "top1" else metric
        if key not in a:
            return None
        if key.endswith(("deletion_auc", "insertion_auc")):
            positions = a["deletion.position"].astype(int)
            return grouped_mean(a[key], self.groups[positions])
        return grouped_mean(a[key], self.groups)

    def comparison_keys(self, name: str, ref: str) -> list[str]:
        a = self.shards[name].arrays
        per_image = sorted(k[len(ref) + 1:] for k in a if k.startswith(f"{ref}.") and a[k].ndim == 1
                           and a[k].shape[0] == self.n)
        return per_image + [f"{m}.{b}" for m in REPRESENTATIONS for b in self.blocks]

    def comparison(self, name: str, ref: str, metric: str) -> Jackknife | None:
        """``metric`` of ``name`` against ``ref`` (a per-image score, or ``cka.<block>`` etc.)."""
        a = self.shards[name].arrays
        if ref not in self.shards[name].meta["references"]:
            return None
        method, _, block = metric.partition(".")
        if method in REPRESENTATIONS and block in self.blocks:
            i = self.blocks.index(block)
            if method == "cka":
                acc = self._cka(name, ref)
                return acc[i, i] if acc is not None else None
            return Jackknife(a[f"{ref}.{method}.value"][i], a[f"{ref}.{method}.leave_out"][:, i], self.n)
        key = f"{ref}.{metric}"
        return grouped_mean(a[key], self.groups) if key in a else None

    def _cka(self, name: str, ref: str) -> Jackknife | None:
        a = self.shards[name].arrays
        if f"{ref}.cka.cross" not in a:
            return None
        acc = MinibatchCKA.from_batch_values(a[f"{ref}.cka.cross"], a[f"{ref}.cka.self_x"], a[f"{ref}.cka.self_y"],
                                             int(a[f"{ref}.cka.images"]))
        return acc.jackknife(self.G)

    def seed_pairs(self) -> list[tuple[str, str]]:
        """Every FP32-vs-FP32 pair measured (``(reference, other)``)."""
        return [(a, b) for a, b in combinations(self.seeds, 2) if a in self.shards[b].meta["references"]]


def _estimate(jk: Jackknife | None, confidence: float) -> dict | None:
    return None if jk is None else jk.estimate(confidence).to_dict()


def verdict(value: Jackknife, null: list[Jackknife], higher_is_better: bool, confidence: float) -> dict:
    """Where a variant's value lies against the seed null (see the module docstring)."""
    if not null:
        return {"null": 0, "contrast": None, "band": None, "side": None, "worse": False, "outside": False}
    contrast = value - Jackknife.mean(null)
    c = contrast.estimate(confidence)
    band = [min(float(n.value) for n in null), max(float(n.value) for n in null)]
    v = float(value.value)
    side = None
    if c.excludes(0.0):
        if c.low > 0 and v > band[1]:
            side = "above"
        elif c.high < 0 and v < band[0]:
            side = "below"
    worse = side == ("below" if higher_is_better else "above")
    return {"null": len(null), "contrast": c.to_dict(), "band": [round(b, 6) for b in band], "side": side,
            "worse": worse, "outside": side is not None}


def metric_table(study: Study, confidence: float) -> dict:
    """Every metric of every variant with its interval, the null band and the verdict."""
    out = {}
    pairs = study.seed_pairs()
    for metric, (title, better) in SINGLE.items():
        null = [j for j in (study.single(s, metric) for s in study.seeds) if j is not None and not study.no_null]
        rows = {}
        for name in study.shards:
            jk = study.single(name, metric)
            if jk is None or not np.isfinite(jk.value):
                continue
            rows[name] = {"estimate": _estimate(jk, confidence),
                          **({"verdict": verdict(jk, null, better, confidence)} if name in study.compressed else {})}
        if rows:
            out[metric] = {"title": title, "higher_is_better": better, "kind": "single",
                           "null_values": {s: round(float(j.value), 6) for s, j in zip(study.seeds, null)},
                           "variants": rows}
    keys = study.comparison_keys(study.compressed[0], REFERENCE) if study.compressed else \
        (study.comparison_keys(pairs[0][1], pairs[0][0]) if pairs else [])
    for metric in keys:
        null_items = [(f"{a} vs {b}", study.comparison(b, a, metric)) for a, b in pairs]
        null_items = [(k, j) for k, j in null_items if j is not None and np.isfinite(j.value)]
        null = [j for _, j in null_items]
        rows = {}
        for name in study.compressed:
            jk = study.comparison(name, REFERENCE, metric)
            if jk is None or not np.isfinite(jk.value):
                continue
            rows[name] = {"estimate": _estimate(jk, confidence), "verdict": verdict(jk, null, True, confidence)}
        out[f"vs_fp32.{metric}"] = {
            "title": metric.replace("_", " ") + " with FP32", "higher_is_better": True, "kind": "comparison",
            "null_values": {k: round(float(j.value), 6) for k, j in null_items},
            "null_estimates": {k: _estimate(j, confidence) for k, j in null_items}, "variants": rows}
    return out


def dose_response(study: Study, table: dict) -> dict:
    """Per compression axis: the levels, each metric's points and the first level worse than the band."""
    levels = {"quantized": [], "sparse": []}
    for name in study.compressed:
        spec = parse_variant(name)
        if spec.seed == 0:
            levels[spec.kind].append(name)
    out = {}
    for axis, names in levels.items():
        if not names:
            continue
        names = sort_variants(names)
        metrics = {}
        for metric, entry in table.items():
            points = [n for n in names if n in entry["variants"]]
            if not points:
                continue
            first = next((n for n in points if entry["variants"][n].get("verdict", {}).get("worse")), None)
            metrics[metric] = {"levels": points, "first_worse": first}
        out[axis] = {"levels": names, "x": [_level(n) for n in names], "metrics": metrics}
    return out


def _level(name: str) -> float:
    spec = parse_variant(name)
    return float(spec.weight_bits) if spec.kind == "quantized" else round(spec.sparsity * 100, 6)


def layer_matching(study: Study) -> dict:
    """Kornblith et al. (2019, Table 2): is each block's most similar block in another FP32 seed the same block?

    Both directions of every seed pair count (rows: blocks of the first network, columns: of
    the second). CKA on every study image; SVCCA/PWCCA on ``match_images`` of them.
    """
    out = {m: {"hits": 0, "total": 0} for m in REPRESENTATIONS}
    for a, b in study.seed_pairs():
        arrays = study.shards[b].arrays
        matrices = {"cka": study._cka(b, a).value if study._cka(b, a) is not None else None}
        matrices.update({m: arrays.get(f"{a}.match.{m}") for m in CCA_METHODS})
        for m, values in matrices.items():
            if values is None:
                continue
            values = np.nan_to_num(np.asarray(values), nan=-np.inf)
            diagonal = np.arange(len(values))
            hits = int((values.argmax(1) == diagonal).sum() + (values.argmax(0) == diagonal).sum())
            out[m]["hits"] += hits
            out[m]["total"] += 2 * len(values)
    for m in out.values():
        m["rate"] = round(m["hits"] / m["total"], 6) if m["total"] else None
    out["pairs"] = [f"{a} vs {b}" for a, b in study.seed_pairs()]
    out["match_images"] = min(study.settings["match_images"], study.n)
    return out


def diagnostics(study: Study) -> dict:
    """Per compressed variant: weight sparsity and dead filters per layer, SQNR and clipping per block."""
    out = {}
    for name in study.compressed:
        sh = study.shards[name]
        a = sh.meta
        arrays = sh.arrays
        entry = {"weights": a["weights"], "bits": a["bits"], "blocks": {}}
        for i, block in enumerate(study.blocks):
            row = {}
            if "sqnr.signal" in arrays:
                signal, noise = float(arrays["sqnr.signal"][i]), float(arrays["sqnr.noise"][i])
                row["sqnr_db"] = round(10 * math.log10(signal / noise), 4) if noise > 0 else None
            if "clip.total" in arrays and arrays["clip.total"][i] > 0:
                row["clipped_fraction"] = round(float(arrays["clip.clipped"][i] / arrays["clip.total"][i]), 8)
            entry["blocks"][block] = row
        out[name] = entry
    return out


def gather(shards: list[Shard]) -> dict:
    """The study's ``metrics.json`` content (everything but the gallery pictures)."""
    study = Study(shards)
    confidence = study.settings["confidence"]
    table = metric_table(study, confidence)
    first = next(iter(study.shards.values())).meta
    return {
        "family": first["family"],
        "images": {"count": study.n, "source": first["source"], "digest": first["images_digest"]},
        "settings": study.settings,
        "variants": {n: {"kind": sh.meta["kind"], "title": sh.meta["title"], "weights_sha256": sh.meta["weights_sha256"],
                         "references": sh.meta["references"]} for n, sh in study.shards.items()},
        "seeds": study.seeds,
        "no_null": study.no_null,
        "seed_pairs": [f"{a} vs {b}" for a, b in study.seed_pairs()],
        "blocks": study.blocks,
        "interval": f"{confidence:.0%} delete-a-group jackknife over {study.G} groups of images "
                    f"(batches of {study.batch} modulo {study.G}), t with G-1 degrees of freedom",
        "metrics": table,
        "dose_response": dose_response(study, table),
        "classes": class_damage(study),
        "diagnostics": diagnostics(study),
        "instruments": {"layer_matching": layer_matching(study)},
    }
