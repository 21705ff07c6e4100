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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from surgery import compression
from surgery.attribution.activations import LayerCapture
from surgery.similarity.cca import CCA_METHODS, ImageMoments, Moments, cca_scores, check_keep, moments, warn_if_overfit
from surgery.similarity.cka import MinibatchCKA
from surgery.similarity.stats import DEFAULT_BOOT, percentile_interval, resample_counts

logger = logging.getLogger(__name__)

REDUCTIONS = ("flatten", "pool", "positions")
IMAGE_MOMENTS_BUDGET = 256 * 2**20  # bytes of per-image moments worth keeping to speed up the bootstrap
METHODS = ("cka",) + CCA_METHODS


def residual_blocks(model: nn.Module) -> list[str]:
    """A ResNet's residual blocks in order (``layer1.0`` ... ``layer4.1``): where variants are compared."""
    blocks = [f"{stage}.{i}" for stage, module in model.named_children()
              if stage.startswith("layer") and isinstance(module, nn.Sequential) for i in range(len(module))]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no ResNet stages (layer1, layer2, ...)")
    return blocks


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
    """A layer x layer similarity matrix between two models, with bootstrap percentile intervals."""

    method: str
    layers_a: tuple[str, ...]
    layers_b: tuple[str, ...]
    values: np.ndarray  # [len(layers_a), len(layers_b)]; NaN where undefined or not computed
    low: np.ndarray
    high: np.ndarray
    num_images: int
    resampling: str  # what the bootstrap resampled
    confidence: float
    n_boot: int

    def to_dict(self, digits: int = 6) -> dict:
        """JSON-ready: matrices as nested lists, NaN as ``None``."""
        def matrix(m: np.ndarray) -> list:
            return [[None if not np.isfinite(v) else round(float(v), digits) for v in row] for row in m]

        return {"method": self.method, "layers_a": list(self.layers_a), "layers_b": list(self.layers_b),
                "values": matrix(self.values), "low": matrix(self.low), "high": matrix(self.high),
                "num_images": self.num_images, "resampling": self.resampling,
                "confidence": self.confidence, "n_boot": self.n_boot}


def layer_similarity(model_a: nn.Module, model_b: nn.Module, loader: Iterable, layers_a: Sequence[str],
                     layers_b: Sequence[str] | None = None, method: str | Sequence[str] = "cka", *,
                     reduce: str | None = None, pairs: str = "all", keep: float | int | None = 0.99,
                     max_images: int | None = None, n_boot: int = DEFAULT_BOOT, confidence: float = 0.95,
                     seed: int = 0, progress: bool = False) -> LayerSimilarity | dict[str, LayerSimilarity]:
    """Similarity of every layer of ``model_a`` with every layer of ``model_b`` over a dataset.

    Works with FP32, NNCF INT8 and sparse models alike (and with the same model twice).

    - ``method="cka"``: debiased linear CKA streamed over the loader's minibatches (Nguyen et al.
      2021), conv maps flattened; memory is bounded by one batch. The interval resamples the
      minibatches (images in the groups they were seen in; at least ~10 batches for a useful one).
    - ``method="svcca"`` / ``"pwcca"`` (Raghu et al. 2017 / Morcos et al. 2018): the reduced
      activations (default ``reduce="positions"``: each spatial position of each image is an
      example, channels are features) are kept for every image; the interval resamples images,
      each with all its positions. Where the two layers' maps differ in size the finer one is
      average-pooled to the coarser grid. ``keep`` is SVCCA's variance fraction.

    ``method=("svcca", "pwcca")`` computes both from one pass over the data and returns
    ``{method: LayerSimilarity}``. ``pairs="diagonal"`` computes only ``(layers_a[i],
    layers_b[i])`` (NaN elsewhere), the cheap choice for the same layers of two variants.

    Example:
        >>> sim = layer_similarity(fp32, int8, loader, ["layer3", "layer4"], method="cka")
        >>> sim.values.shape
        (2, 2)
        >>> both = layer_similarity(fp32, int8, loader, ["layer4"], method=("svcca", "pwcca"))
    """
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
    check_keep(keep)
    reduce = reduce or ("flatten" if methods == ("cka",) else "positions")
    models, layers = {"a": model_a, "b": model_b}, {"a": layers_a, "b": layers_b}
    stream = iter_activations(models, loader, layers, reduce=reduce, max_images=max_images, progress=progress)
    if methods == ("cka",):
        result = {"cka": _streamed_cka(stream, layers_a, layers_b, pairs, n_boot, confidence, seed, reduce)}
    else:
        result = _stored_cca(stream, layers_a, layers_b, methods, pairs, keep, n_boot, confidence, seed, reduce)
    return result[method] if isinstance(method, str) else result


def _mask(values: np.ndarray, pairs: str) -> np.ndarray:
    if pairs == "all":
        return values
    return np.where(np.eye(*values.shape, dtype=bool), values, np.nan)


def _streamed_cka(stream, layers_a, layers_b, pairs, n_boot, confidence, seed, reduce) -> LayerSimilarity:
    acc, skipped = MinibatchCKA(), 0
    for acts in stream:
        xs, ys = acts["a"], acts["b"]
        if reduce == "positions":  # CKA needs one row per image
            xs, ys = [x.flatten(1) for x in xs], [y.flatten(1) for y in ys]
        if len(xs[0]) < 4:
            skipped += len(xs[0])  # the unbiased HSIC needs 4 distinct images in a batch
            continue
        acc.update(xs, ys)
    if skipped:
        logger.warning("minibatch CKA: left out a final batch of %d images (fewer than 4)", skipped)
    if acc.num_batches < 10:
        logger.warning("minibatch CKA over %d batches only: the bootstrap interval is rough", acc.num_batches)
    low, high = acc.interval(n_boot, confidence, seed)
    return LayerSimilarity("cka", layers_a, layers_b, _mask(acc.compute().numpy(), pairs),
                           _mask(low.numpy(), pairs), _mask(high.numpy(), pairs), acc.num_examples,
                           "images, in their minibatches", confidence, n_boot)


def _matched(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def _image_weighted_moments(x: torch.Tensor, y: torch.Tensor):
    """``weights [N] -> Moments`` of the rows of ``x: [N, P, p]``, ``y``, each image weighted as a whole.

    Resampling an image repeats all its positions; with several positions per image and room in
    the budget, per-image moments make each replicate a sum over images, not over rows.
    """
    if x.shape[1] > 1 and ImageMoments.nbytes(x.shape[0], x.shape[2], y.shape[2]) <= IMAGE_MOMENTS_BUDGET:
        return ImageMoments(x, y).moments
    rows_x, rows_y, positions = x.reshape(-1, x.shape[2]), y.reshape(-1, y.shape[2]), x.shape[1]

    def weighted(weights: torch.Tensor | None) -> Moments:
        return moments(rows_x, rows_y, None if weights is None else weights.repeat_interleave(positions))

    return weighted


def _stored_cca(stream, layers_a, layers_b, methods, pairs, keep, n_boot, confidence, seed,
                reduce) -> dict[str, LayerSimilarity]:
    kept: dict[str, list[list[torch.Tensor]]] = {"a": [[] for _ in layers_a], "b": [[] for _ in layers_b]}
    for acts in stream:
        for side in ("a", "b"):
            for store, act in zip(kept[side], acts[side]):
                store.append(act if act.dim() == 3 else act[:, None])  # [b, positions, features]
    if not kept["a"][0]:
        raise ValueError("the loader yielded no images")
    feats = {side: [torch.cat(store).double() for store in kept[side]] for side in kept}
    num_images = feats["a"][0].shape[0]
    counts = torch.from_numpy(resample_counts(num_images, n_boot, seed))
    shape = (len(layers_a), len(layers_b))
    values, low, high = ({m: np.full(shape, np.nan) for m in methods} for _ in range(3))
    todo = [(i, i) for i in range(len(layers_a))] if pairs == "diagonal" else list(np.ndindex(*shape))
    for i, j in tqdm(todo, desc="/".join(methods), leave=False):
        x, y = _matched(feats["a"][i], feats["b"][j])
        warn_if_overfit(x.shape[0] * x.shape[1], min(x.shape[2], y.shape[2]))
        weighted = _image_weighted_moments(x, y)
        full = cca_scores(weighted(None), methods, keep)
        replicates = [cca_scores(weighted(c), methods, keep) for c in counts]
        for m in methods:
            values[m][i, j] = full[m]
            low[m][i, j], high[m][i, j] = percentile_interval(np.array([r[m] for r in replicates]), confidence)
    resampling = "images" + (", with all their positions" if reduce == "positions" else "")
    return {m: LayerSimilarity(m, layers_a, layers_b, values[m], low[m], high[m], num_images, resampling,
                               confidence, n_boot) for m in methods}
