"""Measure one variant against its references, streaming the held-out images batch by batch.

For variant ``v`` and each reference ``r`` of :meth:`StudyZoo.references` (FP32 for a
compressed variant; every earlier FP32 seed for an FP32 seed), per batch:

- its own per-image scores: correct or not, predicted class, pointing game and energy in mask
  of GradCAM and saliency (families with object masks), deletion/insertion AUC (on
  ``deletion_images`` images spread over the stream);
- per-image agreement with ``r``: same top-1, top-5 overlap, map Spearman and top-10% IoU;
- representations of every block its architecture description names (a ResNet's residual
  blocks; MobileNetV2's inverted-residual blocks and final 1x1 conv) against ``r``'s same
  blocks: the per-batch unbiased HSIC values of minibatch CKA (all block pairs) and CCA second
  moments per jackknife group (diagonal, with the cross products of the shuffled-images
  pairing; between FP32 seeds also all block pairs on ``match_images`` images, every block
  pooled to the coarsest grid, for the layer-matching check);
- layer diagnostics against FP32: signal and error energy of each block's output (SQNR), and
  the activation values each quantizer clipped;
- for the exemplar gallery (compressed variants): the first ``4 x exemplars`` images FP32 gets
  right and the variant wrong, with both models' GradCAM maps (the gallery keeps those every
  FP32 seed gets right), so the report needs no model.

Memory: one batch of images, maps and activations, plus per-image scalars and fixed-size
moments (``groups`` x features^2 per block). Nothing grows with the images but the scalars.

Example:
    >>> shard = collect_variant(StudyZoo.open("zoo"), "int8", Settings(images=512))
    >>> shard.save(Path("shards"))
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from study.images import HeldOut, held_out
from study.settings import Settings
from study.shard import Shard
from study.zoo import REFERENCE, StudyZoo
from surgery import compression
from surgery.architectures import architecture_of
from surgery.attribution import explain
from surgery.attribution.activations import LayerCapture
from surgery.loading import load_variant
from surgery.scoring import deletion_insertion, energy_in_mask, pointing_game
from surgery.similarity import (CCAStream, MinibatchCKA, cca, map_spearman, prediction_agreement, reduce_activation,
                                topk_iou, topk_overlap)
from surgery.similarity.cca import CCA_METHODS
from surgery.variants import parse_variant

logger = logging.getLogger(__name__)

MAP_METHODS = ("gradcam", "saliency")
SVCCA_KEEP = 0.99  # Raghu et al.'s share of variance; the dimensions are fixed once, from all images
# PWCCA on SVCCA's subspaces with variance weights, bias-corrected like SVCCA (surgery.similarity.cca's
# module docstring): Morcos et al.'s L1 weights carry a bias the jackknife cannot remove.
PWCCA_KEEP, PWCCA_WEIGHTS = SVCCA_KEEP, "variance"
MATCH_DIRECTIONS = 32  # every block pair of the layer-matching check keeps this many directions
EXEMPLAR_CANDIDATES = 4  # images stored per exemplar the gallery shows


@dataclass
class Outputs:
    """One model on one batch."""

    logits: torch.Tensor
    maps: dict[str, torch.Tensor]
    blocks: list[torch.Tensor]  # [b, positions, channels] per block


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, blocks: list[str],
              clipping: dict[str, list[int]] | None = None) -> Outputs:
    """Logits, maps of the true class and block outputs of one batch.

    The block outputs come from a separate no-grad forward, which is also where the values each
    quantizer clips are added to ``clipping`` (``{quantizer: [clipped, total]}``).
    """
    e = explain(model, images, target=labels.to(_device(model)))
    with ExitStack() as stack, torch.no_grad():
        captures = [stack.enter_context(LayerCapture(model, b)) for b in blocks]
        counts = stack.enter_context(compression.clipping_counts(model)) if clipping is not None else {}
        with compression.forward_lock(model):
            model(images.to(_device(model)))
        outputs = [reduce_activation(c.output, "positions").float().cpu() for c in captures]
    for name, (clipped, total) in counts.items():
        running = clipping.setdefault(name, [0, 0])
        running[0] += clipped
        running[1] += total
    return Outputs(e.logits.detach().float().cpu(), {"gradcam": e.gradcam.detach().cpu(),
                                                     "saliency": e.saliency.detach().cpu()}, outputs)


def clipping_by_block(model: nn.Module, clipping: dict[str, list[int]],
                      blocks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Clipped and total activation values of the quantizers inside each block."""
    layer_of = {q.name: q.layer for q in compression.quantizer_ranges(model)}
    clipped, total = np.zeros(len(blocks)), np.zeros(len(blocks))
    for name, (c, t) in clipping.items():
        for k, block in enumerate(blocks):
            if layer_of[name] == block or layer_of[name].startswith(block + "."):
                clipped[k] += c
                total[k] += t
    return clipped, total


def weight_diagnostics(model: nn.Module) -> dict:
    """Per conv/linear layer: share of zero weights and dead filters (output channels all zero)."""
    sparsity = compression.weight_sparsity(model)
    layers = {}
    for name, module in compression.weight_layers(model).items():
        w = module.weight.detach().reshape(module.weight.shape[0], -1)
        layers[name] = {"sparsity": round(sparsity[name], 6), "filters": int(w.shape[0]),
                        "dead_filters": int((w == 0).all(1).sum())}
    return {"overall_sparsity": round(sparsity["overall"], 6), "layers": layers}


def quantizer_bits(model: nn.Module) -> dict[str, list[int]]:
    """Bit widths found in the model's quantizers: weights and activations."""
    ranges = compression.quantizer_ranges(model)
    return {"weights": sorted({q.bits for q in ranges if q.weights}),
            "activations": sorted({q.bits for q in ranges if not q.weights})}


class _Collector:
    """Accumulates one variant's measurements over the stream."""

    def __init__(self, name: str, refs: list[str], blocks: list[str], s: Settings, n: int, masks: bool,
                 pairs_all: bool, exemplars: bool) -> None:
        self.name, self.refs, self.blocks, self.s, self.masks = name, refs, blocks, s, masks
        self.per_image: dict[str, list[np.ndarray]] = {}
        self.cka = {r: MinibatchCKA() for r in refs}
        diagonal = [(i, i) for i in range(len(blocks))]
        self.cca = {r: CCAStream(diagonal, s.groups, shuffled=True) for r in refs}
        self.pairs_all = pairs_all
        self.match: dict[str, CCAStream] = {}
        self.grid: int | None = None
        self.stride = max(1, n // max(s.deletion_images, 1)) if s.deletion_images else 0
        self.signal, self.noise = np.zeros(len(blocks)), np.zeros(len(blocks))
        self.candidates = s.exemplars * EXEMPLAR_CANDIDATES if exemplars and REFERENCE in refs else 0
        self.gallery: dict[str, list[np.ndarray]] = {}

    def add(self, key: str, values: torch.Tensor | np.ndarray) -> None:
        self.per_image.setdefault(key, []).append(np.asarray(torch.as_tensor(values).double()))

    def update(self, start: int, model: nn.Module, images, labels, masks, out: Outputs,
               refs: dict[str, Outputs]) -> None:
        s = self.s
        pred = out.logits.argmax(1)
        self.add("label", labels)
        self.add("pred", pred)
        self.add("correct", (pred == labels).double())
        for method in MAP_METHODS:
            m = out.maps[method]
            if self.masks:
                self.add(f"{method}.pointing_game", pointing_game(m, masks))
                self.add(f"{method}.pointing_game_tolerant", pointing_game(m, masks, s.tolerance))
                self.add(f"{method}.energy_in_mask", energy_in_mask(m, masks))
        if self.stride:
            positions = np.arange(start, start + len(labels))
            chosen = np.flatnonzero((positions % self.stride == 0) & (positions // self.stride < s.deletion_images))
            self.add("deletion.position", positions[chosen])
            for method in MAP_METHODS:
                if len(chosen):
                    di = deletion_insertion(model, images[chosen], out.maps[method][chosen], labels[chosen],
                                            steps=s.deletion_steps, batch_size=s.batch_size)
                    self.add(f"{method}.deletion_auc", di.deletion_auc)
                    self.add(f"{method}.insertion_auc", di.insertion_auc)
                else:
                    self.add(f"{method}.deletion_auc", np.zeros(0))
                    self.add(f"{method}.insertion_auc", np.zeros(0))
        if self.candidates:
            self._keep_exemplars(start, images, labels, pred, out, refs[REFERENCE])
        k = min(5, out.logits.shape[1])
        if self.pairs_all and self.grid is None:
            self.grid = min(round(a.shape[1] ** 0.5) for a in out.blocks)
            self.match = {r: CCAStream(list(np.ndindex(len(self.blocks), len(self.blocks))), 1, grid=self.grid)
                          for r in self.refs}
        for r, ro in refs.items():
            self.add(f"{r}.agreement", prediction_agreement(ro.logits, out.logits))
            self.add(f"{r}.top{k}_overlap", topk_overlap(ro.logits, out.logits, k))
            for method in MAP_METHODS:
                self.add(f"{r}.{method}_spearman", map_spearman(ro.maps[method], out.maps[method]))
                self.add(f"{r}.{method}_iou_top", topk_iou(ro.maps[method], out.maps[method], s.top_fraction))
            if len(labels) >= 4:
                self.cka[r].update([a.flatten(1) for a in ro.blocks], [a.flatten(1) for a in out.blocks])
                self.cca[r].update(ro.blocks, out.blocks)
            if r in self.match and start < s.match_images:
                keep = min(len(labels), s.match_images - start)
                self.match[r].update([a[:keep] for a in ro.blocks], [a[:keep] for a in out.blocks])
            if r == REFERENCE:
                for i, (a, b) in enumerate(zip(ro.blocks, out.blocks)):
                    self.signal[i] += float(a.double().square().sum())
                    self.noise[i] += float((b.double() - a.double()).square().sum())

    def _keep_exemplars(self, start: int, images, labels, pred, out: Outputs, ref: Outputs) -> None:
        """Images FP32 gets right and the variant wrong, with both GradCAM maps, up to ``candidates``."""
        ref_pred = ref.logits.argmax(1)
        found = torch.nonzero((ref_pred == labels) & (pred != labels)).flatten()
        room = self.candidates - sum(len(p) for p in self.gallery.get("exemplar.position", []))
        found = found[:max(room, 0)]
        if not len(found):
            return
        parts = {"exemplar.position": (found + start).numpy(),
                 "exemplar.image": (images[found].clamp(0, 1) * 255).round().to(torch.uint8).numpy(),
                 "exemplar.label": labels[found].numpy(), "exemplar.pred": pred[found].numpy(),
                 "exemplar.fp32_pred": ref_pred[found].numpy(),
                 "exemplar.map": out.maps["gradcam"][found].float().numpy(),
                 "exemplar.fp32_map": ref.maps["gradcam"][found].float().numpy()}
        for key, value in parts.items():
            self.gallery.setdefault(key, []).append(value)

    def arrays(self, model: nn.Module, clipping: dict | None) -> dict[str, np.ndarray]:
        arrays = {k: np.concatenate(v) for k, v in self.per_image.items()}
        arrays.update({k: np.concatenate(v) for k, v in self.gallery.items()})
        shape = (len(self.blocks),) * 2
        for r in self.refs:
            if self.cka[r].num_batches:
                cross, sx, sy = self.cka[r].batch_values()
                arrays.update({f"{r}.cka.cross": cross, f"{r}.cka.self_x": sx, f"{r}.cka.self_y": sy,
                               f"{r}.cka.images": np.array(self.cka[r].num_examples)})
                for shuffled in (False, True):
                    jk = self.cca[r].jackknife(shape, CCA_METHODS, SVCCA_KEEP, pwcca_keep=PWCCA_KEEP,
                                               pwcca_weights=PWCCA_WEIGHTS, shuffled=shuffled,
                                               min_rows_per_direction=cca.ROWS_PER_DIRECTION_FLOOR)
                    for m in CCA_METHODS:
                        key = f"{r}.{m}.shuffled" if shuffled else f"{r}.{m}"
                        arrays[f"{key}.value"] = np.diag(jk[m].value).copy()
                        arrays[f"{key}.leave_out"] = np.stack([np.diag(lo) for lo in jk[m].leave_out])
                        if not shuffled:
                            arrays[f"{r}.{m}.kept"] = np.array([jk[m].extra["kept"][i, i] for i in range(shape[0])])
                rows, design = jk["svcca"].extra["rows"], jk["svcca"].extra["design_effect"]
                arrays[f"{r}.cca.rows"] = np.array([rows[i, i] for i in range(shape[0])])
                arrays[f"{r}.cca.design_effect"] = np.array([design[i, i] for i in range(shape[0])])
                arrays[f"{r}.cca.dims"] = np.array([self.cca[r].accumulators[i, i].dims for i in range(shape[0])])
            if r in self.match and self.match[r].batches:
                jk = self.match[r].jackknife(shape, CCA_METHODS, MATCH_DIRECTIONS, pwcca_keep=MATCH_DIRECTIONS)
                for m in CCA_METHODS:
                    arrays[f"{r}.match.{m}"] = jk[m].value
        if self.grid is not None:
            arrays["match.grid"], arrays["match.directions"] = np.array(self.grid), np.array(MATCH_DIRECTIONS)
        if REFERENCE in self.refs:
            arrays["sqnr.signal"], arrays["sqnr.noise"] = self.signal, self.noise
        if clipping is not None:
            arrays["clip.clipped"], arrays["clip.total"] = clipping_by_block(model, clipping, self.blocks)
        return arrays


class ModelCache:
    """Variants loaded once per process, on the study's device."""

    def __init__(self, zoo: StudyZoo, device: str) -> None:
        self.zoo, self.device, self._models = zoo, device, {}

    def __call__(self, name: str) -> nn.Module:
        if name not in self._models:
            self._models[name] = load_variant(self.zoo.root / name, device=self.device).model
        return self._models[name]


def collect_variant(zoo: StudyZoo, name: str, s: Settings, data: HeldOut | None = None,
                    models: ModelCache | None = None) -> Shard:
    """Measure ``name`` against its references over the study's images (see the module docstring)."""
    if name not in zoo.configs:
        raise ValueError(f"{zoo.root} has no variant {name!r}; it has {', '.join(zoo.names)}")
    s.validate()
    data = data or held_out(zoo.family, s, data_seed(zoo))
    models = models or ModelCache(zoo, s.device)
    model = models(name)
    blocks = list(architecture_of(model).blocks)
    refs = zoo.references(name)
    spec = parse_variant(name)
    quantized = bool(compression.quantizers(model))
    collector = _Collector(name, refs, blocks, s, len(data), data.has_masks,
                           pairs_all=spec.kind == "fp32", exemplars=spec.kind != "fp32")
    clipping = {} if quantized else None
    batches = data.batches(s.batch_size)
    for start, images, labels, masks in tqdm(batches, total=-(-len(data) // s.batch_size),
                                              desc=f"study {name}", leave=False):
        out = run_model(model, images, labels, blocks, clipping)
        ref_out = {r: run_model(models(r), images, labels, blocks) for r in refs}
        collector.update(start, model, images, labels, masks, out, ref_out)
    meta = {"variant": name, "kind": spec.kind, "title": spec.title, "weights_sha256": zoo.sha256(name),
            "references": refs, "reference_sha256": {r: zoo.sha256(r) for r in refs},
            "family": zoo.family.name, "blocks": blocks, "settings": s.measured(), "settings_digest": s.digest(),
            "images": len(data), "images_digest": data.digest(), "source": data.source,
            "weights": weight_diagnostics(model), "bits": quantizer_bits(model) if quantized else None}
    return Shard(meta, collector.arrays(model, clipping))


def data_seed(zoo: StudyZoo) -> int:
    """The seed the zoo's data was generated with (shapes: its held-out images)."""
    return int(zoo.configs[REFERENCE].get("recipe", {}).get("seed", 0))
