"""Shards -> the study: the seed null, the dose-response reading, and the layer-matching check.

Statistics come from :class:`study.measurements.Study` (jackknives over the same groups of
images); verdicts from :mod:`study.null`:

- every metric of every compressed variant is judged against the FP32 seeds by the prediction
  bound of :func:`study.null.verdict` (false-positive rate ``1 - confidence`` per metric);
- along each compression axis, the first level worse than retraining is read by fixed-sequence
  testing (:func:`study.null.fixed_sequence`), family-wise at the same rate;
- the leave-one-seed-out check (:func:`study.null.null_check`) measures that rate on the zoo's
  own FP32 seeds;
- SVCCA and PWCCA are jackknife bias-corrected and reported beside a shuffled-images baseline,
  and only for blocks with at least :data:`~surgery.similarity.cca.ROWS_PER_DIRECTION_FLOOR` effective rows per direction.

Example:
    >>> metrics = gather([Shard.load(p) for p in find_shards([Path("shards")])])
"""

from __future__ import annotations

import math

import numpy as np

from study.classes import class_damage
from study.measurements import MAP_METHODS, REPRESENTATIONS, Study
from study.null import comparison_null, describe, fixed_sequence, null_check, single_null, verdict
from study.shard import Shard
from study.zoo import REFERENCE
from surgery.similarity import Jackknife, cca
from surgery.similarity.cca import CCA_METHODS, overfitting
from surgery.variants import parse_variant, sort_variants

# name -> (title, higher is better)
SINGLE = {"top1": ("top-1 accuracy", True)}
for _m in MAP_METHODS:
    SINGLE.update({f"{_m}.pointing_game": (f"{_m} pointing game", True),
                   f"{_m}.pointing_game_tolerant": (f"{_m} pointing game (tolerant)", True),
                   f"{_m}.energy_in_mask": (f"{_m} energy in mask", True),
                   f"{_m}.deletion_auc": (f"{_m} deletion AUC", False),
                   f"{_m}.insertion_auc": (f"{_m} insertion AUC", True)})


def _estimate(jk: Jackknife | None, confidence: float) -> dict | None:
    return None if jk is None else jk.estimate(confidence).to_dict()


def metric_table(study: Study) -> dict:
    """Every metric of every variant with its interval, the seed null and the verdict."""
    confidence = study.confidence
    alpha = 1 - confidence
    out = {}
    for metric, (title, better) in SINGLE.items():
        null = single_null(study, metric)
        rows = {}
        for name in study.compressed:
            jk = study.single(name, metric)
            if jk is not None and np.isfinite(jk.value):
                rows[name] = {"estimate": _estimate(jk, confidence), "verdict": verdict(jk, null, better, alpha, confidence)}
        seeds = {s: study.single(s, metric) for s in study.seeds}
        if rows or any(j is not None for j in seeds.values()):
            out[metric] = {"title": title, "higher_is_better": better, "kind": "single",
                           "null_values": {s: round(float(j.value), 6) for s, j in seeds.items()
                                           if j is not None and np.isfinite(j.value)},
                           "variants": rows}
    pairs = study.seed_pairs()
    keys = study.comparison_keys(study.compressed[0], REFERENCE) if study.compressed else \
        (study.comparison_keys(pairs[0][1], pairs[0][0]) if pairs else [])
    for metric in keys:
        null = comparison_null(study, metric)
        null_items = [(f"{a} vs {b}", study.comparison(b, a, metric)) for a, b in pairs]
        null_items = [(k, j) for k, j in null_items if j is not None and np.isfinite(j.value)]
        rows = {}
        for name in study.compressed:
            jk = study.comparison(name, REFERENCE, metric)
            if jk is None or not np.isfinite(jk.value):
                continue
            rows[name] = {"estimate": _estimate(jk, confidence), "verdict": verdict(jk, null, True, alpha, confidence)}
            if metric.split(".")[0] in CCA_METHODS:
                rows[name].update(_cca_extras(study, name, REFERENCE, metric))
        entry = {"title": metric.replace("_", " ") + " with FP32", "higher_is_better": True, "kind": "comparison",
                 "null_values": {k: round(float(j.value), 6) for k, j in null_items},
                 "null_estimates": {k: _estimate(j, confidence) for k, j in null_items}, "variants": rows}
        if metric.split(".")[0] in CCA_METHODS:
            entry["null_extras"] = {f"{a} vs {b}": _cca_extras(study, b, a, metric) for a, b in pairs
                                    if study.comparison(b, a, metric) is not None}
        if rows or null_items:
            out[f"vs_fp32.{metric}"] = entry
    return out


def _cca_extras(study: Study, name: str, ref: str, metric: str) -> dict:
    """Beside a bias-corrected SVCCA/PWCCA: the plug-in value, the shuffled-images baseline, the kept directions."""
    method, _, block = metric.partition(".")
    shuffled = study.comparison(name, ref, metric, shuffled=True)
    return {"plug_in": round(study.plug_in(name, ref, metric), 6), "kept": study.kept(name, ref, method, block),
            "shuffled": _estimate(shuffled, study.confidence),
            "shuffled_plug_in": round(study.plug_in(name, ref, metric, shuffled=True), 6)}


def dose_response(study: Study, table: dict) -> dict:
    """Per compression axis: the levels, each metric's points and the first level worse than retraining
    (fixed-sequence testing from the most compressed level, :func:`study.null.fixed_sequence`)."""
    levels = {"quantized": [], "sparse": []}
    for name in study.compressed:
        spec = parse_variant(name)
        if spec.seed == 0 and not spec.post_training:  # int8-ptq is int8's starting point, not another level
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
            worse = {n: entry["variants"][n]["verdict"]["worse"] for n in points}
            first, tested = fixed_sequence(names, worse)
            metrics[metric] = {"levels": points, "first_worse": first, "tested": tested}
        out[axis] = {"levels": names, "x": [_level(n) for n in names], "metrics": metrics}
    return out


def _level(name: str) -> float:
    spec = parse_variant(name)
    return float(spec.weight_bits) if spec.kind == "quantized" else round(spec.sparsity * 100, 6)


def layer_matching(study: Study) -> dict:
    """Kornblith et al. (2019, Table 2): is each block's most similar block in another FP32 seed the same block?

    Per seed pair, both directions (rows: blocks of the earlier seed, columns: of the later), with
    the argmax margin: the same-block value minus the best other block (negative where another
    block wins). CKA on every study image; SVCCA/PWCCA on ``match_images`` of them, every block
    pooled to one grid of positions and cut to the same number of directions
    (:data:`study.collect.MATCH_DIRECTIONS`), so that every candidate of one argmax has the same
    rows and directions.
    """
    per_pair, totals = {}, {m: {"hits": 0, "total": 0} for m in REPRESENTATIONS}
    for a, b in study.seed_pairs():
        arrays = study.shards[b].arrays
        matrices = {"cka": study.cka_matrix(b, a), **{m: arrays.get(f"{a}.match.{m}") for m in CCA_METHODS}}
        entry = {}
        for m, values in matrices.items():
            if values is None:
                continue
            entry[m] = _matching(np.asarray(values, dtype=np.float64))
            totals[m]["hits"] += entry[m]["hits"]
            totals[m]["total"] += entry[m]["total"]
        per_pair[f"{a} vs {b}"] = entry
    for m in totals.values():
        m["rate"] = round(m["hits"] / m["total"], 6) if m["total"] else None
    last = study.shards[study.seeds[-1]].arrays
    return {**totals, "pairs": per_pair, "match_images": min(study.settings["match_images"], study.n),
            **{key: int(last[f"match.{key}"]) if f"match.{key}" in last else None for key in ("grid", "directions")}}


def _matching(values: np.ndarray) -> dict:
    """Hits and argmax margins of a block x block similarity, by rows and by columns."""
    values = np.where(np.isfinite(values), values, -np.inf)
    margins = []
    for matrix in (values, values.T):
        for i, row in enumerate(matrix):
            others = np.delete(row, i)
            margins.append(float(row[i] - others.max()) if len(others) else math.inf)
    hits = sum(m > 0 for m in margins)
    return {"hits": int(hits), "total": len(margins), "margins": [round(m, 6) for m in margins],
            "median_margin": round(float(np.median(margins)), 6)}


def cca_overfitting(study: Study) -> dict:
    """Effective rows per canonical direction of every block's SVCCA/PWCCA, the floor, and the warnings."""
    found = study.cca_rows(study.compressed[0], REFERENCE) if study.compressed else None
    if found is None and study.seed_pairs():
        a, b = study.seed_pairs()[0]
        found = study.cca_rows(b, a)
    blocks = {}
    if found is not None:
        for block, rows, directions, design in zip(study.blocks, *found):
            effective = rows / design
            blocks[block] = {"rows": int(rows), "directions": int(directions), "design_effect": round(float(design), 3),
                             "effective_rows_per_direction": round(float(effective / directions), 3),
                             "reported": bool(effective >= cca.ROWS_PER_DIRECTION_FLOOR * directions),
                             "warning": overfitting(int(rows), int(directions), float(design))}
    return {"estimator": {"svcca": "delete-a-group jackknife bias-corrected (Quenouille; Busing et al. 1999), the "
                                   "kept dimensions fixed once from all images; interval: corrected value +- t(G-1) x "
                                   "sqrt(jackknife s.e.^2 + (|plug-in - corrected| / (sqrt(2) G))^2), the second "
                                   "term the correction's own error (sized by simulation, bench/bench_coverage.py)",
                          "pwcca": "on SVCCA's kept dimensions, each canonical correlation weighted by the variance "
                                   "of the FP32 block its canonical variate accounts for (sum_j <h_i, x_j>^2; Morcos "
                                   "et al.'s L1 weights sum_j |<h_i, x_j>| carry a bias the jackknife cannot remove), "
                                   "bias-corrected as SVCCA; interval: corrected value +- t(G-1) x sqrt(jackknife "
                                   "s.e.^2 + (2 |plug-in - corrected| / G)^2) (sized by simulation, "
                                   "bench/bench_coverage.py)"},
            "floor_rows_per_direction": cca.ROWS_PER_DIRECTION_FLOOR,
            "rows": "every spatial position of every image is a row; effective rows = rows / design effect "
                    "(1 + (positions - 1) x the share of variance between images)",
            "baseline": "shuffled images: each image's rows paired with the previous image's rows of the other model",
            "blocks": blocks,
            "warnings": [f"{b}: {v['warning']}" + ("" if v["reported"] else "; not reported")
                         for b, v in blocks.items() if v["warning"]]}


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
    """The study's ``metrics.json`` content."""
    study = Study(shards)
    confidence = study.confidence
    table = metric_table(study)
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
        "rule": describe(1 - confidence),
        "metrics": table,
        "dose_response": dose_response(study, table),
        "null_check": null_check(study, table, 1 - confidence),
        "cca": cca_overfitting(study),
        "classes": class_damage(study),
        "diagnostics": diagnostics(study),
        "instruments": {"layer_matching": layer_matching(study)},
    }
