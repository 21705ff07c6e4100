"""Layer-wise reconstruction of compressed weights from a few images: pruning and rounding that
compensate their own error, one layer after the other.

Optimal Brain Surgeon (Hassibi & Stork 1993) removes a weight and moves the others to make up for
it, using the Hessian of the layer's squared reconstruction error, ``H = X X^T`` over the layer's
inputs ``X``. Done column by column with a Cholesky factor of ``H^-1`` this is SparseGPT (Frantar &
Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot") for pruning and GPTQ
(Frantar et al. 2023, "Accurate Post-Training Quantization for Generative Pre-trained
Transformers") for rounding onto a quantization grid; OBC (Frantar & Alistarh 2022, "Optimal Brain
Compression") is the same idea for CNNs. On MobileNetV2, magnitude pruning to 50% of every layer
or rounding weights to 4 bits leaves an untrained network that answers like chance; these keep
what each layer computes on the images as far as one layer can.

Layers are processed in forward order, each on its inputs as the layers before it already left
them (a forward pass over the images stops at the layer being reconstructed). A convolution's
inputs are its unfolded patches; a grouped (depthwise) convolution has one Hessian per group.

Example:
    >>> masks = prune_layerwise(model, images, {"features.1.conv.1": 0.5, ...})
    >>> round_layerwise(quantized, images, compression.weight_grids(quantized, images[:1]))
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from surgery import compression

logger = logging.getLogger(__name__)

DAMPING = 0.01  # added to H's diagonal, as a fraction of its mean (SparseGPT's and GPTQ's default)
BLOCK = 128  # columns updated together before the rest of the matrix (lazy batch updates)


class _Reached(Exception):
    """Raised by the hook that has collected a layer's inputs: the rest of the forward is not needed."""


@dataclass(frozen=True)
class Grid:
    """A uniform quantization grid per output channel: ``levels`` values from ``low`` to ``high``."""

    low: torch.Tensor  # [out]
    high: torch.Tensor  # [out]
    levels: int

    def round(self, w: torch.Tensor, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """``w[rows]`` (a column: one value per output channel) rounded to the nearest grid value, clipped."""
        low, high = self.low[rows].to(w), self.high[rows].to(w)
        step = (high - low) / (self.levels - 1)
        return torch.clamp(torch.round((w - low) / step), 0, self.levels - 1) * step + low


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, i, name=n: order.append(name) if name not in order else None)
               for n, m in _layers(model).items()]
    try:
        with torch.no_grad(), compression.forward_lock(model):
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return order


def _hessian_update(module: nn.Module, x: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """Add ``X X^T`` of this batch of inputs to ``hessian`` (``[groups, d, d]``, float64)."""
    if isinstance(module, nn.Linear):
        cols = x.reshape(-1, x.shape[-1]).double()[None]  # [1, n, d]
    else:
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [N, C*k*k, L]
        groups = module.groups
        patches = patches.reshape(x.shape[0], groups, -1, patches.shape[-1])  # [N, g, d, L]
        cols = patches.permute(1, 0, 3, 2).reshape(groups, -1, patches.shape[2]).double()  # [g, n, d]
    update = cols.transpose(1, 2) @ cols
    return update if hessian is None else hessian + update


def _layer_hessian(model: nn.Module, name: str, images: torch.Tensor, batch: int) -> torch.Tensor:
    module = dict(model.named_modules())[name]
    hessian: list[torch.Tensor | None] = [None]

    def hook(mod: nn.Module, inputs: tuple) -> None:
        hessian[0] = _hessian_update(mod, inputs[0].detach(), hessian[0])
        raise _Reached

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), compression.forward_lock(model):
            for i in range(0, len(images), batch):
                try:
                    model(images[i:i + batch])
                except _Reached:
                    pass
    finally:
        handle.remove()
    return hessian[0] / len(images)


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A conv or linear weight as ``[groups, rows, d]``: each group's output channels by its inputs."""
    return weight.detach().double().reshape(groups, weight.shape[0] // groups, -1)


def _inverse_factor(hessian: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damping)^-1`` per group; inputs that are always zero get
    a unit diagonal and their weights zeroed (they never contribute)."""
    h = hessian.clone()
    dead = torch.diagonal(h, dim1=1, dim2=2) == 0
    h[dead.unsqueeze(-1) & torch.eye(h.shape[-1], dtype=torch.bool, device=h.device)] = 1
    w[dead.unsqueeze(1).expand_as(w)] = 0
    damp = DAMPING * torch.diagonal(h, dim1=1, dim2=2).mean(1)
    h = h + damp[:, None, None] * torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def _reconstruct(w: torch.Tensor, hessian: torch.Tensor, ratio: float | None, grid: Grid | None,
                 rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT / GPTQ on ``w: [g, r, d]``: prune ``ratio`` of the weights of each block of columns
    (chosen by ``w^2 / [H^-1]_jj^2``, across the whole layer) and/or round onto ``grid``, column by
    column, spreading each column's error over the columns not yet done. ``rows[g, r]`` is the
    output channel of each row (for the grid). Returns the new weights and the mask of kept ones."""
    w = w.clone()
    hinv = _inverse_factor(hessian, w)
    keep = torch.ones_like(w, dtype=torch.bool)
    d = w.shape[-1]
    for start in range(0, d, BLOCK):
        end = min(start + BLOCK, d)
        block, h_block = w[..., start:end].clone(), hinv[:, start:end, start:end]
        errors = torch.zeros_like(block)
        if ratio:
            diag = torch.diagonal(h_block, dim1=1, dim2=2)[:, None, :]
            score = block ** 2 / diag ** 2
            k = int(score.numel() * ratio)
            if k:
                threshold = score.flatten().kthvalue(k).values
                keep[..., start:end] = score > threshold
        for j in range(end - start):
            column = block[..., j]
            target = torch.where(keep[..., start + j], column, torch.zeros_like(column))
            if grid is not None:
                target = torch.where(keep[..., start + j], grid.round(target, rows), target)
            error = (column - target) / h_block[:, j, j][:, None]
            block[..., j:] -= error[..., None] * h_block[:, None, j, j:]
            block[..., j] = target
            errors[..., j] = error
        w[..., start:end] = block
        w[..., end:] -= errors @ hinv[:, start:end, end:]
    return w, keep


def _apply(model: nn.Module, images: torch.Tensor, plans: Mapping[str, tuple[float | None, Grid | None]],
           batch: int, desc: str) -> dict[str, torch.Tensor]:
    layers = _layers(model)
    unknown = sorted(set(plans) - set(layers))
    if unknown:
        raise ValueError(f"no conv or linear layers named {', '.join(unknown)}")
    was_training = model.training
    masks = {}
    try:
        order = [n for n in _forward_order(model, images[:1]) if n in plans]
        for name in tqdm(order, desc=desc, leave=False):
            module = layers[name]
            groups = getattr(module, "groups", 1)
            hessian = _layer_hessian(model, name, images, batch)
            rows = torch.arange(module.weight.shape[0], device=hessian.device).reshape(groups, -1)
            ratio, grid = plans[name]
            new, keep = _reconstruct(_grouped(module.weight, groups), hessian, ratio, grid, rows)
            with torch.no_grad():
                module.weight.copy_(new.reshape(module.weight.shape))
            masks[name] = keep.reshape(module.weight.shape)
    finally:
        model.train(was_training)
    return masks


def prune_layerwise(model: nn.Module, images: torch.Tensor, ratios: Mapping[str, float],
                    batch: int = 16) -> dict[str, torch.Tensor]:
    """Prune each named layer of ``model`` (in place) to its ratio with SparseGPT's reconstruction on
    ``images``; returns each layer's boolean mask of kept weights (its pruned weights are exact zeros)."""
    return _apply(model, images, {name: (ratio, None) for name, ratio in ratios.items()}, batch, "prune layer-wise")


def round_layerwise(model: nn.Module, images: torch.Tensor, grids: Mapping[str, Grid], batch: int = 16) -> None:
    """Round each named layer's weights onto its grid with GPTQ on ``images`` (in place): the
    quantizer that serves the layer then reproduces them exactly, and its rounding error is the
    one GPTQ chose."""
    _apply(model, images, {name: (None, grid) for name, grid in grids.items()}, batch, "round layer-wise")


def layer_ratios(model: nn.Module, target: float, dense: Iterable[str] = ()) -> dict[str, float]:
    """Every conv and linear layer at one sparsity such that ``target`` holds over all their weights,
    the ``dense`` layers left out (as :func:`surgery.compression.start_magnitude_sparsity` does)."""
    sizes = {n: m.weight.numel() for n, m in _layers(model).items()}
    dense = set(dense)
    ratio = target * sum(sizes.values()) / sum(v for n, v in sizes.items() if n not in dense)
    if ratio >= 1:
        raise ValueError(f"{target:.0%} sparsity cannot be reached with {len(dense)} layers left dense")
    return {n: ratio for n in sizes if n not in dense}
