"""The study's page: one self-contained HTML file (pictures inline as base64 PNG) and its figures as files.

Figures: dose-response curves per compression axis (each metric against the level, with its
interval and the seed band), the class-damage table, the compression-identified exemplars
with their maps (drawn from the shards: no model is loaded), layer diagnostics. Every verdict
states its rule and false-positive rate. The same PNGs are written to ``OUT/figures/`` for the
Space's Study tab (:mod:`space.study_tab`).
"""

from __future__ import annotations

import html
import io
import math
import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from study.shard import Shard
from surgery.overlay import overlay

_TEMPLATE = Path(__file__).with_name("template.html")
# The panels of the dose-response figure: single-model metrics, then comparisons with FP32.
CURVE_METRICS = ("top1", "vs_fp32.agreement", "vs_fp32.top5_overlap", "vs_fp32.gradcam_spearman",
                 "vs_fp32.saliency_spearman", "gradcam.pointing_game", "gradcam.energy_in_mask",
                 "gradcam.deletion_auc", "gradcam.insertion_auc")


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    return buffer.getvalue()


def _panel(ax, entry: dict, levels: list[str], x: list[float], title: str) -> None:
    points = [(xi, entry["variants"][n]) for n, xi in zip(levels, x) if n in entry["variants"]]
    if not points:
        ax.set_visible(False)
        return
    xs = [p[0] for p in points]
    est = [p[1]["estimate"] for p in points]
    values = [e["value"] for e in est]
    lows = [e["value"] - e["low"] if e["low"] is not None else 0 for e in est]
    highs = [e["high"] - e["value"] if e["high"] is not None else 0 for e in est]
    ax.errorbar(xs, values, yerr=[lows, highs], marker="o", ms=3, capsize=2, lw=1)
    null = list(entry["null_values"].values())
    if null:
        ax.axhspan(min(null), max(null), color="grey", alpha=0.25, lw=0)
        ax.axhline(float(np.mean(null)), color="grey", lw=0.8, ls="--")
    for xi, p in points:
        if p.get("verdict", {}).get("worse"):
            ax.plot([xi], [p["estimate"]["value"]], "rx", ms=7)
    ax.set_title(title, fontsize=7)
    ax.tick_params(labelsize=6)
    ax.grid(alpha=0.3)


def dose_figure(metrics: dict, axis: str, panels: Sequence[str]) -> Figure:
    """One panel per metric: value vs compression level, interval bars, grey band: the FP32 seeds."""
    dr = metrics["dose_response"][axis]
    panels = [p for p in panels if p in metrics["metrics"]]
    cols = 4
    rows = max(1, -(-len(panels) // cols))
    fig = Figure(figsize=(2.4 * cols, 1.9 * rows + 0.3))
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, metric in zip(axes, panels):
        _panel(ax, metrics["metrics"][metric], dr["levels"], dr["x"], metrics["metrics"][metric]["title"])
        ax.set_xlabel("bits" if axis == "quantized" else "sparsity %", fontsize=6)
        if axis == "quantized":
            ax.invert_xaxis()  # more compression to the right on both axes
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{'Quantization' if axis == 'quantized' else 'Sparsity'}: grey band = FP32 seeds "
                 "(range), dashed = their mean, red x = worse than retraining (prediction bound)", fontsize=8)
    fig.tight_layout()
    return fig


def representation_panels(metrics: dict) -> list[str]:
    return [f"vs_fp32.{m}.{b}" for m in ("cka", "svcca", "pwcca") for b in metrics["blocks"]
            if f"vs_fp32.{m}.{b}" in metrics["metrics"]]


def exemplar_figure(items: list[dict], class_names: Sequence[str]) -> Figure:
    """Rows: an exemplar, FP32's GradCAM, the compressed model's GradCAM; captions: predictions."""
    fig = Figure(figsize=(1.4 * 3 + 0.4, 1.5 * len(items) + 0.3))
    axes = np.asarray(fig.subplots(len(items), 3, squeeze=False))
    for i, item in enumerate(items):
        photo = np.ascontiguousarray(item["image"].transpose(1, 2, 0))
        panels = [(photo, f"true: {class_names[item['label']]}"),
                  (overlay(photo, item["fp32_map"]), f"FP32: {class_names[item['fp32_pred']]}"),
                  (overlay(photo, item["map"]), f"{item['variant']}: {class_names[item['pred']]}")]
        for ax, (picture, caption) in zip(axes[i], panels):
            ax.imshow(picture)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=6)
    fig.tight_layout()
    return fig


# -- HTML -------------------------------------------------------------------------------------------

def _cell(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "–"
    if e.get("low") is None:
        return f"{e['value']:.3f}"
    return f"{e['value']:.3f} <span class=ci>[{e['low']:.3f}, {e['high']:.3f}]</span>"


def _p(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(png: str, caption: str) -> str:
    return f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">' \
           f"<figcaption>{caption}</figcaption></figure>"


def _verdict(v: dict | None) -> str:
    if not v or not v.get("testable"):
        return "no verdict" if v else "no null"
    mark = {"above": "above the bound", "below": "below the bound", None: "within"}[v["side"]]
    return f"<b>worse</b> ({mark})" if v["worse"] else mark


def _rule_note(metrics: dict) -> str:
    alpha = 1 - metrics["settings"]["confidence"]
    return (f"<p class=note><b>Rule</b>: {html.escape(metrics['rule'])}. K = {len(metrics['seeds'])} FP32 seeds. A "
            f"variant that is one more seed is flagged in {alpha:.0%} of cells; over many metrics some flags are "
            f"chance (about {alpha * len(metrics['metrics']):.0f} of {len(metrics['metrics'])} per variant).</p>")


def _null_check_section(metrics: dict) -> list[str]:
    nc = metrics["null_check"]
    parts = ["<h2>The rule on the zoo's own seeds (leave-one-seed-out)</h2>"]
    if nc["rate"] is None:
        return parts + [f"<p class=note>No check: {html.escape(nc.get('note', 'no testable cell'))}.</p>"]
    rows = [[html.escape(seed), str(r["cells"]), str(len(r["worse"])),
             html.escape(", ".join(r["worse"]) or "none")] for seed, r in nc["held_out"].items()]
    return parts + [
        f"<p>Each FP32 seed in turn judged as if it were a compressed variant against the other "
        f"{nc['seeds'] - 1} with the same rule: <b>{nc['flagged']} of {nc['cells']} (held-out seed, metric) cells "
        f"flagged worse ({nc['rate']:.1%})</b>, against a nominal {nc['alpha']:.0%}; {nc['better']} beyond the bound "
        f"on the good side; {nc['untestable']} cells untestable (a comparison needs 3 seeds left).</p>",
        _table(["held-out seed", "cells", "flagged worse", "metrics flagged"], rows)]


def _metrics_section(metrics: dict) -> list[str]:
    names = [n for n in metrics["variants"] if metrics["variants"][n]["kind"] != "fp32"]
    rows = []
    for key, entry in metrics["metrics"].items():
        if key.split(".")[1:2] and key.split(".")[1] in ("cka", "svcca", "pwcca"):
            continue
        null = ", ".join(f"{v:.3f}" for v in entry["null_values"].values()) or "–"
        cells = []
        for n in names:
            row = entry["variants"].get(n)
            cells.append("–" if row is None else f"{_cell(row['estimate'])}<br>{_verdict(row.get('verdict'))}")
        rows.append([html.escape(entry["title"]), null, *cells])
    note = [f"<p class=note>{html.escape(metrics['no_null'])}</p>"] if metrics.get("no_null") else []
    return ["<h2>Metrics against the seed null</h2>", *note,
            "<p>Each cell: the value with its interval over images, and the verdict of the rule above against the "
            "FP32 seeds (null values listed: single models for a model's own metric, every FP32-vs-FP32 pair for a "
            "comparison). <b>Worse</b>: beyond the one-sided prediction bound on the bad side.</p>",
            _table(["metric", "seed null", *names], rows)]


def _cca_cell(row: dict) -> str:
    base = f"{_cell(row['estimate'])}<br>{_verdict(row.get('verdict'))}"
    if "shuffled" not in row:
        return base
    shuffled = row["shuffled"]["value"] if row.get("shuffled") else None
    return (f"{base}<br><span class=ci>plug-in {row['plug_in']:.3f}; shuffled images "
            f"{'–' if shuffled is None else f'{shuffled:.3f}'} (plug-in {row['shuffled_plug_in']:.3f}); "
            f"kept {row['kept'][0]}/{row['kept'][1]}</span>")


def _representations_section(metrics: dict) -> list[str]:
    names = [n for n in metrics["variants"] if metrics["variants"][n]["kind"] != "fp32"]
    cca = metrics["cca"]
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in cca["warnings"])
    parts = ["<h2>Representations per block</h2>",
             "<p>Debiased linear CKA (minibatch estimator, conv maps flattened), SVCCA (99% of the variance kept) "
             "and PWCCA (on SVCCA's directions, variance weights), each block against the same FP32 block; for CCA "
             f"each spatial position of each image is a row. SVCCA: {html.escape(cca['estimator']['svcca'])}. PWCCA: "
             f"{html.escape(cca['estimator']['pwcca'])}. Beside each value: the plug-in value, and the same "
             "estimator on shuffled images (each image paired with another image: what overfitting alone gives; "
             "its population value is 0). Blocks with fewer than "
             f"{cca['floor_rows_per_direction']} effective rows per direction (rows over the design effect of an "
             "image's correlated positions) get no CCA value.</p>"]
    if warnings:
        parts.append(f"<div class=note><b>CCA overfitting</b><ul>{warnings}</ul></div>")
    for method in ("cka", "svcca", "pwcca"):
        rows = []
        for block in metrics["blocks"]:
            entry = metrics["metrics"].get(f"vs_fp32.{method}.{block}")
            if entry is None:
                continue
            null = ", ".join(f"{v:.3f}" for v in entry["null_values"].values()) or "–"
            rows.append([block, null] + [("–" if n not in entry["variants"] else _cca_cell(entry["variants"][n]))
                                         for n in names])
        if rows:
            parts += [f"<h3>{method.upper()}</h3>", _table(["block", "seed pairs", *names], rows)]
    return parts


def _dose_section(metrics: dict, pictures: dict[str, str]) -> list[str]:
    alpha = 1 - metrics["settings"]["confidence"]
    parts = ["<h2>Dose-response</h2>",
             f"<p>The first level worse than retraining, per metric, by fixed-sequence testing: the levels are "
             f"tested from the most compressed towards the mildest, each with the rule, stopping at the first level "
             f"not worse. The level named is the mildest of an unbroken run of flags reaching the harshest level "
             f"(read from the mildest upwards: the first level from which every harsher level is worse), a claim "
             f"with a family-wise false-positive rate of {alpha:.0%} over the axis.</p>"]
    for axis, dr in metrics["dose_response"].items():
        parts.append(_figure(pictures[f"dose-{axis}"], f"{axis}: behaviour and maps against the level"))
        if f"dose-{axis}-repr" in pictures:
            parts.append(_figure(pictures[f"dose-{axis}-repr"], f"{axis}: representations per block"))
        rows = [[html.escape(metrics["metrics"][m]["title"]),
                 html.escape(r["first_worse"] or "none of " + ", ".join(r["levels"])), html.escape(", ".join(r["tested"]))]
                for m, r in dr["metrics"].items()]
        parts += [f"<h3>First level worse than retraining ({axis})</h3>",
                  _table(["metric", "first level", "tested, in order"], rows)]
    return parts


def _classes_section(metrics: dict, class_names: Sequence[str], pictures: dict[str, str]) -> list[str]:
    alpha = 1 - metrics["settings"]["confidence"]
    parts = ["<h2>Per-class damage</h2>",
             "<p>A class is <b>hurt</b> (Hooker et al. 2019) when it lost more than the model as a whole and more "
             "than retraining moves it: (1) the exact conditional test of its images' changes against the other "
             "classes' (one-sided mid-p, Holm over classes: family-wise "
             f"{alpha:.0%}), and (2) its recall minus the other classes' below the FP32 seeds' prediction bound "
             f"({alpha:.0%} per class). <i>Detectable drop</i>: the smallest loss of the class's images (none gained) "
             "that (1) can flag; smaller drops go unseen. Change: recall against FP32 on the same images "
             "(Bonett-Price interval). Recall distortion: slope of the recall change on FP32's recall (each FP32 "
             "seed's slope is the null: regression to the mean makes it negative). Exemplars: images the variant "
             "gets wrong while every FP32 seed gets them right.</p>"]
    summary = []
    for name, entry in metrics["classes"].items():
        hurt = ", ".join(class_names[c] for c in entry["hurt"]) or "none"
        more = ", ".join(class_names[c] for c in entry["hurt_more"]) or "none"
        summary.append([html.escape(name), hurt, more, _cell(entry["recall_distortion"]),
                        str(len(entry.get("exemplars", []))) if "exemplars" in entry else "–",
                        ("Welch: " + (", ".join(class_names[r["class"]] for r in entry["welch"]["classes"]
                                                if r["hurt_significantly"]) or "none"))
                        if entry.get("welch") else "–"])
    parts.append(_table(["variant", "classes hurt (1 and 2)", "lost more than the rest (1)", "recall distortion",
                         "exemplars", "several seeds per arm"], summary))
    for name, entry in metrics["classes"].items():
        rows = []
        for r in entry["classes"]:
            if not r["images"]:
                continue
            drop = "–" if r["detectable_drop"] is None else f"{r['detectable_drop']:.0%}"
            seed = r.get("seed_rule")
            rows.append([class_names[r["class"]], str(r["images"]), f"{r['recall_fp32']:.3f}", f"{r['recall']:.3f}",
                         _cell(r["change"]), f"{r['beyond_rest']:+.3f}", _p(r["p"]), _p(r["p_holm"]), drop,
                         "–" if seed is None else _verdict(seed),
                         "<b>hurt</b>" if r.get("hurt_significantly") else ""])
        parts += [f"<h3>{html.escape(name)}</h3>",
                  _table(["class", "images", "FP32 recall", "recall", "change", "beyond the rest", "exact p", "Holm",
                          "detectable drop", "seed rule", ""], rows)]
        if f"exemplars-{name}" in pictures:
            parts.append(_figure(pictures[f"exemplars-{name}"], f"Compression-identified exemplars of {html.escape(name)}"))
    return parts


def _diagnostics_section(metrics: dict) -> list[str]:
    parts = ["<h2>Layer diagnostics</h2>",
             "<p>SQNR: energy of FP32's block output over the energy of the variant's deviation from it, in dB, "
             "over every image. Clipped: share of the activation values entering the block's quantizers that lie "
             "outside their calibrated range. Weights: share of exact zeros and dead filters (output channels "
             "whose weights are all zero).</p>"]
    for name, d in metrics["diagnostics"].items():
        rows = [[b, "–" if r.get("sqnr_db") is None else f"{r['sqnr_db']:.1f}",
                 "–" if "clipped_fraction" not in r else f"{r['clipped_fraction']:.2e}"] for b, r in d["blocks"].items()]
        layers = d["weights"]["layers"]
        dead = sum(v["dead_filters"] for v in layers.values())
        bits = "" if not d["bits"] else f"; bits: weights {d['bits']['weights']}, activations {d['bits']['activations']}"
        parts += [f"<h3>{html.escape(name)}</h3><p>weights {d['weights']['overall_sparsity']:.1%} zero, "
                  f"{dead} dead filters of {sum(v['filters'] for v in layers.values())}{bits}.</p>",
                  _table(["block", "SQNR (dB)", "clipped"], rows),
                  "<details><summary>per layer</summary>" + _table(
                      ["layer", "zero weights", "dead filters"],
                      [[k, f"{v['sparsity']:.1%}", f"{v['dead_filters']} / {v['filters']}"] for k, v in layers.items()])
                  + "</details>"]
    return parts


def _instruments_section(metrics: dict) -> list[str]:
    lm = metrics["instruments"]["layer_matching"]
    if not lm["pairs"]:
        return ["<h2>Sanity check of the instruments</h2><p class=note>One FP32 seed only: no layer-matching check.</p>"]
    rows = []
    for pair, entry in lm["pairs"].items():
        rows.append([html.escape(pair)] + [f"{entry[m]['hits']} / {entry[m]['total']} (margin "
                                           f"{entry[m]['median_margin']:+.3f})" if m in entry else "–"
                                           for m in ("cka", "svcca", "pwcca")])
    rows.append(["all pairs"] + ["–" if lm[m]["rate"] is None else f"{lm[m]['hits']} / {lm[m]['total']} "
                                 f"({lm[m]['rate']:.1%})" for m in ("cka", "svcca", "pwcca")])
    return ["<h2>Sanity check of the instruments</h2>",
            f"<p>Kornblith et al. (2019, Table 2): for each block of one FP32 seed, is the most similar block of "
            f"another seed the same block? Both directions of each seed pair; margin: the same block's similarity "
            f"minus the best other block's (median over blocks; negative where another block wins). CKA on every "
            f"image; SVCCA/PWCCA on {lm['match_images']} images, every block pooled to one "
            f"{lm['grid']}x{lm['grid']} grid and {lm['directions']} directions, so that every candidate has the same "
            f"rows and directions. They report 99.3% for linear CKA and 10-15% for SVCCA/PWCCA.</p>",
            _table(["seed pair", "CKA", "SVCCA", "PWCCA"], rows)]


def render_page(metrics: dict, class_names: Sequence[str], pictures: dict[str, str]) -> str:
    intro = (f"<p>Family <code>{html.escape(metrics['family'])}</code>; {html.escape(metrics['images']['source'])}; "
             f"seed {metrics['settings']['seed']}. FP32 seeds: {', '.join(metrics['seeds'])}. Intervals: "
             f"{html.escape(metrics['interval'])}.</p>")
    parts = [intro, _rule_note(metrics), *_null_check_section(metrics), *_instruments_section(metrics),
             *_dose_section(metrics, pictures), *_metrics_section(metrics), *_representations_section(metrics),
             *_classes_section(metrics, class_names, pictures), *_diagnostics_section(metrics)]
    return string.Template(_TEMPLATE.read_text()).substitute(
        title=html.escape(f"Compression study: {metrics['family']}"), body="\n".join(parts))


def figures(metrics: dict, gallery: dict[str, list[dict]], class_names: Sequence[str]) -> dict[str, bytes]:
    """Every figure of the page as PNG bytes, by name."""
    out = {}
    for axis in metrics["dose_response"]:
        out[f"dose-{axis}"] = png_bytes(dose_figure(metrics, axis, CURVE_METRICS))
        panels = representation_panels(metrics)
        if panels:
            out[f"dose-{axis}-repr"] = png_bytes(dose_figure(metrics, axis, panels))
    for name, items in gallery.items():
        if items:
            out[f"exemplars-{name}"] = png_bytes(exemplar_figure(items, class_names))
    return out


def exemplar_items(shard: Shard, exemplars: Sequence[int], limit: int) -> list[dict]:
    """The first ``limit`` of ``exemplars`` (stream positions) whose maps the shard holds."""
    a = shard.arrays
    if "exemplar.position" not in a:
        return []
    wanted = set(int(p) for p in exemplars)
    rows = [i for i, p in enumerate(a["exemplar.position"]) if int(p) in wanted][:limit]
    return [{"variant": shard.name, "image": a["exemplar.image"][i], "label": int(a["exemplar.label"][i]),
             "fp32_pred": int(a["exemplar.fp32_pred"][i]), "pred": int(a["exemplar.pred"][i]),
             "fp32_map": a["exemplar.fp32_map"][i], "map": a["exemplar.map"][i]} for i in rows]
