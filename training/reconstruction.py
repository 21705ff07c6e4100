"""Layer-wise reconstruction of a pruned network: each layer's surviving weights refitted, by least
squares on calibration images, so that the layer gives the FP32 layer's outputs.

Magnitude pruning at 50% breaks MobileNetV2 (agreement with FP32 near 0% one-shot), and on a few
dozen photos fine-tuning does not bring it back. The pruned weights' loss can instead be absorbed
by the weights that stay, layer by layer: Optimal Brain Surgeon's update for a fixed mask (Hassibi &
Stork 1993; per layer as in Frantar & Alistarh 2022, "Optimal Brain Compression", and SparseGPT,
Frantar & Alistarh 2023). For one output row ``w`` of a layer with support ``S`` (its unpruned
inputs), ``x_s`` the layer's inputs in the pruned network and ``x_t`` in FP32 on the same images:

    w_S = argmin ||x_s[:, S] w_S - x_t w_fp32||^2 + lam ||w_S - w_fp32,S||^2,
    i.e.   (H_SS + lam I) w_S = (x_s^T x_t w_fp32 + lam w_fp32)_S

with ``H = x_s^T x_s``. Layers are refitted in forward order, each on inputs that already carry
the refitted layers upstream (the pruned network's own inputs, not FP32's), so the errors do not
add up through the depth. The masks do not change: zeros stay zeros.

Example:
    >>> reconstruct_pruned_layers(sparse_model, fp32_model, photo_crops)   # [N, 3, H, W], N ~ 256
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from surgery import compression

logger = logging.getLogger(__name__)

DAMPING = 0.01  # of the mean diagonal of H, as SparseGPT's default
# A layer is refitted only where the images give at least this many rows (output positions) per
# input weight: with fewer, the fit reproduces the calibration images and moves away from FP32
# elsewhere (a tiny MobileNetV2's classifier on 64 images came out further from FP32 than unrefitted).
MIN_ROWS_PER_INPUT = 4


class _Captured(Exception):
    """Ends a forward pass once the layer's input has been seen: nothing after it is needed."""


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of what each output position sees: ``[positions, groups, fan_in]``."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1])
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    fan_in = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    return cols.reshape(len(x), layer.groups, fan_in, -1).permute(0, 3, 1, 2).reshape(-1, layer.groups, fan_in)


def _input(model: nn.Module, name: str, images: torch.Tensor) -> torch.Tensor:
    """The input of ``model``'s layer ``name`` on ``images`` (the forward stops there)."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple) -> None:
        seen.append(inputs[0])
        raise _Captured

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        model(images)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen[0]


def _refit(fp32: torch.Tensor, kept: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
           damping: float) -> torch.Tensor:
    """Each output row refitted on its support ``kept``; ``hessian``/``cross``: ``[groups, fan_in, fan_in]``."""
    groups = hessian.shape[0]
    rows = fp32.reshape(groups, -1, hessian.shape[-1]).double()  # [groups, rows per group, fan_in]
    mask = kept.reshape(rows.shape)
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype)
    out = torch.zeros_like(rows)
    for g in range(groups):
        # The damping pulls towards FP32's weights, not towards 0: a layer that lost nothing and
        # sees FP32's inputs keeps its weights exactly.
        lam = damping * hessian[g].diagonal().mean().clamp_min(1e-12)
        target = rows[g] @ cross[g].T + lam * rows[g]  # x_s^T x_t w_fp32 + lam w_fp32, per row
        for start in range(0, rows.shape[1], 64):  # a system per row, its pruned inputs fixed at 0
            m = mask[g, start:start + 64].double()
            a = m[:, :, None] * (hessian[g] + lam * eye) * m[:, None, :] + torch.diag_embed(1 - m)
            # Symmetric positive definite (damped H on the support, identity elsewhere): Cholesky.
            factor = torch.linalg.cholesky(a)
            out[g, start:start + 64] = torch.cholesky_solve((m * target[start:start + 64])[..., None], factor)[..., 0]
    return out.reshape(fp32.shape).to(fp32.dtype)


@torch.no_grad()
def reconstruct_pruned_layers(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                              batch_size: int = 16, damping: float = DAMPING) -> dict[str, float]:
    """Refit the unpruned weights of every conv and linear layer of ``student`` (matched to
    ``teacher``'s by name; zeros are its masks) so that, on ``images``, each layer's output is as
    close as least squares gets to the teacher's (see the module docstring). Returns each layer's
    relative output error after the refit; layers with fewer than ``MIN_ROWS_PER_INPUT`` rows per
    input weight on these images keep their weights and are left out. Both models are left in eval mode."""
    student.eval(), teacher.eval()
    layers = [name for name, m in student.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    errors: dict[str, float] = {}
    for name in tqdm(layers, desc="reconstruct", leave=False):
        layer, reference = student.get_submodule(name), teacher.get_submodule(name)
        moments, rows = None, 0  # x_s^T x_s, x_s^T x_t, x_t^T x_t per group
        for batch in images.split(batch_size):
            with compression.forward_lock(student):
                xs = _rows(layer, _input(student, name, batch))
            xt = _rows(reference, _input(teacher, name, batch))
            new = [torch.einsum("ngi,ngj->gij", a, b).double() for a, b in ((xs, xs), (xs, xt), (xt, xt))]
            moments = new if moments is None else [m + n for m, n in zip(moments, new)]
            rows += len(xs)
        if rows < MIN_ROWS_PER_INPUT * xs.shape[-1]:
            logger.info("%s: %d rows for %d inputs a row, too few to refit: left as pruned", name, rows, xs.shape[-1])
            continue
        kept = layer.weight != 0
        layer.weight.copy_(_refit(reference.weight, kept, *moments[:2], damping))
        errors[name] = _relative_error(layer.weight, reference.weight, *moments)
    logger.info("%d of %d layers refitted to FP32's outputs on %d images: median relative output error %.3f",
                len(errors), len(layers), len(images), float(torch.tensor([*errors.values(), math.nan]).nanmedian()))
    return errors


def _relative_error(weight: torch.Tensor, fp32: torch.Tensor, ss: torch.Tensor, st: torch.Tensor,
                    tt: torch.Tensor) -> float:
    """``||x_s w - x_t w_fp32|| / ||x_t w_fp32||`` over the calibration images, from the moments."""
    w = weight.reshape(ss.shape[0], -1, ss.shape[-1]).double()
    v = fp32.reshape(w.shape).double()
    quad = lambda a, m, b: torch.einsum("gri,gij,grj->", a, m, b)  # noqa: E731
    target = quad(v, tt, v)
    return float((quad(w, ss, w) - 2 * quad(w, st, v) + target).clamp_min(0).sqrt() / target.sqrt().clamp_min(1e-30))
