"""Layer activations of several models on a dataset, and layer x layer similarity between two models.

Activations are captured at named submodules (``"layer4"``, ``"layer2.1"``) with
:class:`surgery.attribution.LayerCapture`, which works the same on FP32, NNCF INT8 and sparse
models: NNCF keeps the model's own modules and runs its quantizers and masks as hooks around
them. Images stream batch by batch, so only one batch of activations is alive at a time
(minibatch CKA keeps three numbers per layer pair and batch; the CCA methods keep the reduced
activations, see ``reduce``).

Example:
    >>> from surgery import load_variant, layer_similarity
    >>> fp32, int8 = load_variant("zoo/fp32").model, load_variant("zoo/int8").model
    >>> loader = DataLoader(held_out, batch_size=64)
    >>> sim = layer_similarity(fp32, int8, loader, ["layer1", "layer2", "layer3", "layer4"])
    >>> sim.values[3, 3], sim.low[3, 3], sim.high[3, 3]     # CKA of layer4 with its 95% interval
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from surgery import compression
from surgery.attribution.activations import LayerCapture
from surgery.similarity.cca import CCA_METHODS, Keep, MomentAccumulator, check_keep, warn_if_overfit
from surgery.similarity.cka import MinibatchCKA
from surgery.similarity.stats import DEFAULT_GROUPS, Jackknife

logger = logging.getLogger(__name__)

REDUCTIONS = ("flatten", "pool", "positions")
METHODS = ("cka",) + CCA_METHODS


def reduce_activation(a: torch.Tensor, how: str) -> torch.Tensor:
    """Turn one layer's batch output into rows for a similarity measure.

    - ``flatten``: ``[b, C*H*W]``, one row per image (Kornblith et al. 2019 flatten conv maps);
    - ``pool``: ``[b, C]``, spatial mean per channel;
    - ``positions``: ``[b, H*W, C]``, every position a row with channels as features
      (Raghu et al. 2017's treatment of conv layers for CCA).
    """
    if how == "flatten":
        return a.reshape(a.shape[0], -1)
    if how == "pool":
        return a.mean(dim=(2, 3)) if a.dim() == 4 else a.reshape(a.shape[0], -1)
    if how == "positions":
        return a.flatten(2).transpose(1, 2) if a.dim() == 4 else a.reshape(a.shape[0], 1, -1)
    raise ValueError(f"unknown reduction {how!r}; choose from {REDUCTIONS}")


def _images(batch) -> torch.Tensor:
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise TypeError("the loader must yield image tensors [b, 3, H, W] or (images, labels, ...) tuples, "
                        f"got {type(images).__name__}")
    return images


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def iter_activations(models: Mapping[str, nn.Module], loader: Iterable, layers: Mapping[str, Sequence[str]],
                     *, reduce: str = "flatten", max_images: int | None = None,
                     progress: bool = False) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Per batch, ``{model name: [reduced activation of each of its layers]}`` (float32, on the CPU).

    Every model sees the same images; ``max_images`` stops the stream after that many.

    Example:
        >>> for acts in iter_activations({"fp32": a, "int8": b}, loader, {"fp32": ["layer4"], "int8": ["layer4"]}):
        ...     acts["fp32"][0].shape
    """
    if set(models) != set(layers):
        raise ValueError(f"layers must name the layers of every model: models {sorted(models)}, "
                         f"layers given for {sorted(layers)}")
    reduce_activation(torch.zeros(1, 1, 1, 1), reduce)  # reject an unknown reduction before any forward
    seen = 0
    with ExitStack() as stack, torch.no_grad():
        captures = {name: [stack.enter_context(LayerCapture(model, layer)) for layer in layers[name]]
                    for name, model in models.items()}
        for batch in tqdm(loader, desc="activations", disable=not progress, leave=False):
            images = _images(batch)
            if max_images is not None:
                images = images[: max_images - seen]
            if len(images) == 0:
                break
            out = {}
            for name, model in models.items():
                for capture in captures[name]:
                    capture.reset()
                with compression.forward_lock(model):
                    model(images.to(_device(model)))
                out[name] = [reduce_activation(c.output, reduce).float().cpu() for c in captures[name]]
            seen += len(images)
            yield out
            if max_images is not None and seen >= max_images:
                break


@dataclass(frozen=True)
class LayerSimilarity:
    """A layer x layer similarity matrix between two models, with jackknife intervals over images.

    ``leave_out`` (``[groups, len(layers_a), len(layers_b)]``) keeps the leave-one-group-out
    values, from which paired contrasts between two matrices computed on the same images get
    their own intervals (:meth:`jackknife`). :meth:`to_dict` and :meth:`from_dict` round-trip
    everything, the replicates included.

    Example:
        >>> again = LayerSimilarity.from_dict(json.loads(json.dumps(sim.to_dict())))
        >>> again.jackknife()[3, 3].estimate()
    """

    method: str
    layers_a: tuple[str, ...]
    layers_b: tuple[str, ...]
    values: np.ndarray  # [len(layers_a), len(layers_b)]; NaN where undefined or not computed
    low: np.ndarray
    high: np.ndarray
    num_images: int
    resampling: str  # what the interval left out
    confidence: float
    groups: int  # jackknife groups of images
    leave_out: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_jackknife(cls, method: str, layers_a, layers_b, jk: Jackknife, resampling: str,
                       confidence: float, mask: str = "all") -> "LayerSimilarity":
        low, high = jk.interval(confidence)
        return cls(method, tuple(layers_a), tuple(layers_b), _mask(jk.value, mask), _mask(low, mask),
                   _mask(high, mask), jk.n, resampling, confidence, jk.groups, jk.leave_out)

    def jackknife(self) -> Jackknife:
        if self.leave_out is None:
            raise ValueError("this similarity was read back without its leave-out replicates")
        return Jackknife(self.values, self.leave_out, self.num_images)

    def to_dict(self) -> dict:
        """JSON-ready: matrices as nested lists (full precision, so :meth:`from_dict` gives the same
        numbers), NaN as ``None``."""
        def matrix(m: np.ndarray) -> list:
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in m]

        out = {"method": self.method, "layers_a": list(self.layers_a), "layers_b": list(self.layers_b),
               "values": matrix(self.values), "low": matrix(self.low), "high": matrix(self.high),
               "num_images": self.num_images, "resampling": self.resampling,
               "confidence": self.confidence, "groups": self.groups}
        if self.leave_out is not None:
            out["leave_out"] = [matrix(m) for m in self.leave_out]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LayerSimilarity":
        """The similarity :meth:`to_dict` wrote (``None`` back to NaN)."""
        def matrix(rows: list) -> np.ndarray:
            return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)

        leave_out = data.get("leave_out")
        return cls(data["method"], tuple(data["layers_a"]), tuple(data["layers_b"]), matrix(data["values"]),
                   matrix(data["low"]), matrix(data["high"]), data["num_images"], data["resampling"],
                   data["confidence"], data["groups"],
                   None if leave_out is None else np.stack([matrix(m) for m in leave_out]))


def layer_similarity(model_a: nn.Module, model_b: nn.Module, loader: Iterable, layers_a: Sequence[str],
                     layers_b: Sequence[str] | None = None, method: str | Sequence[str] = "cka", *,
                     reduce: str | None = None, pairs: str = "all", keep: float | int | None = 0.99,
                     max_images: int | None = None, groups: int = DEFAULT_GROUPS, confidence: float = 0.95,
                     seed: int | None = None, progress: bool = False) -> LayerSimilarity | dict[str, LayerSimilarity]:
    """Similarity of every layer of ``model_a`` with every layer of ``model_b`` over a dataset.

    Works with FP32, NNCF INT8 and sparse models alike (and with the same model twice). Every
    method streams: memory is bounded by one batch (plus, for CCA, second moments per group).
    Intervals: the delete-a-group jackknife over ``groups`` groups of images (batch ``k`` in
    group ``k % groups``; see :mod:`surgery.similarity.stats`). It is deterministic, so ``seed``
    changes nothing (accepted for callers of the earlier bootstrap version).

    - ``method="cka"``: debiased linear CKA streamed over the loader's minibatches (Nguyen et al.
      2021), conv maps flattened. At least ~10 batches for a useful interval.
    - ``method="svcca"`` / ``"pwcca"`` (Raghu et al. 2017 / Morcos et al. 2018): the reduced
      activations (default ``reduce="positions"``: each spatial position of each image is an
      example, channels are features) are summed into second moments, exactly (no subsample).
      Where the two layers' maps differ in size the finer one is average-pooled to the coarser
      grid. ``keep`` is SVCCA's variance fraction.

    ``method=("svcca", "pwcca")`` computes both from one pass over the data and returns
    ``{method: LayerSimilarity}``. ``pairs="diagonal"`` computes only ``(layers_a[i],
    layers_b[i])`` (NaN elsewhere), the cheap choice for the same layers of two variants.

    Example:
        >>> sim = layer_similarity(fp32, int8, loader, ["layer3", "layer4"], method="cka")
        >>> sim.values.shape
        (2, 2)
        >>> both = layer_similarity(fp32, int8, loader, ["layer4"], method=("svcca", "pwcca"))
    """
    del seed  # the jackknife draws nothing
    layers_a = tuple(layers_a)
    layers_b = tuple(layers_b) if layers_b is not None else layers_a
    methods = (method,) if isinstance(method, str) else tuple(method)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown similarity method {unknown[0] if unknown else method!r}; choose from {METHODS}")
    if "cka" in methods and len(methods) > 1:
        raise ValueError("compute CKA and the CCA methods in separate calls: they reduce activations differently")
    if pairs not in ("all", "diagonal"):
        raise ValueError(f"pairs must be 'all' or 'diagonal', got {pairs!r}")
    if pairs == "diagonal" and len(layers_a) != len(layers_b):
        raise ValueError(f"pairs='diagonal' needs as many layers on both sides, "
                         f"got {len(layers_a)} and {len(layers_b)}")
    if not layers_a or not layers_b:
        raise ValueError("give at least one layer on each side")
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    check_keep(keep)
    reduce = reduce or ("flatten" if methods == ("cka",) else "positions")
    models, layers = {"a": model_a, "b": model_b}, {"a": layers_a, "b": layers_b}
    stream = iter_activations(models, loader, layers, reduce=reduce, max_images=max_images, progress=progress)
    if methods == ("cka",):
        acc = streamed_cka(((acts["a"], acts["b"]) for acts in stream), reduce)
        result = {"cka": LayerSimilarity.from_jackknife("cka", layers_a, layers_b, acc.jackknife(groups),
                                                        "jackknife: groups of minibatches of images left out",
                                                        confidence, pairs)}
    else:
        result = _streamed_cca(stream, layers_a, layers_b, methods, pairs, keep, groups, confidence, reduce)
    return result[method] if isinstance(method, str) else result


def _mask(values: np.ndarray, pairs: str) -> np.ndarray:
    if pairs == "all":
        return values
    return np.where(np.eye(*values.shape, dtype=bool), values, np.nan)


def streamed_cka(stream: Iterable[tuple[list[torch.Tensor], list[torch.Tensor]]],
                 reduce: str = "flatten") -> MinibatchCKA:
    """A :class:`MinibatchCKA` fed by ``(xs, ys)`` batches of layer activations."""
    acc, skipped = MinibatchCKA(), 0
    for xs, ys in stream:
        if reduce == "positions":  # CKA needs one row per image
            xs, ys = [x.flatten(1) for x in xs], [y.flatten(1) for y in ys]
        if len(xs[0]) < 4:
            skipped += len(xs[0])  # the unbiased HSIC needs 4 distinct images in a batch
            continue
        acc.update(xs, ys)
    if skipped:
        logger.warning("minibatch CKA: left out a final batch of %d images (fewer than 4)", skipped)
    if acc.num_batches < 10:
        logger.warning("minibatch CKA over %d batches only: the interval is rough", acc.num_batches)
    return acc


def pool_positions(t: torch.Tensor, side: int) -> torch.Tensor:
    """``[N, P, C]`` rows of a square ``sqrt(P) x sqrt(P)`` grid, average-pooled to ``side x side``."""
    grid = round(t.shape[1] ** 0.5)
    if grid ** 2 != t.shape[1] or grid % side:
        raise ValueError(f"cannot pool {t.shape[1]} positions per image to a {side} x {side} grid: "
                         "compare layers with square maps whose sizes divide each other, or use reduce='pool'")
    if grid == side:
        return t
    maps = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], grid, grid)
    return F.adaptive_avg_pool2d(maps, side).flatten(2).transpose(1, 2)


def matched_positions(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, P, C]`` pairs with the same positions per image; the finer grid pooled to the coarser."""
    side = min(round(x.shape[1] ** 0.5), round(y.shape[1] ** 0.5))
    return pool_positions(x, side), pool_positions(y, side)


class DesignEffect:
    """How much the rows of one image repeat each other: Kish's design effect ``1 + (P - 1) ICC``.

    CCA counts every spatial position of every image as a row, but the ``P`` positions of one
    image are correlated (a trained ResNet18's layer4 on shapes: ICC about 0.3), so ``rows``
    rows carry the information of about ``rows / design_effect`` independent ones. ICC is the
    share of each channel's variance that lies between images, pooled over channels (the one-way
    ANOVA estimate; Kish 1965, *Survey Sampling*). Fed ``[images, positions, channels]`` batches.

    Example:
        >>> d = DesignEffect()
        >>> for x in batches:            # [b, positions, channels]
        ...     d.update(x)
        >>> rows / d.value               # effective rows
    """

    def __init__(self) -> None:
        self._shift: torch.Tensor | None = None
        self.images = self.rows = 0
        self._squares = np.zeros(2)  # squared image means, squared rows (summed over channels)
        self._sums: list[torch.Tensor] = []  # image means, rows (per channel)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).cpu()
        if self._shift is None:
            self._shift = x.mean((0, 1))
            self._sums = [torch.zeros_like(self._shift), torch.zeros_like(self._shift)]
        x = x - self._shift  # large ReLU activations would cancel digits in the variances
        means = x.mean(1)
        self.images += len(x)
        self.rows += len(x) * x.shape[1]
        self._squares += [float(means.square().sum()), float(x.square().sum())]
        self._sums[0] += means.sum(0)
        self._sums[1] += x.sum((0, 1))

    @property
    def value(self) -> float:
        if self.images < 2 or self.rows <= self.images:
            return 1.0
        positions = self.rows / self.images
        var_means = (self._squares[0] - float(self._sums[0].square().sum()) / self.images) / (self.images - 1)
        var_rows = (self._squares[1] - float(self._sums[1].square().sum()) / self.rows) / (self.rows - 1)
        if var_rows <= 0:
            return 1.0
        icc = (var_means - var_rows / positions) / (1 - 1 / positions) / var_rows
        return 1 + (positions - 1) * min(max(icc, 0.0), 1.0)


class CCAStream:
    """SVCCA/PWCCA of layer pairs, fed batch by batch, with moments per jackknife group.

    ``todo`` lists the ``(i, j)`` layer pairs; :meth:`update` takes one batch of ``[b, P, C]``
    activations per layer on each side (see :func:`reduce_activation` ``"positions"``).
    ``grid``: pool every layer to ``grid x grid`` positions first, so that every pair has the same
    rows (the layer-matching check compares pairs in one argmax). ``shuffled``: also pair each
    image's rows of ``x`` with the previous image's rows of ``y`` (across batch boundaries), the
    shuffled-images baseline of :meth:`MomentAccumulator.update`.
    """

    def __init__(self, todo: Sequence[tuple[int, int]], groups: int, *, grid: int | None = None,
                 shuffled: bool = False) -> None:
        self.todo, self.groups, self.grid, self.shuffled = list(todo), groups, grid, shuffled
        self.accumulators = {pair: MomentAccumulator(groups) for pair in self.todo}
        self.design = {pair: (DesignEffect(), DesignEffect()) for pair in self.todo}
        self._previous: dict[tuple[int, int], torch.Tensor] = {}  # the last image's rows of y, per pair
        self.batches = 0

    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        group = self.batches % self.groups
        for i, j in self.todo:
            x, y = xs[i], ys[j]
            x, y = (x if x.dim() == 3 else x[:, None]), (y if y.dim() == 3 else y[:, None])
            if self.grid is not None:
                x, y = pool_positions(x, self.grid), pool_positions(y, self.grid)
            x, y = matched_positions(x, y)
            for side, t in zip(self.design[i, j], (x, y)):
                side.update(t)
            shifted = None
            if self.shuffled:
                shifted = torch.cat([self._previous.get((i, j), y[-1:]), y[:-1]])
                self._previous[i, j] = y[-1:]
                shifted = shifted.reshape(-1, y.shape[2])
            self.accumulators[i, j].update(x.reshape(-1, x.shape[2]), y.reshape(-1, y.shape[2]), group, len(x),
                                           shifted)
        self.batches += 1

    def jackknife(self, shape: tuple[int, int], methods: tuple[str, ...], keep: Keep, *, pwcca_keep: Keep = None,
                  pwcca_weights: str = "l1", shuffled: bool = False,
                  min_rows_per_direction: float = 0) -> dict[str, Jackknife]:
        """``{method: Jackknife of the [I, J] matrix}``, NaN at pairs not computed (``keep``,
        ``pwcca_keep``, ``pwcca_weights``: see :meth:`MomentAccumulator.jackknife`).

        Pairs with fewer than ``min_rows_per_direction`` effective rows per direction are not fitted
        (NaN, kept dimensions ``(0, 0)``). Each result's ``extra`` holds, per pair, the kept
        dimensions (``"kept"``), the rows (``"rows"``) and the larger side's design effect
        (``"design_effect"``, see :class:`DesignEffect`).
        """
        if not self.batches:
            raise ValueError("the loader yielded no images")
        groups = min(self.groups, self.batches)
        value = {m: np.full(shape, np.nan) for m in methods}
        leave_out = {m: np.full((groups, *shape), np.nan) for m in methods}
        extra = {m: {"kept": {}, "rows": {}, "design_effect": {}} for m in methods}
        images = 0
        worst = min(self.accumulators.values(), key=lambda acc: acc.rows / max(min(acc.dims), 1))
        warn_if_overfit(worst.rows, min(worst.dims))  # once, for the pair with the fewest rows per direction
        for (i, j), acc in self.accumulators.items():
            design = max(d.value for d in self.design[i, j])
            for m in methods:
                extra[m]["kept"][i, j], extra[m]["rows"][i, j] = (0, 0), acc.rows
                extra[m]["design_effect"][i, j] = design
            images = acc.images
            if acc.rows / design < min_rows_per_direction * min(acc.dims):
                continue
            for m, jk in acc.jackknife(methods, keep, pwcca_keep=pwcca_keep, pwcca_weights=pwcca_weights,
                                       shuffled=shuffled).items():
                value[m][i, j], leave_out[m][:, i, j] = jk.value, jk.leave_out[:groups]
                extra[m]["kept"][i, j] = jk.extra["kept"]
        return {m: Jackknife(value[m], leave_out[m], images, extra=extra[m]) for m in methods}


def _streamed_cca(stream, layers_a, layers_b, methods, pairs, keep, groups, confidence,
                  reduce) -> dict[str, LayerSimilarity]:
    shape = (len(layers_a), len(layers_b))
    todo = [(i, i) for i in range(len(layers_a))] if pairs == "diagonal" else list(np.ndindex(*shape))
    cca = CCAStream(todo, groups)
    for acts in stream:
        cca.update(acts["a"], acts["b"])
    resampling = "jackknife: groups of images left out" + (", with all their positions" if reduce == "positions" else "")
    return {m: LayerSimilarity.from_jackknife(m, layers_a, layers_b, jk, resampling, confidence)
            for m, jk in cca.jackknife(shape, methods, keep).items()}
