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
from surgery.similarity.cca import CCA_METHODS, MomentAccumulator, check_keep, warn_if_overfit
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

    ``leave_out`` (``[groups, len(layers_a), len(layers_b)]``, not written by :meth:`to_dict`)
    keeps the leave-one-group-out values, from which paired contrasts between two matrices
    computed on the same images get their own intervals (:meth:`jackknife`).
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

    def to_dict(self, digits: int = 6) -> dict:
        """JSON-ready: matrices as nested lists, NaN as ``None``."""
        def matrix(m: np.ndarray) -> list:
            return [[None if not np.isfinite(v) else round(float(v), digits) for v in row] for row in m]

        return {"method": self.method, "layers_a": list(self.layers_a), "layers_b": list(self.layers_b),
                "values": matrix(self.values), "low": matrix(self.low), "high": matrix(self.high),
                "num_images": self.num_images, "resampling": self.resampling,
                "confidence": self.confidence, "groups": self.groups}


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


def matched_positions(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, P, C]`` pairs with the same positions per image; the finer grid pooled to the coarser."""
    if x.shape[1] == y.shape[1]:
        return x, y
    side_x, side_y = round(x.shape[1] ** 0.5), round(y.shape[1] ** 0.5)
    if side_x ** 2 != x.shape[1] or side_y ** 2 != y.shape[1] or max(side_x, side_y) % min(side_x, side_y):
        raise ValueError(f"cannot align {x.shape[1]} and {y.shape[1]} positions per image: "
                         "compare layers with square maps whose sizes divide each other, or use reduce='pool'")

    def pool(t: torch.Tensor, side: int, to: int) -> torch.Tensor:
        grid = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)
        return F.adaptive_avg_pool2d(grid, to).flatten(2).transpose(1, 2)

    coarse = min(side_x, side_y)
    return pool(x, side_x, coarse), pool(y, side_y, coarse)


class CCAStream:
    """SVCCA/PWCCA of layer pairs, fed batch by batch, with moments per jackknife group.

    ``todo`` lists the ``(i, j)`` layer pairs; :meth:`update` takes one batch of ``[b, P, C]``
    activations per layer on each side (see :func:`reduce_activation` ``"positions"``).
    """

    def __init__(self, todo: Sequence[tuple[int, int]], groups: int) -> None:
        self.todo, self.groups = list(todo), groups
        self.accumulators = {pair: MomentAccumulator(groups) for pair in self.todo}
        self.batches = 0

    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        group = self.batches % self.groups
        for i, j in self.todo:
            x, y = xs[i], ys[j]
            x, y = (x if x.dim() == 3 else x[:, None]), (y if y.dim() == 3 else y[:, None])
            x, y = matched_positions(x, y)
            self.accumulators[i, j].update(x.reshape(-1, x.shape[2]), y.reshape(-1, y.shape[2]), group, len(x))
        self.batches += 1

    def jackknife(self, shape: tuple[int, int], methods: tuple[str, ...], keep) -> dict[str, Jackknife]:
        """``{method: Jackknife of the [I, J] matrix}``, NaN at pairs not computed."""
        if not self.batches:
            raise ValueError("the loader yielded no images")
        groups = min(self.groups, self.batches)
        value = {m: np.full(shape, np.nan) for m in methods}
        leave_out = {m: np.full((groups, *shape), np.nan) for m in methods}
        images = 0
        worst = min(self.accumulators.values(), key=lambda acc: acc.rows / max(min(acc.dims), 1))
        warn_if_overfit(worst.rows, min(worst.dims))  # once, for the pair with the fewest rows per direction
        for (i, j), acc in self.accumulators.items():
            for m, jk in acc.jackknife(methods, keep).items():
                value[m][i, j], leave_out[m][:, i, j] = jk.value, jk.leave_out[:groups]
            images = acc.images
        return {m: Jackknife(value[m], leave_out[m], images) for m in methods}


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
