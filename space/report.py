"""The comparison report: what quantization and sparsity changed, on held-out images, with intervals.

``python -m space.report --zoo DIR --out DIR [--images N] [--seed S]`` loads every variant of a
zoo (``DIR/fp32``, ``DIR/int8``, ``DIR/sparse90``, ``DIR/fp32-seed1``, ...) with
:func:`surgery.load_variant` and writes

- ``OUT/report.html``: one self-contained page (pictures embedded as base64 PNG, no external
  reference of any kind): GradCAM and saliency maps side by side per variant, CKA heatmaps of
  FP32 against every other variant, activation-maximisation grids, and tables with intervals;
- ``OUT/metrics.json``: every number on the page. Same zoo, seed and machine: same file, byte for byte.

FP32 is the reference. Where the zoo has ``fp32-seed1`` (FP32 trained again with another
seed), it is the control: a compressed variant differs from FP32 in a way that matters only
where it differs more than a second FP32 model does.

Images are the family's held-out split (for shapes: the ``test`` split, with object masks),
sampled with the seed. Every aggregate carries a 95% percentile-bootstrap interval whose
resampling unit is images (minibatch CKA: images in the minibatches they were seen in).

Example:
    $ python -m space.report --zoo zoo/resnet18-shapes --out reports/shapes --images 64 --seed 0
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from space.render import heatmap_figure, overlay
from surgery import compression
from surgery.actmax import activation_maximization
from surgery.attribution import explain
from surgery.checkpoint import CONFIG_FILE, CheckpointError, Variant
from surgery.data import ShapesDataset, build_dataset
from surgery.devices import faithful, resolve_device
from surgery.loading import load_variant
from surgery.registry import ModelFamily, get_family
from surgery.scoring import deletion_insertion, energy_in_mask, pointing_game
from surgery.similarity import (Estimate, LayerSimilarity, iter_activations, layer_similarity, map_spearman,
                                mean_ci, prediction_agreement, residual_blocks, topk_iou, topk_overlap)

logger = logging.getLogger(__name__)

REFERENCE = "fp32"
MAP_METHODS = ("gradcam", "saliency")
METHOD_TITLES = {"gradcam": "GradCAM", "saliency": "Saliency (gradient)"}
_KIND_ORDER = {"fp32": 0, "int8": 1, "sparse": 2}
_TEMPLATE = Path(__file__).with_name("report_template.html")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the report's numbers (recorded in ``metrics.json``)."""

    images: int = 64  # held-out images for predictions, maps and scores
    seed: int = 0  # image sample, bootstrap, activation maximisation
    repr_images: int = 256  # images for representation similarity
    cka_batches: int = 16  # minibatches the CKA streams over (its interval resamples them)
    batch_size: int = 32
    n_boot: int = 1000
    cca: bool = True
    cca_boot: int = 200  # SVCCA/PWCCA refit per replicate: fewer replicates
    deletion_images: int = 32
    deletion_steps: int = 10
    tolerance: int = 2  # pointing-game tolerance in pixels, next to the strict score
    top_fraction: float = 0.1  # IoU of the top 10% pixels
    actmax_channels: int = 6
    actmax_steps: int = 128
    shown: int = 6  # images drawn with their maps
    device: str | None = None  # None: $SURGERY_DEVICE, else auto; resolved (and recorded) as cpu, cuda:0, ...
    data_root: str | None = None  # families other than shapes read their data here

    def validate(self) -> None:
        for name in ("images", "repr_images", "cka_batches", "batch_size", "n_boot", "cca_boot",
                     "deletion_images", "deletion_steps", "actmax_channels", "actmax_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.repr_images < 4 * self.cka_batches:
            raise ValueError(f"--repr-images must be at least 4 per CKA batch ({4 * self.cka_batches}), "
                             f"got {self.repr_images}")


@dataclass(frozen=True)
class HeldOut:
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    labels: torch.Tensor  # [N]
    masks: torch.Tensor | None  # [N, H, W] bool, where the family has them
    indices: list[int]
    source: str


# -- Inputs ---------------------------------------------------------------------------------------

def load_zoo(zoo: Path, device: str = "cpu") -> dict[str, Variant]:
    """Every variant directory of ``zoo``, FP32 first, then controls, INT8, sparse; one family."""
    zoo = Path(zoo)
    if not zoo.is_dir():
        raise FileNotFoundError(f"zoo directory {zoo} does not exist")
    dirs = [d for d in zoo.iterdir() if (d / CONFIG_FILE).exists()]
    if not any(d.name == REFERENCE for d in dirs):
        raise FileNotFoundError(f"{zoo}: no {REFERENCE} variant (expected {zoo / REFERENCE / CONFIG_FILE}); "
                                "build one with `python -m training zoo --out DIR`")
    variants = {}
    for d in tqdm(dirs, desc="loading variants", leave=False):
        variants[d.name] = load_variant(d, device=device)
    families = {v.config["family"] for v in variants.values()}
    if len(families) != 1:
        raise ValueError(f"{zoo}: variants of several families ({', '.join(sorted(families))}); give one family's zoo")

    def order(name: str) -> tuple:
        return (name != REFERENCE, _KIND_ORDER.get(variants[name].config["kind"], 3), name)

    return {name: variants[name] for name in sorted(variants, key=order)}


def held_out(family: ModelFamily, count: int, seed: int, data_seed: int = 0,
             data_root: str | None = None) -> HeldOut:
    """``count`` images of the family's held-out split drawn with ``seed`` (shapes: with masks)."""
    ds = build_dataset(family, "eval", data_root, seed=data_seed)
    if count > len(ds):
        raise ValueError(f"asked for {count} images; the held-out split of {family.name} has {len(ds)}")
    idx = sorted(np.random.default_rng(seed).choice(len(ds), size=count, replace=False).tolist())
    items = [ds[i] for i in idx]
    masks = ds.masks[idx] if isinstance(ds, ShapesDataset) else None
    return HeldOut(torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items]), masks, idx,
                   f"{family.dataset} held-out split (data seed {data_seed}), {count} of {len(ds)} images")


# -- Measurements ---------------------------------------------------------------------------------

def attribute(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
              batch_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the maps of every method for the true class, one fused pass per batch."""
    parts = [explain(model, x, target=y) for x, y in zip(images.split(batch_size), labels.split(batch_size))]
    logits = torch.cat([p.logits for p in parts]).cpu()
    return logits, {"gradcam": torch.cat([p.gradcam for p in parts]).cpu(),
                    "saliency": torch.cat([p.saliency for p in parts]).cpu()}


def variant_metrics(name: str, variant: Variant, data: HeldOut, logits: dict[str, torch.Tensor],
                    maps: dict[str, dict[str, torch.Tensor]], s: Settings) -> tuple[dict, dict, dict]:
    """Accuracy, agreement with FP32 and map scores of one variant.

    Returns the aggregates, the per-image agreement scores (for paired comparisons with the
    seed control) and the mean deletion/insertion curves.
    """
    ci = dict(n_boot=s.n_boot, seed=s.seed)
    out = {"kind": variant.config["kind"], "weights_sha256": variant.config["weights"]["sha256"],
           "top1": mean_ci((logits[name].argmax(1) == data.labels).double(), **ci)}
    per_image = {}
    if name != REFERENCE:
        k = min(5, logits[name].shape[1])
        per_image["agreement_with_fp32"] = prediction_agreement(logits[REFERENCE], logits[name])
        per_image[f"top{k}_overlap_with_fp32"] = topk_overlap(logits[REFERENCE], logits[name], k)
        out.update({key: mean_ci(v, **ci) for key, v in per_image.items()})
    out["maps"], curves = {}, {}
    n_del = min(s.deletion_images, len(data.labels))
    for method in MAP_METHODS:
        m = maps[name][method]
        scores = {}
        if name != REFERENCE:
            per_image[f"{method}_spearman_vs_fp32"] = map_spearman(maps[REFERENCE][method], m)
            per_image[f"{method}_iou_top_vs_fp32"] = topk_iou(maps[REFERENCE][method], m, s.top_fraction)
            scores["spearman_vs_fp32"] = mean_ci(per_image[f"{method}_spearman_vs_fp32"], **ci)
            scores["iou_top_vs_fp32"] = mean_ci(per_image[f"{method}_iou_top_vs_fp32"], **ci)
        if data.masks is not None:
            scores["pointing_game"] = mean_ci(pointing_game(m, data.masks), **ci)
            scores["pointing_game_tolerant"] = mean_ci(pointing_game(m, data.masks, s.tolerance), **ci)
            scores["energy_in_mask"] = mean_ci(energy_in_mask(m, data.masks), **ci)
        di = deletion_insertion(variant.model, data.images[:n_del], m[:n_del], data.labels[:n_del],
                                steps=s.deletion_steps, batch_size=s.batch_size)
        scores["deletion_auc"] = mean_ci(di.deletion_auc, **ci)
        scores["insertion_auc"] = mean_ci(di.insertion_auc, **ci)
        curves[method] = (di.fractions, di.deletion.mean(0), di.insertion.mean(0))
        out["maps"][method] = scores
    return out, per_image, curves


def seed_control(per_image: dict[str, dict[str, torch.Tensor]], s: Settings) -> dict[str, dict[str, dict]]:
    """Paired differences on the same images: (variant vs FP32) minus (seed control vs FP32).

    Positive: the compressed variant stays closer to FP32 than an FP32 model trained again with
    another seed does; an interval across 0: no difference beyond what retraining alone causes.
    """
    controls = [n for n in per_image if n.startswith(f"{REFERENCE}-seed")]
    compressed = [n for n in per_image if n != REFERENCE and n not in controls]
    return {control: {name: {key: mean_ci(per_image[name][key] - per_image[control][key], n_boot=s.n_boot,
                                          seed=s.seed)
                             for key in per_image[control]}
                      for name in compressed}
            for control in controls}


def representation_metrics(variants: dict[str, Variant], data: HeldOut,
                           s: Settings) -> dict[str, dict[str, LayerSimilarity]]:
    """FP32 against every other variant: CKA over all blocks (+ fc), SVCCA/PWCCA per stage."""
    fp32 = variants[REFERENCE].model
    blocks = residual_blocks(fp32) + ["fc"]
    stages = sorted({b.split(".")[0] for b in residual_blocks(fp32)})
    images = data.images[: s.repr_images]
    batches = images.split(max(4, len(images) // s.cka_batches))
    out = {}
    for name, variant in variants.items():
        if name == REFERENCE:
            continue
        logger.info("representation similarity: %s vs %s", REFERENCE, name)
        sims = {"cka": layer_similarity(fp32, variant.model, batches, blocks, method="cka",
                                        n_boot=s.n_boot, seed=s.seed)}
        if s.cca:
            sims.update(layer_similarity(fp32, variant.model, images.split(s.batch_size), stages,
                                         method=("svcca", "pwcca"), pairs="diagonal", n_boot=s.cca_boot,
                                         seed=s.seed))
        out[name] = sims
    return out


def channel_peaks(model: torch.nn.Module, images: torch.Tensor, layer: str, batch_size: int) -> torch.Tensor:
    """Per channel, the largest spatial-mean activation (the channel objective) over ``images``."""
    stream = iter_activations({"m": model}, images.split(batch_size), {"m": [layer]}, reduce="pool")
    return torch.cat([acts["m"][0] for acts in stream]).amax(0)


def actmax_rows(variants: dict[str, Variant], data: HeldOut, family: ModelFamily,
                s: Settings) -> tuple[list[int], list[dict]]:
    """Activation maximisation of FP32's most active channels at the GradCAM layer, per variant.

    The same channel indices are shown for every variant fine-tuned from FP32 (INT8, sparse),
    where a channel keeps its identity; a separately trained model (the seed control) has
    unrelated channels and is left out. INT8 is optimised with both gradients.
    """
    layer = family.gradcam_layer
    images = data.images[: s.repr_images]
    peaks = {name: channel_peaks(v.model, images, layer, s.batch_size) for name, v in variants.items()
             if name == REFERENCE or v.config["kind"] != "fp32"}
    channels = peaks[REFERENCE].topk(min(s.actmax_channels, len(peaks[REFERENCE]))).indices.sort().values.tolist()
    rows = []
    for name, peak in tqdm(peaks.items(), desc="activation maximisation", leave=False):
        model = variants[name].model
        quantized = bool(compression.quantizers(model))
        for gradient in (("ste", "true") if quantized else ("true",)):
            result = activation_maximization(model, layer, channels, steps=s.actmax_steps, seed=s.seed,
                                             size=family.input_size, gradient=gradient)
            reached, dataset_max = result.values.cpu(), peak[channels]
            rows.append({"variant": name, "gradient": result.gradient, "layer": layer, "images": result.images.cpu(),
                         "objective": reached.tolist(), "dataset_max": dataset_max.tolist(),
                         "above_dataset_max": (reached > dataset_max).tolist()})
    return channels, rows


# -- Pictures -------------------------------------------------------------------------------------

def png_base64(figure_or_pixels: Figure | np.ndarray) -> str:
    buffer = io.BytesIO()
    if isinstance(figure_or_pixels, Figure):
        figure_or_pixels.savefig(buffer, format="png", dpi=100)
    else:
        Image.fromarray(figure_or_pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def maps_figure(data: HeldOut, class_names: Sequence[str], logits: dict[str, torch.Tensor],
                maps: dict[str, dict[str, torch.Tensor]], shown: int) -> Figure:
    """Rows of images: the input (mask outlined), then each variant's maps, captioned with its prediction."""
    names = list(maps)
    columns = [(None, None)] + [(n, m) for n in names for m in MAP_METHODS]
    rows = min(shown, len(data.labels))
    fig = Figure(figsize=(1.35 * len(columns), 1.45 * rows + 0.5))
    axes = np.asarray(fig.subplots(rows, len(columns), squeeze=False))
    for i in range(rows):
        photo = _uint8(data.images[i])
        for j, (name, method) in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if name is None:
                ax.imshow(photo)
                if data.masks is not None:
                    ax.contour(data.masks[i].numpy().astype(float), levels=[0.5], colors="white", linewidths=0.7)
                ax.set_xlabel(class_names[int(data.labels[i])], fontsize=7)
                continue
            ax.imshow(overlay(photo, maps[name][method][i]))
            pred = int(logits[name][i].argmax())
            ax.set_xlabel(class_names[pred], fontsize=7, color="green" if pred == int(data.labels[i]) else "red")
            if i == 0:
                ax.set_title(f"{name}\n{METHOD_TITLES[method].split()[0]}", fontsize=7)
    axes[0, 0].set_title("input", fontsize=7)
    fig.tight_layout()
    return fig


def diagonal_figure(similarities: dict[str, dict[str, LayerSimilarity]]) -> Figure:
    """CKA of each layer with the same layer of FP32, one line (and interval band) per variant."""
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    for name, sims in similarities.items():
        sim = sims["cka"]
        x = np.arange(len(sim.layers_a))
        ax.plot(x, np.diag(sim.values), marker="o", label=f"FP32 vs {name}")
        ax.fill_between(x, np.diag(sim.low), np.diag(sim.high), alpha=0.2)
        ax.set_xticks(x, sim.layers_a, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("CKA with the same FP32 layer")
    ax.set_ylim(top=1.02)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def curves_figure(curves: dict[str, dict[str, tuple]]) -> Figure:
    fig = Figure(figsize=(8, 3))
    axes = fig.subplots(1, 2)
    for index, title in enumerate(("deletion (lower is better)", "insertion (higher is better)")):
        ax = axes[index]
        for k, (name, per_method) in enumerate(curves.items()):
            for method, style in zip(MAP_METHODS, ("-", "--")):
                fractions, deletion, insertion = per_method[method]
                ax.plot(fractions, (deletion, insertion)[index], style, color=f"C{k}",
                        label=f"{name} {METHOD_TITLES[method].split()[0]}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("share of pixels, most important first")
        ax.set_ylabel("probability of the true class")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def actmax_figure(channels: list[int], rows: list[dict]) -> Figure:
    fig = Figure(figsize=(1.3 * len(channels) + 1.2, 1.4 * len(rows) + 0.4))
    axes = np.asarray(fig.subplots(len(rows), len(channels), squeeze=False))
    for i, row in enumerate(rows):
        for j, channel in enumerate(channels):
            ax = axes[i, j]
            ax.imshow(_uint8(row["images"][j]))
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlabel(f"{row['objective'][j]:.2f} / {row['dataset_max'][j]:.2f}", fontsize=6)
            if i == 0:
                ax.set_title(f"ch {channel}", fontsize=7)
        axes[i, 0].set_ylabel(f"{row['variant']}\n{row['gradient']}", fontsize=7)
    fig.tight_layout()
    return fig


# -- Page -----------------------------------------------------------------------------------------

def _cell(e: Estimate | None) -> str:
    if e is None:
        return "–"
    if not np.isfinite(e.value):
        return "n/a"
    return f"{e.value:.3f} <span class=ci>[{e.low:.3f}, {e.high:.3f}]</span>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(png: str, caption: str) -> str:
    return f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">' \
           f"<figcaption>{caption}</figcaption></figure>"


def _interval(low: float, high: float) -> str:
    return f"<span class=ci>[{low:.3f}, {high:.3f}]</span>" if np.isfinite(low) else ""


def _predictions_section(metrics: dict, top_k: int) -> list[str]:
    variants = metrics["variants"]
    parts = ["<h2>Predictions</h2>", _table(
        ["variant", "kind", "top-1", "agreement with FP32", f"top-{top_k} overlap with FP32"],
        [[html.escape(n), v["kind"], _cell(v["top1"]), _cell(v.get("agreement_with_fp32")),
          _cell(v.get(f"top{top_k}_overlap_with_fp32"))] for n, v in variants.items()])]
    if not metrics["seed_control"]:
        parts.append("<p class=note>This zoo has no FP32 model trained with another seed: there is no "
                     "control for how much two equally good FP32 networks differ.</p>")
    for control, rows in metrics["seed_control"].items():
        keys = list(next(iter(rows.values()))) if rows else []
        parts.append(f"<h3>Against the seed control ({html.escape(control)})</h3><p>Paired differences on the "
                     f"same images: (variant vs FP32) − ({html.escape(control)} vs FP32). Above 0: the variant "
                     "stays closer to FP32 than retraining FP32 with another seed does; an interval across 0: "
                     "no difference beyond what retraining alone causes.</p>")
        parts.append(_table(["variant"] + [key.replace("_", " ") for key in keys],
                            [[html.escape(n)] + [_cell(d[key]) for key in keys] for n, d in rows.items()]))
    return parts


def _maps_section(metrics: dict, data: HeldOut, s: Settings, pictures: dict[str, str]) -> list[str]:
    masks = data.masks is not None
    parts = ["<h2>Attribution maps</h2>", _figure(
        pictures["maps"], "Maps for the true class. Under each map: the variant's prediction (green: right, red: "
        "wrong). First column: the input" + (", object mask outlined." if masks else "."))]
    for method in MAP_METHODS:
        header = ["variant", "Spearman vs FP32", f"IoU of top {s.top_fraction:.0%} vs FP32"]
        if masks:
            header += ["pointing game (peak inside mask)", f"pointing game (±{s.tolerance} px)", "energy in mask"]
        rows = []
        for name, v in metrics["variants"].items():
            m = v["maps"][method]
            row = [html.escape(name), _cell(m.get("spearman_vs_fp32")), _cell(m.get("iou_top_vs_fp32"))]
            if masks:
                row += [_cell(m["pointing_game"]), _cell(m["pointing_game_tolerant"]), _cell(m["energy_in_mask"])]
            rows.append(row + [_cell(m["deletion_auc"]), _cell(m["insertion_auc"])])
        parts += [f"<h3>{METHOD_TITLES[method]}</h3>", _table(header + ["deletion AUC ↓", "insertion AUC ↑"], rows)]
    scored = min(s.deletion_images, len(data.labels))
    parts.append(_figure(pictures["curves"], f"Mean deletion and insertion curves over {scored} images (deleted "
                         "pixels set to black; insertion starts from a blurred image)."))
    return parts


def _diagonal_cell(sim: LayerSimilarity, i: int) -> str:
    return f"{sim.values[i, i]:.3f} {_interval(sim.low[i, i], sim.high[i, i])}"


def _representations_section(similarities: dict[str, dict[str, LayerSimilarity]], s: Settings,
                             pictures: dict[str, str]) -> list[str]:
    if not similarities:
        return []
    cka = {name: sims["cka"] for name, sims in similarities.items()}
    first = next(iter(cka.values()))
    parts = ["<h2>Representations</h2>",
             f"<p>Debiased linear CKA (minibatch estimator) on {first.num_images} images; the interval resamples "
             "the minibatches. Rows: FP32's layers; columns: the other variant's.</p>",
             _figure(pictures["diagonal"], "CKA of each block with the same FP32 block, with intervals."),
             "".join(_figure(pictures[f"cka-{name}"], f"FP32 vs {html.escape(name)}") for name in cka),
             _table(["layer"] + [f"CKA FP32 vs {html.escape(name)}" for name in cka],
                    [[html.escape(layer)] + [_diagonal_cell(sim, i) for sim in cka.values()]
                     for i, layer in enumerate(first.layers_a)])]
    if s.cca:
        columns = [(name, method) for name in similarities for method in ("svcca", "pwcca")]
        stages = similarities[columns[0][0]]["svcca"]
        parts += [f"<p>SVCCA (99% of the variance kept) and PWCCA per stage, each spatial position of each image "
                  f"an example ({stages.num_images} images; the interval resamples images).</p>",
                  _table(["stage"] + [f"{method.upper()} FP32 vs {html.escape(name)}" for name, method in columns],
                         [[html.escape(layer)] + [_diagonal_cell(similarities[name][method], i)
                                                  for name, method in columns]
                          for i, layer in enumerate(stages.layers_a)])]
    return parts


def render_page(family: ModelFamily, data: HeldOut, s: Settings, metrics: dict, pictures: dict[str, str],
                similarities: dict[str, dict[str, LayerSimilarity]]) -> str:
    """The HTML page: every picture inline, no reference to anything outside the file."""
    intro = (f"<p>Family <code>{html.escape(family.name)}</code>; {html.escape(data.source)}; seed {s.seed}. "
             "FP32 is the reference. Brackets: 95% percentile-bootstrap intervals, resampling images "
             f"({s.n_boot} replicates).</p>")
    actmax = ["<h2>Activation maximisation</h2>", _figure(
        pictures["actmax"], "The channels of FP32's GradCAM layer most active on these images. Under each image: "
        "the channel objective it reaches / the largest value on the held-out images. INT8 rows: <code>ste</code> "
        "follows a straight-through gradient through the quantizers, <code>true</code> NNCF's own, which is zero "
        "outside the calibrated range.")]
    parts = [intro, *_predictions_section(metrics, min(5, family.num_classes)),
             *_maps_section(metrics, data, s, pictures), *_representations_section(similarities, s, pictures),
             *actmax]
    return string.Template(_TEMPLATE.read_text()).substitute(
        title=html.escape(f"Compressed CNN surgery: {family.name}"), body="\n".join(parts))


# -- Driver ---------------------------------------------------------------------------------------

def _json_ready(value):
    if isinstance(value, Estimate):
        return value.to_dict()
    if isinstance(value, LayerSimilarity):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float):
        return round(value, 6) if np.isfinite(value) else None
    return value


def build_report(zoo: Path, out: Path, settings: Settings = Settings()) -> dict:
    """Measure every variant of ``zoo`` and write ``out/report.html`` and ``out/metrics.json``."""
    s = replace(settings, device=str(resolve_device(settings.device)))
    s.validate()
    faithful(torch.device(s.device))
    variants = load_zoo(zoo, s.device)
    family = get_family(variants[REFERENCE].config["family"])
    data_seed = int(variants[REFERENCE].config.get("recipe", {}).get("seed", 0))
    data = held_out(family, max(s.images, s.repr_images), s.seed, data_seed, s.data_root)
    shown = HeldOut(data.images[: s.images], data.labels[: s.images],
                    None if data.masks is None else data.masks[: s.images], data.indices[: s.images],
                    f"{data.source}: maps and scores on {s.images} of them, representations on {s.repr_images}")
    logits, maps, curves, per_variant, per_image = {}, {}, {}, {}, {}
    for name, variant in tqdm(variants.items(), desc="maps and scores", leave=False):
        logger.info("attribution and scores: %s", name)
        logits[name], maps[name] = attribute(variant.model, shown.images, shown.labels, s.batch_size)
        per_variant[name], per_image[name], curves[name] = variant_metrics(name, variant, shown, logits, maps, s)
    similarities = representation_metrics(variants, data, s)
    channels, rows = actmax_rows(variants, data, family, s)
    metrics = {
        "family": family.name, "zoo_variants": list(variants), "settings": asdict(s),
        "images": {"source": data.source, "indices": shown.indices, "repr_indices": data.indices[: s.repr_images]},
        "variants": per_variant,
        "seed_control": seed_control(per_image, s),
        "representations": similarities,
        "actmax": {"channels": channels,
                   "rows": [{k: v for k, v in r.items() if k != "images"} for r in rows]},
    }
    pictures = {"maps": png_base64(maps_figure(shown, family.class_names, logits, maps, s.shown)),
                "curves": png_base64(curves_figure(curves)),
                "actmax": png_base64(actmax_figure(channels, rows))}
    if similarities:
        pictures["diagonal"] = png_base64(diagonal_figure(similarities))
        for name, sims in similarities.items():
            sim = sims["cka"]
            pictures[f"cka-{name}"] = png_base64(heatmap_figure(
                sim.values, list(sim.layers_a), list(sim.layers_b), "FP32", name, f"CKA: FP32 vs {name}"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.html").write_text(render_page(family, shown, s, metrics, pictures, similarities))
    text = json.dumps(_json_ready(metrics), indent=2, sort_keys=True, allow_nan=False)
    (out / "metrics.json").write_text(text + "\n")
    logger.info("wrote %s and %s", out / "report.html", out / "metrics.json")
    return metrics


_HELP = {
    "images": "held-out images for predictions, maps and scores",
    "seed": "draws the images, the bootstrap and activation maximisation",
    "repr_images": "images for representation similarity (CKA, SVCCA, PWCCA)",
    "cka_batches": "minibatches the CKA streams over; its interval resamples them",
    "batch_size": "images per forward pass",
    "n_boot": "bootstrap replicates per interval",
    "cca": "compute SVCCA and PWCCA per stage (the slowest part)",
    "cca_boot": "bootstrap replicates for SVCCA/PWCCA (each refits CCA)",
    "deletion_images": "images scored by deletion and insertion",
    "deletion_steps": "steps of the deletion and insertion curves",
    "tolerance": "pointing-game tolerance in pixels, reported next to the strict score",
    "top_fraction": "share of top pixels whose IoU compares two maps",
    "actmax_channels": "channels of the GradCAM layer to visualise",
    "actmax_steps": "optimisation steps of activation maximisation",
    "shown": "images drawn with their maps",
    "device": "auto (a CUDA GPU when present), cpu, cuda, cuda:N (env SURGERY_DEVICE; default auto)",
    "data_root": "data of families other than shapes (cifar10, imagenet)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m space.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--zoo", type=Path, required=True, help="a zoo directory: DIR/fp32, DIR/int8, ...")
    p.add_argument("--out", type=Path, required=True, help="where report.html and metrics.json go")
    for name, value in asdict(Settings()).items():
        flag, help_ = f"--{name.replace('_', '-')}", _HELP[name]
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help_)
        else:
            p.add_argument(flag, type=str if value is None else type(value), default=value, help=help_)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings(**{k: v for k, v in vars(args).items() if k not in ("zoo", "out")})
    try:
        build_report(args.zoo, args.out, settings)
    except (FileNotFoundError, CheckpointError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
