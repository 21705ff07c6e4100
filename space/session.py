"""The models every visitor shares, the locks that keep requests apart, and the result caches.

Gradio runs event handlers in worker threads. All requests share one loaded copy of each
model; anything that touches a model (hooks for GradCAM, a backward pass, an optimisation
loop) runs while holding that model's lock, so one request's hooks and gradients never meet
another's, and a result under load equals the result served alone. Requests on different
models still run side by side. Parameters are frozen once at load: attribution needs input
gradients only, and a frozen model has no ``.grad`` for requests to leak through.

``device`` (cpu, cuda, cuda:N, auto) is where the models, the request's image, the hooks and the
gradients live: models move there once, at construction; each request's input moves there and its
answer comes back to the CPU for drawing.

Any set of variants: each request names the variants it wants side by side (at most
:data:`MAX_COLUMNS`); comparisons are always against ``fp32``. Variants trained in the
background join a running session with :meth:`Session.add_variant`; so do whole families built in
the background (held apart in :attr:`Session.coming` until their FP32 model arrives).

Example:
    >>> session = Session(resolve(SourceConfig(source="local")), cache_dir=Path(".cache"))
    >>> result = session.explain("resnet18-shapes", image, "gradient", ["fp32", "int8", "sparse90"])
    >>> result.comparisons[0].same_prediction
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from space.examples import reference_images
from space.zoo_source import REQUIRED, FamilyZoo, LoadedVariant
from study.null import describe as describe_rule, layer_reading
from study.settings import Settings
from surgery import attribution, compression
from surgery.architectures import Architecture, architecture_of
from surgery.devices import DeviceSpec, describe, move, resolve_device
from surgery.actmax import activation_maximization
from surgery.registry import ModelFamily, get_family
from surgery.similarity import LayerSimilarity, layer_similarity, map_spearman, topk_iou
from surgery.variants import DEFAULT_COLUMNS, parse_variant, sort_variants

logger = logging.getLogger(__name__)

SALIENCY_METHODS = attribution.METHODS
MAX_COLUMNS = 4  # variants side by side: what fits a page, and what the page has slots for
MAX_CHANNELS = 8
MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 8, 256, 64
DEFAULT_CHANNELS = (0, 1, 2, 3)
TOP_K = 5
CKA_BATCHES = 10  # the minibatch CKA interval resamples batches: about 10 make a usable one
ALPHA = 1 - Settings().confidence  # the study's false-positive rate: one rule for the whole app


def default_columns(names: list[str]) -> list[str]:
    """The columns a page starts with: FP32, INT8, INT4 and sparse90 among ``names``; where none
    of those compressed ones is there, the first variants in display order (seed controls left out).

    Example:
        >>> default_columns(["fp32", "int8", "sparse50", "sparse90", "fp32-seed1"])
        ['fp32', 'int8', 'sparse90']
    """
    chosen = [v for v in DEFAULT_COLUMNS if v in names]
    if len(chosen) < 2:
        chosen += [v for v in sort_variants(names) if v not in chosen and not parse_variant(v).is_control]
    return sort_variants(chosen[:MAX_COLUMNS])


@dataclass(frozen=True)
class VariantExplanation:
    """One model's answer on one image: class probabilities and its two maps (``[H, W]``)."""

    probabilities: torch.Tensor
    gradcam: torch.Tensor
    saliency: torch.Tensor

    @property
    def prediction(self) -> int:
        return int(self.probabilities.argmax())


@dataclass(frozen=True)
class Comparison:
    """How a compressed variant's answer differs from FP32's on the same image."""

    variant: str
    same_prediction: bool
    gradcam_spearman: float
    gradcam_iou: float
    saliency_spearman: float
    saliency_iou: float


@dataclass(frozen=True)
class Explanation:
    variants: dict[str, VariantExplanation]  # the chosen ones, in display order
    comparisons: list[Comparison]  # each chosen variant other than FP32, against FP32


@dataclass(frozen=True)
class Representations:
    """Layer x layer CKA of FP32 against each chosen variant and every seed control, in words."""

    pairs: dict[str, LayerSimilarity]  # other variant -> CKA(FP32 layers, its layers); controls last
    reading: str
    control_pairs: dict[tuple[str, str], LayerSimilarity]  # between the seed controls: the rule's spread


class Session:
    """Loaded families, one lock per model, and caches of the slow results."""

    def __init__(self, families: dict[str, FamilyZoo], cache_dir: Path, device: DeviceSpec = "cpu") -> None:
        self._order = list(families)
        self.families = {f: zoo for f, zoo in families.items() if REQUIRED in zoo.variants}  # served
        self.coming = {f: zoo for f, zoo in families.items() if REQUIRED not in zoo.variants}  # built meanwhile
        self.cache_dir = Path(cache_dir)
        self.device = resolve_device(device)
        self._locks = {(f, v): threading.Lock() for f, zoo in families.items() for v in zoo.variants}
        for zoo in families.values():
            for variant in zoo.variants.values():
                move(variant.model, self.device).eval().requires_grad_(False)
        logger.info("models on %s", describe(self.device))
        self._memo_lock = threading.Lock()
        self._added = threading.Lock()
        self.version = 0  # counts added variants: pages refresh their choices when it moves
        self.builds: dict[str, object] = {}  # family -> its background build (space.background)
        self._similarity: dict[tuple[str, str, str], LayerSimilarity] = {}
        self._sparsity: dict[tuple[str, str], float] = {}
        self._precomputing: dict[str, threading.Thread] = {}  # family -> its Features precompute
        self._closing = threading.Event()  # set by close(): precomputes stop at their next step

    def add_variant(self, family: str, variant: LoadedVariant) -> None:
        """Make a newly trained variant available to every request from now on (thread-safe); a
        family built in the background is served from its FP32 model on.

        Requests iterate over a snapshot of a family's variants (and of the families): the dicts
        are replaced, never changed in place, so a request running now keeps the set it started with.
        """
        move(variant.model, self.device).eval().requires_grad_(False)
        with self._added:
            zoo = self._tracked(family)
            self._locks[family, variant.name] = threading.Lock()
            merged = {**zoo.variants, variant.name: variant}
            zoo.variants = {name: merged[name] for name in sort_variants(merged)}
            zoo.pending = tuple(v for v in zoo.pending if v != variant.name)
            if family in self.coming and REQUIRED in zoo.variants:
                self.coming = {f: z for f, z in self.coming.items() if f != family}
                served = {**self.families, family: zoo}
                self.families = {f: served[f] for f in self._order if f in served}
            self.version += 1

    def _tracked(self, family: str) -> FamilyZoo:
        """A served family, or one still being built."""
        return self.families.get(family) or self.coming[family]

    def pending(self, family: str) -> tuple[str, ...]:
        """The family's variants still training in the background (all of it for a coming family)."""
        return self._tracked(family).pending

    def give_up(self, family: str, names: list[str]) -> None:
        """Variants whose background training stopped: requests now hear that the family lacks them."""
        with self._added:
            zoo = self._tracked(family)
            zoo.pending = tuple(v for v in zoo.pending if v not in names)

    def zoo(self, family: str) -> FamilyZoo:
        """A served family (``ValueError`` for any other, saying when a coming one joins)."""
        families = self.families
        if family not in families and family in self.coming:
            raise ValueError(f"{family} is still being trained here; it joins the page when its FP32 model is ready")
        try:
            return families[family]
        except KeyError:
            raise ValueError(f"model family {family!r} is not loaded; loaded: {', '.join(families)}") from None

    def variant_names(self, family: str) -> list[str]:
        """The family's loaded variants, in display order."""
        return list(self.zoo(family).variants)

    def default_columns(self, family: str) -> list[str]:
        return default_columns(self.variant_names(family))

    def controls(self, family: str) -> list[str]:
        """The other FP32 training runs: seed controls, or another recipe's run (pretrained families)."""
        return [v for v in self.variant_names(family) if parse_variant(v).is_control]

    def check_variants(self, family: str, variants: list[str] | tuple[str, ...] | None) -> list[str]:
        """The chosen variants in display order, or a ``ValueError`` saying what is wrong."""
        if isinstance(variants, str):  # "fp32, int8" from an API client
            variants = variants.split(",")
        if not isinstance(variants, (list, tuple)):
            raise ValueError(f"variants must be a list of variant names, got {variants!r}")
        chosen = list(dict.fromkeys(str(v).strip() for v in variants if str(v).strip()))
        if not chosen:
            raise ValueError("choose at least one variant")
        if len(chosen) > MAX_COLUMNS:
            raise ValueError(f"at most {MAX_COLUMNS} variants side by side, got {len(chosen)}: {', '.join(chosen)}")
        zoo = self.zoo(family)
        for name in chosen:
            parse_variant(name)  # ValueError with the grammar for a name that is no variant at all
            if name in zoo.pending:
                raise ValueError(f"{name} of {family} is still training; it appears in the choices when ready")
            if name not in zoo.variants:
                raise ValueError(f"{family} has no variant {name!r}; it has {', '.join(zoo.variants)}")
        return sort_variants(chosen)

    @contextmanager
    def model(self, family: str, variant: str) -> Iterator[nn.Module]:
        """Exclusive use of one shared model for the duration of the block."""
        zoo = self.zoo(family)
        loaded = zoo.variants.get(variant)
        if loaded is None:
            raise ValueError(f"{family} has no variant {variant!r}; it has {', '.join(zoo.variants)}")
        with self._locks[family, variant]:
            yield loaded.model

    # -- Explain ----------------------------------------------------------------------------------

    def explain(self, family: str, image: torch.Tensor, method: str = "gradient",
                variants: list[str] | None = None) -> Explanation:
        """The chosen ``variants`` (default: :meth:`default_columns`) on one image ``[3, H, W]``:
        one pass per model (plus the extra passes a non-gradient saliency ``method`` needs), then
        each chosen variant other than FP32 against FP32 (which runs too when not chosen)."""
        if method not in SALIENCY_METHODS:
            raise ValueError(f"unknown saliency method {method!r}; choose from {', '.join(SALIENCY_METHODS)}")
        chosen = self.check_variants(family, self.default_columns(family) if variants is None else variants)
        x = image[None].to(self.device)
        answers = {}
        for name in sort_variants({REQUIRED, *chosen}):
            with self.model(family, name) as model:
                out = attribution.explain(model, x)  # GradCAM at the model's own layer (its architecture)
                saliency = (out.saliency if method == "gradient"
                            else attribution.saliency(model, x, target=out.target, method=method))
            answers[name] = VariantExplanation(out.probabilities[0].cpu(), out.gradcam[0].cpu(), saliency[0].cpu())
        reference = answers[REQUIRED]
        comparisons = [_compare(name, reference, answers[name]) for name in chosen if name != REQUIRED]
        return Explanation({name: answers[name] for name in chosen}, comparisons)

    # -- Features ---------------------------------------------------------------------------------

    def layers(self, family: str) -> list[str]:
        """The stages whose channels the Features tab offers, from the architecture description
        (``layer1`` ... ``layer4``; MobileNetV2: the last block at each resolution)."""
        return list(self._architecture(family).stages)

    def default_layer(self, family: str) -> str:
        """The layer the Features tab opens on: the architecture's GradCAM layer (its last stage)."""
        return self._architecture(family).gradcam_layer

    def _architecture(self, family: str) -> Architecture:
        return architecture_of(self.zoo(family).variants[REQUIRED].model)

    def channels(self, family: str, layer: str) -> int:
        model = self.zoo(family).variants[REQUIRED].model
        return _out_channels(model.get_submodule(layer))

    def check_features_request(self, family: str, layer: str, channels: list[int], steps: int) -> None:
        if layer not in self.layers(family):
            raise ValueError(f"unknown layer {layer!r}; choose from {', '.join(self.layers(family))}")
        count = self.channels(family, layer)
        if not channels:
            raise ValueError("give at least one channel number")
        if len(channels) > MAX_CHANNELS:
            raise ValueError(f"at most {MAX_CHANNELS} channels at a time, got {len(channels)}")
        bad = [c for c in channels if not 0 <= c < count]
        if bad:
            raise ValueError(f"{layer} has channels 0 to {count - 1}; got {', '.join(map(str, bad))}")
        if not MIN_STEPS <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be between {MIN_STEPS} and {MAX_STEPS}, got {steps}")

    def features(self, family: str, layer: str, channels: list[int], steps: int = DEFAULT_STEPS,
                 progress: Callable[[float, str], None] | None = None,
                 variants: list[str] | None = None) -> dict[str, list[Path]]:
        """Activation-maximisation images per chosen variant, one PNG file per channel.

        Results are cached on disk by weights hash, layer, channel and steps: the first channels
        a visitor sees are computed from start-up on (:meth:`precompute`; a request meanwhile waits
        for it rather than computing them twice). The files are what the page serves, so a cached
        answer is never decoded and encoded again.
        """
        self.check_features_request(family, layer, channels, steps)
        chosen = self.check_variants(family, self.default_columns(family) if variants is None else variants)
        running = self._precomputing.get(family)
        if running is not None:
            running.join()
        zoo = self.zoo(family)
        result = {}
        for i, name in enumerate(chosen):
            variant = zoo.variants[name]
            paths = {c: self._feature_path(variant, layer, c, steps) for c in channels}
            missing = [c for c, p in paths.items() if not p.exists()]
            if missing:
                def report(step: int, total: int, i=i, name=name) -> None:
                    if progress is not None:
                        progress((i + step / total) / len(chosen), f"{name}: step {step} of {total}")
                with self.model(family, name) as model:
                    _render_features(model, layer, missing, steps, paths, report)
            result[name] = [paths[c] for c in channels]
        return result

    def _feature_path(self, variant: LoadedVariant, layer: str, channel: int, steps: int) -> Path:
        digest = variant.config["weights"]["sha256"][:16]
        return self.cache_dir / "actmax" / f"{digest}-{layer}-c{channel}-s{steps}.png"

    def close(self) -> None:
        """Stop the Features precomputes at their next step and wait for them: a thread still inside
        torch when the interpreter exits aborts it."""
        self._closing.set()
        for thread in list(self._precomputing.values()):
            thread.join()

    def precompute(self, family: str, steps: int = DEFAULT_STEPS) -> threading.Thread:
        """Compute (or find on disk) what a visitor sees first in the Features tab, in a thread at a
        lower CPU priority, on private copies of the models: the page is served meanwhile and no
        request waits for a model it holds (activation maximisation of a 224-pixel MobileNetV2 for
        FP32 and INT8 takes tens of seconds on 2 cores). Returns the thread."""
        layer, channels = self.default_layer(family), list(DEFAULT_CHANNELS)

        def stop_when_closing(step: int, total: int) -> None:
            if self._closing.is_set():
                raise _Closing

        def run() -> None:
            _lower_priority()
            try:
                for name in self.default_columns(family):
                    variant = self.zoo(family).variants[name]
                    paths = {c: self._feature_path(variant, layer, c, steps) for c in channels}
                    missing = [c for c, p in paths.items() if not p.exists()]
                    if missing:
                        with self.model(family, name) as model:
                            private = copy.deepcopy(model)
                        _render_features(private, layer, missing, steps, paths, stop_when_closing)
            except _Closing:
                logger.info("%s: the Features precompute stopped, the app is closing", family)
                return
            logger.info("%s: the Features tab's first view is ready", family)

        thread = threading.Thread(target=run, name=f"features-{family}", daemon=True)
        self._precomputing[family] = thread
        thread.start()
        return thread

    # -- Representations --------------------------------------------------------------------------

    def representations(self, family: str, variants: list[str] | None = None) -> Representations:
        """CKA of FP32 with each chosen variant and with every seed control, judged by the study's rule
        (:func:`study.null.layer_reading`: the controls' pairs with FP32 and with each other are the
        null of how much two equally good FP32 networks differ); each pair is computed once."""
        chosen = self.check_variants(family, self.default_columns(family) if variants is None else variants)
        controls = self.controls(family)
        others = [v for v in chosen if v != REQUIRED and v not in controls] + controls
        images = None
        pairs, control_pairs = {}, {}
        for a, b in [(REQUIRED, other) for other in others] + list(combinations(controls, 2)):
            with self._memo_lock:  # one computation per pair even when visitors ask at once
                if (family, a, b) not in self._similarity:
                    images = reference_images(get_family(family)) if images is None else images
                    self._similarity[family, a, b] = self._cka(family, a, b, images)
            if a == REQUIRED:
                pairs[b] = self._similarity[family, a, b]
            else:
                control_pairs[a, b] = self._similarity[family, a, b]
        reading = _reading(pairs, controls, list(control_pairs.values()), get_family(family))
        return Representations(pairs, reading, control_pairs)

    def _cka(self, family: str, a: str, b: str, images: torch.Tensor) -> LayerSimilarity:
        """``a`` vs ``b`` over ``images``, from the disk cache when these weights were seen before."""
        zoo = self.zoo(family)
        digests = [zoo.variants[v].config["weights"]["sha256"][:16] for v in (a, b)]
        path = self.cache_dir / "cka" / f"{digests[0]}-{digests[1]}-n{len(images)}.json"
        if path.exists():
            return LayerSimilarity.from_dict(json.loads(path.read_text()))
        batch = max(len(images) // CKA_BATCHES, 4)
        with self.model(family, a) as model_a, self.model(family, b) as model_b:
            sim = layer_similarity(model_a, model_b, images.split(batch), list(architecture_of(model_a).blocks), seed=0)
        data = sim.to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(data))
        partial.replace(path)
        return LayerSimilarity.from_dict(data)  # as a later start reads it back: same numbers either way

    # -- Models -----------------------------------------------------------------------------------

    def sparsity(self, family: str, variant: str) -> float:
        """Fraction of exact zeros in the variant's conv and linear weights (computed once)."""
        key = (family, variant)
        if key not in self._sparsity:
            with self.model(family, variant) as model:
                self._sparsity[key] = compression.weight_sparsity(model)["overall"]
        return self._sparsity[key]


class _Closing(Exception):
    """Raised inside a precompute's activation maximisation once the session is closing."""


def _render_features(model: nn.Module, layer: str, channels: list[int], steps: int, paths: dict[int, Path],
                     progress: Callable[[int, int], None] | None = None) -> None:
    """Activation maximisation of ``channels`` (seed 0), one PNG each at ``paths[channel]``."""
    found = activation_maximization(model, layer, channels, steps=steps, seed=0, progress=progress)
    for c, image in zip(channels, found.images):
        _save_png(paths[c], _to_uint8(image))


def _lower_priority(step: int = 10) -> None:
    """Lower the calling thread's CPU priority (Linux nice values are per thread): background work
    yields the cores to requests. Elsewhere, a no-op."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except (AttributeError, OSError):
        pass


def _out_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    # A stage ends in its last block's last conv (its output width).
    return convs[-1].out_channels if convs else 0


def _compare(name: str, reference: VariantExplanation, other: VariantExplanation) -> Comparison:
    def agree(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
        return float(map_spearman(a[None], b[None])[0]), float(topk_iou(a[None], b[None])[0])

    cam, sal = agree(reference.gradcam, other.gradcam), agree(reference.saliency, other.saliency)
    return Comparison(name, reference.prediction == other.prediction, *cam, *sal)


def _reading(pairs: dict[str, LayerSimilarity], controls: list[str], control_pairs: list[LayerSimilarity],
             family: ModelFamily) -> str:
    """A few sentences on the diagonals (each layer against the same layer of FP32), each compressed
    variant judged by the study's rule against the seed controls: the only fair measure of "differs".
    A family without any (a pretrained FP32 has no seeds) gets no such claim."""
    if not pairs:
        return "Choose a variant other than FP32 to compare its layers with FP32's."
    num_images = next(iter(pairs.values())).num_images
    seeds = len(controls) + 1
    reference = [pairs[c] for c in controls]
    lines = [f"On {num_images} reference images; the diagonal compares each layer with the same layer."]
    readings = {other: layer_reading(sim, reference, [*reference, *control_pairs], seeds, ALPHA)
                for other, sim in pairs.items()}
    for other, r in readings.items():
        layer, lowest = r.lowest
        lines.append(f"- FP32 vs **{other}**: diagonal CKA {r.mean:.2f} on average, lowest {lowest:.2f} at `{layer}`.")
    if not family.has_fp32_seeds:  # the study's rule: another recipe's run is not a seed of this one
        lines.append(f"- The FP32 model of {family.name} is torchvision's pretrained {family.pretrained}, used as "
                     "it is: it has no seeds, so no variant is said to differ from retraining (another recipe's "
                     "run, where loaded, is shown above as a description only).")
        return "\n".join(lines)
    if not controls:
        lines.append("- No FP32 model with another seed in this zoo: there is no control for how much "
                     "two equally good FP32 networks differ.")
        return "\n".join(lines)
    lines.append(f"- Rule (the study's): {describe_rule(ALPHA)}. FP32 seeds: fp32, {', '.join(controls)}.")
    compared = [v for v in pairs if v not in controls]
    if seeds < 3:
        lines.append(f"- No verdict: the rule needs at least 3 FP32 seeds (2 seed controls) for the spread between "
                     f"seeds; this zoo has {seeds}. The control's diagonal above is a description only.")
        return "\n".join(lines)
    for other in compared:
        r = readings[other]
        worse = ", ".join(f"`{v}`" for v in r.worse) or "none"
        better = ", ".join(f"`{v}`" for v in r.better) or "none"
        lines.append(f"- {other} is further from FP32 than retraining at {len(r.worse)} of {len(r.layers)} layers "
                     f"({worse}); closer than retraining at {len(r.better)} ({better}); within the seeds' bound "
                     "elsewhere.")
    return "\n".join(lines)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.png")  # a reader never sees half a file
    Image.fromarray(pixels).save(partial)
    partial.replace(path)

