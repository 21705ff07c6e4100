"""Layer-wise reconstruction of a compressed network: each layer's weights refitted, by least
squares on calibration images, so that the layer gives the FP32 layer's outputs; for a quantized
layer, then rounded onto its grid with the rounding errors compensated.

Magnitude pruning at 50% breaks MobileNetV2 (agreement with FP32 near 0% one-shot), and so does
4-bit rounding of its weights; on a few dozen photos fine-tuning does not bring either back. The
loss can instead be absorbed layer by layer, by the weights that stay: Optimal Brain Surgeon's
update for a fixed mask (Hassibi & Stork 1993; per layer as in Frantar & Alistarh 2022, "Optimal
Brain Compression", and SparseGPT, Frantar & Alistarh 2023). For one output row ``w`` of a layer
with support ``S`` (its unpruned inputs), ``x_s`` the layer's inputs in the compressed network
and ``x_t`` in FP32 on the same images:

    w_S = argmin ||x_s[:, S] w_S - x_t w_fp32||^2 + lam ||w_S - w_fp32,S||^2,
    i.e.   (H_SS + lam I) w_S = (x_s^T x_t w_fp32 + lam w_fp32)_S

with ``H = x_s^T x_s`` and ``lam = damping * mean(diag(H))``. SparseGPT's 0.01 only keeps the
solve stable; a larger damping (a recipe's ``reconstruction_damping``) is a ridge towards FP32's
weights, for calibration images unlike the training data, whose every direction the fit would
otherwise learn (ImageNet's MobileNetV2 refitted on package photos: the README). A quantized
layer keeps every input (``S`` is all of them), and its refitted rows are then rounded one input
column at a time, each column's error spread over the columns not yet rounded (GPTQ, Frantar et
al. 2023). Layers are refitted in forward order, each on inputs that already carry the refitted
layers upstream (the compressed network's own inputs, not FP32's), so the errors do not add up
through the depth. Masks and quantizer scales do not change.

Example:
    >>> reconstruct_pruned_layers(sparse_model, fp32_model, photo_crops)   # [N, 3, H, W], N ~ 256
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from surgery import compression
from surgery.registry import Recipe

logger = logging.getLogger(__name__)

DAMPING = Recipe.reconstruction_damping  # of the mean diagonal of H: SparseGPT's 0.01, the recipes' default
# A layer is refitted only where the images give at least this many rows (output positions) per
# input weight: with fewer, the fit reproduces the calibration images and moves away from FP32
# elsewhere (a tiny MobileNetV2's classifier on 64 images came out further from FP32 than unrefitted).
MIN_ROWS_PER_INPUT = 4


class _Captured(Exception):
    """Ends the teacher's forward early, when the student's has ended: nothing after is needed."""


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of what each output position sees: ``[groups, positions, fan_in]``."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    fan_in = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    return cols.reshape(len(x), layer.groups, fan_in, -1).permute(1, 0, 3, 2).reshape(layer.groups, -1, fan_in)


class _TeacherInputs:
    """The teacher's forward over the images in a thread of its own, handing each of ``layers``'
    inputs over, in forward order, when the student's forward asks for it: one teacher forward in
    all, at most one layer ahead of the student (a forward per layer would cost depth^2 / 2)."""

    def __init__(self, teacher: nn.Module, layers: list[str], images: torch.Tensor) -> None:
        self._handed: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._handles = [teacher.get_submodule(name).register_forward_pre_hook(self._hand_over(name))
                         for name in layers]
        self._thread = threading.Thread(target=self._forward, args=(teacher, images), daemon=True)
        self._thread.start()

    def _hand_over(self, name: str):
        handed = False  # a layer called twice gives its first input only, as the student takes it

        def hook(module: nn.Module, inputs: tuple) -> None:
            nonlocal handed
            while not handed and not self._stop.is_set():
                try:
                    self._handed.put((name, inputs[0]), timeout=0.1)
                    handed = True
                except queue.Full:
                    pass
            if self._stop.is_set():
                raise _Captured
        return hook

    def _forward(self, teacher: nn.Module, images: torch.Tensor) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                teacher(images)
        except _Captured:
            pass
        except BaseException as exc:  # handed to the student's thread by take()
            self._error = exc

    def take(self, name: str) -> torch.Tensor:
        """The teacher's input of layer ``name``, the next one in forward order."""
        while True:
            try:
                handed, x = self._handed.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(f"the teacher's forward ended before reaching {name}") from self._error
        if handed != name:
            raise RuntimeError(f"the teacher reached {handed} where the student reached {name}: "
                               "the two networks must run the same layers in the same order")
        return x

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for handle in self._handles:
            handle.remove()


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
        if mask[g].all():  # nothing pruned: one system for every row
            out[g] = torch.cholesky_solve(target.T, torch.linalg.cholesky(hessian[g] + lam * eye)).T
            continue
        for start in range(0, rows.shape[1], 64):  # a system per row, its pruned inputs fixed at 0
            m = mask[g, start:start + 64].double()
            a = m[:, :, None] * (hessian[g] + lam * eye) * m[:, None, :] + torch.diag_embed(1 - m)
            # Symmetric positive definite (damped H on the support, identity elsewhere): Cholesky.
            factor = torch.linalg.cholesky(a)
            out[g, start:start + 64] = torch.cholesky_solve((m * target[start:start + 64])[..., None], factor)[..., 0]
    return out.reshape(fp32.shape).to(fp32.dtype)


def _moments(layer: nn.Module, xs: torch.Tensor, xt: torch.Tensor, chunk: int) -> list[torch.Tensor] | None:
    """``[x_s^T x_s, x_s^T x_t, x_t^T x_t]`` per group of ``layer``'s input rows (``xs`` in the
    student, ``xt`` in the teacher, on the same images); None where the images give fewer than
    ``MIN_ROWS_PER_INPUT`` rows per input weight."""
    gram, rows = 0, 0
    for a, b in zip(xs.split(chunk), xt.split(chunk)):  # unfolded 3x3 inputs are 9x the maps: a few images at a time
        z = torch.cat([_rows(layer, a), _rows(layer, b)], dim=-1)  # the three products in one batched matmul
        gram = gram + torch.bmm(z.transpose(1, 2), z).double()
        rows += z.shape[1]
    fan_in = gram.shape[-1] // 2
    if rows < MIN_ROWS_PER_INPUT * fan_in:
        return None
    return [gram[:, :fan_in, :fan_in], gram[:, :fan_in, fan_in:], gram[:, fan_in:, fan_in:]]


Fit = Callable[[nn.Module, nn.Module, list[torch.Tensor]], float]


@torch.no_grad()
def _reconstruct(student: nn.Module, teacher: nn.Module, images: torch.Tensor, layers: list[str], fit: Fit,
                 chunk: int) -> dict[str, float]:
    """Run ``fit(layer, reference, moments)`` on each of ``layers`` in forward order, within one
    forward pass of the student over all ``images``: each layer's pre-hook sees its input as the
    layers refitted upstream make it, and the layer then runs with its new weights. The teacher's
    input for the same layer comes from its own forward over the same images, run alongside."""
    student.eval(), teacher.eval()
    errors: dict[str, float] = {}
    done: set[str] = set()  # a layer called twice in one forward is refitted at its first call
    progress = tqdm(total=len(layers), desc="reconstruct", leave=False)

    def pre_hook(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if name in done:
                return
            done.add(name)
            reference = teacher.get_submodule(name)
            with compression.untraced():
                moments = _moments(module, inputs[0], teacher_inputs.take(name), chunk)
                if moments is not None:
                    errors[name] = fit(module, reference, moments)
            progress.update()
            if moments is None:
                logger.info("%s: too few rows per input weight on %d images to refit: left as it was", name, len(images))
        return hook

    handles = [student.get_submodule(name).register_forward_pre_hook(pre_hook(name)) for name in layers]
    teacher_inputs = _TeacherInputs(teacher, layers, images)
    try:
        with compression.forward_lock(student):
            student(images)
    finally:
        teacher_inputs.close()
        for handle in handles:
            handle.remove()
        progress.close()
    logger.info("%d of %d layers refitted to FP32's outputs on %d images: median relative output error %.3f",
                len(errors), len(layers), len(images), float(torch.tensor([*errors.values(), math.nan]).nanmedian()))
    return errors


def reconstruct_pruned_layers(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                              chunk: int = 16, damping: float = DAMPING) -> dict[str, float]:
    """Refit the unpruned weights of every conv and linear layer of ``student`` (matched to
    ``teacher``'s by name; zeros are its masks) so that, on ``images``, each layer's output is as
    close as least squares gets to the teacher's (see the module docstring). Returns each layer's
    relative output error after the refit; layers with fewer than ``MIN_ROWS_PER_INPUT`` rows per
    input weight on these images keep their weights and are left out. ``images`` go through the
    student as one batch (``chunk`` images at a time for the moments). Both models are left in eval mode."""

    def fit(layer: nn.Module, reference: nn.Module, moments: list[torch.Tensor]) -> float:
        layer.weight.copy_(_refit(reference.weight, layer.weight != 0, *moments[:2], damping))
        return _relative_error(layer.weight, reference.weight, *moments)

    return _reconstruct(student, teacher, images, list(compression.weight_layers(student)), fit, chunk)



def reconstruct_quantized_layers(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                                 chunk: int = 16, damping: float = DAMPING) -> dict[str, float]:
    """Refit every quantized conv and linear layer of ``student`` to the teacher's outputs on
    ``images`` and round its weights onto its quantizer's grid with the rounding error of each
    input column compensated by the columns after it (GPTQ, Frantar et al. 2023; Optimal Brain
    Quantization, Frantar & Alistarh 2022), in forward order on the student's own inputs. The
    quantizers' scales do not change: the weights land on their grid, so the forward's
    quantization leaves them as they are. Returns each layer's relative output error, its
    weights quantized; layers too short of rows (``MIN_ROWS_PER_INPUT``) keep their weights.

    Example:
        >>> reconstruct_quantized_layers(w4a8_model, fp32_model, photo_crops)   # [N, 3, H, W], N ~ 256
    """
    quantizer_of = {student.get_submodule(name): q
                    for name, q in compression.weight_quantizers(student.eval(), images[:1]).items()}

    def fit(layer: nn.Module, reference: nn.Module, moments: list[torch.Tensor]) -> float:
        quantize = quantizer_of[layer]
        best = _refit(reference.weight, torch.ones_like(layer.weight, dtype=torch.bool), *moments[:2], damping)
        layer.weight.copy_(_round_with_compensation(best, moments[0], damping, quantize))
        return _relative_error(quantize(layer.weight), reference.weight, *moments)

    layers = [name for name in compression.weight_layers(student) if student.get_submodule(name) in quantizer_of]
    return _reconstruct(student, teacher, images, layers, fit, chunk)


def _round_with_compensation(weight: torch.Tensor, hessian: torch.Tensor, damping: float,
                             quantize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """GPTQ's column loop: input column ``j`` rounded by ``quantize``, its error spread over the
    columns after it through the Cholesky factor of the inverse damped ``hessian`` (``[groups,
    fan_in, fan_in]``), which minimises the growth of ``(w - w0)^T H (w - w0)`` one column at a time."""
    groups, fan_in = hessian.shape[0], hessian.shape[-1]
    w = weight.reshape(groups, -1, fan_in).double().clone()
    lam = damping * hessian.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
    damped = hessian + lam[:, None, None] * torch.eye(fan_in, dtype=hessian.dtype)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    for j in range(fan_in):
        rounded = quantize(w.reshape(weight.shape).to(weight.dtype)).reshape(w.shape)[:, :, j].double()
        error = (w[:, :, j] - rounded) / upper[:, j, j][:, None]
        w[:, :, j:] -= error[:, :, None] * upper[:, None, j, j:]
        w[:, :, j] = rounded
    return w.reshape(weight.shape).to(weight.dtype)


def _relative_error(weight: torch.Tensor, fp32: torch.Tensor, ss: torch.Tensor, st: torch.Tensor,
                    tt: torch.Tensor) -> float:
    """``||x_s w - x_t w_fp32|| / ||x_t w_fp32||`` over the calibration images, from the moments."""
    w = weight.reshape(ss.shape[0], -1, ss.shape[-1]).double()
    v = fp32.reshape(w.shape).double()
    quad = lambda a, m, b: torch.einsum("gri,gij,grj->", a, m, b)  # noqa: E731
    target = quad(v, tt, v)
    return float((quad(w, ss, w) - 2 * quad(w, st, v) + target).clamp_min(0).sqrt() / target.sqrt().clamp_min(1e-30))
