"""The one module that knows NNCF: quantize, prune, bake masks, serialise and restore.

NNCF 3.x inserts its compression modules as hooks (under a ``__nncf_hooks`` submodule) and
keeps the model's own class, so ``model.layer4`` still works on an INT8 or a sparse model.
Everything else in the project goes through these functions, so an NNCF upgrade touches one file.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ContextManager

# NNCF compiles its CPU extension on the first INT8 forward and gives up after 60 s by default;
# on a busy 2-core machine the compile takes longer (seen here), which would crash training or
# the app's start-up. A user's own setting is kept.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")

import nncf  # noqa: E402  (after the timeout above)
import nncf.torch  # noqa: E402
import torch
from nncf.torch.function_hook.pruning.magnitude.schedulers import ExponentialMagnitudePruningScheduler
from nncf.torch.function_hook.wrapper import get_hook_storage, is_wrapped
from nncf.torch.quantization.layers import BaseQuantizer
from torch import nn

logger = logging.getLogger(__name__)

NNCF_VERSION = nncf.__version__
SPARSITY_MODE = nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_GLOBAL


def quantize(model: nn.Module, batches: Iterable[torch.Tensor], num_samples: int) -> nn.Module:
    """INT8 post-training quantization (symmetric weights, activations per NNCF's CPU preset).

    ``batches`` yields image batches; ``num_samples`` is how many *images* calibrate the ranges
    (NNCF's ``subset_size`` counts dataset items, here batches, so it is converted). Returns a
    quantized deep copy, ready for quantization-aware training with an ordinary torch loop.
    """
    batches = list(_take_images(batches, num_samples))
    logger.info("calibrating INT8 quantizers on %d images in %d batches",
                sum(len(b) for b in batches), len(batches))
    model.eval()
    return nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))


def _take_images(batches: Iterable[torch.Tensor], num_samples: int) -> Iterator[torch.Tensor]:
    seen = 0
    for batch in batches:
        if seen >= num_samples:
            return
        batch = batch[: num_samples - seen]
        seen += len(batch)
        yield batch


def quantizers(model: nn.Module) -> list[nn.Module]:
    """The NNCF fake-quantizer modules the model runs (empty for FP32 and sparse models)."""
    return [m for m in model.modules() if isinstance(m, BaseQuantizer)]


def start_magnitude_sparsity(model: nn.Module, example_input: torch.Tensor, target: float,
                             ramp_updates: int) -> ExponentialMagnitudePruningScheduler:
    """Attach global magnitude masks (in place) at ratio 0 and return their ramp scheduler.

    Each ``scheduler.step()`` raises the sparsity along NNCF's exponential schedule, reaching
    ``target`` after ``ramp_updates`` steps; between steps the masked weights get exactly zero
    gradient, so fine-tuning heals the network around the pruned weights gradually.
    """
    nncf.prune(model, mode=SPARSITY_MODE, ratio=0.0, examples_inputs=example_input)
    scheduler = ExponentialMagnitudePruningScheduler(
        model, mode=SPARSITY_MODE, initial_ratio=0.0, target_ratio=target, target_epoch=max(ramp_updates, 1))
    return scheduler


def bake_sparsity(model: nn.Module) -> nn.Module:
    """Multiply the masks into the weights and remove the hooks: zeros become real zeros."""
    return nncf.strip(model, do_copy=False, strip_format=nncf.StripFormat.IN_PLACE)


def _has_hooks(model: nn.Module) -> bool:
    """Whether the model's forward runs NNCF hooks (quantizers or unbaked masks). A baked sparse
    model keeps an empty hook container, which counts as none."""
    return is_wrapped(model) and not get_hook_storage(model).is_empty()


def compression_config(model: nn.Module) -> dict | None:
    """NNCF's JSON-serialisable description of where its modules sit; None for a plain model."""
    return nncf.torch.get_config(model) if _has_hooks(model) else None


def restore(model: nn.Module, config: dict) -> nn.Module:
    """Re-insert NNCF modules described by ``compression_config`` into a fresh, uncompressed model.

    Only NNCF's own module classes may be instantiated (NNCF's allow-list), so a tampered config
    cannot construct arbitrary objects.
    """
    return nncf.torch.load_from_config(model, config)


def weight_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in every conv and linear weight, and over all of them together."""
    per_layer, zeros, total = {}, 0, 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight.detach()
            z = int((w == 0).sum())
            per_layer[name] = z / w.numel()
            zeros, total = zeros + z, total + w.numel()
    return {"overall": zeros / max(total, 1), **per_layer}


# One lock for every NNCF-hooked forward in the process: NNCF 3.4's FunctionHookMode patches each
# module's ``_call_impl`` on entry and pops it on exit, so two threads running one INT8 model at
# once corrupt each other (seen here: logits off by 0.5, ``KeyError: '_call_impl'``). Reentrant, so
# a forward hook that itself runs the model cannot deadlock.
_NNCF_FORWARD_LOCK = threading.RLock()


def forward_lock(model: nn.Module) -> ContextManager:
    """Hold around a forward pass of ``model`` that may run concurrently with other threads.

    A no-op for models whose forward runs no NNCF hooks (FP32, baked sparse: NNCF then skips its
    hook mode); for INT8 models it serialises the forward passes (backward passes need no lock).
    Every caller that may race must take it.

    Example:
        >>> with forward_lock(model):
        ...     logits = model(x)
    """
    return _NNCF_FORWARD_LOCK if _has_hooks(model) else nullcontext()


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized tensor, bit for bit. Backward: the gradient reaches the input unclipped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        # A clone, not the input itself: an in-place ReLU downstream may overwrite the output.
        return quantized.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output, None


@contextmanager
def straight_through(model: nn.Module) -> Iterator[int]:
    """Give the model's fake-quantizers a straight-through backward while the block runs.

    NNCF's quantizer backward (``QuantizeSymmetric``/``QuantizeAsymmetric`` in
    ``nncf.torch.quantization.quantize_functions``) already treats rounding as the identity but
    multiplies the gradient by the mask of inputs *inside* the calibrated range
    ``[input_low, input_low + input_range]``: saturated inputs get exactly zero gradient. Here the
    gradient passes everywhere (Bengio et al. 2013, "Estimating or Propagating Gradients Through
    Stochastic Neurons"); the forward values stay the quantized ones, bit for bit. Scale and
    range parameters get no gradient, so this is for analysis (activation maximisation), never QAT.

    Implemented as forward hooks on the quantizer modules of this ``model`` only, acting only on
    forward passes run by the calling thread: other threads and other models keep the true
    gradient. Yields the number of quantizers hooked (0 for FP32 and sparse models). Limits: a
    model run by the same thread inside the block for another purpose gets the estimate too.

    Example:
        >>> with straight_through(int8_model):
        ...     grad, = torch.autograd.grad(int8_model(x)[:, 3].sum(), x)
    """
    thread = threading.get_ident()

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        # Weight quantizers receive the parameter itself; an input gradient never goes through
        # their backward (only through the quantized weights' values), so they are left alone.
        if threading.get_ident() != thread or isinstance(inputs[0], nn.Parameter) \
                or not isinstance(output, torch.Tensor):
            return None
        return _StraightThrough.apply(inputs[0], output)

    handles = [q.register_forward_hook(hook) for q in quantizers(model)]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


# -- Quantizer ranges, for the study's layer diagnostics (read-only) -----------------------------

@dataclass(frozen=True)
class QuantizerRange:
    """One NNCF fake-quantizer: where it sits, its bit width and its range ``[low, high]``.

    ``name`` is NNCF's hook name, e.g. ``post_hooks.layer2/0/relu/relu_/0__0.0`` (an activation:
    the output of that op) or ``pre_hooks.layer2/0/conv1/conv2d/0__1.0`` (port 1 of a conv:
    its weight). ``low``/``high`` broadcast against the quantized tensor (per channel for
    weights); inputs outside them are clipped to them.
    """

    name: str
    module: nn.Module
    bits: int
    low: torch.Tensor
    high: torch.Tensor
    weights: bool

    @property
    def layer(self) -> str:
        """The model's module path of the op, dotted (``layer2.0.relu``), ``""`` for the input."""
        path = self.name.split(".", 1)[1].rsplit("/", 2)[0]
        return path.strip("/").replace("/", ".")


def quantizer_ranges(model: nn.Module) -> list[QuantizerRange]:
    """Every quantizer of a quantized model with its bit width and range; empty for other models.

    Example:
        >>> [(q.layer, q.bits) for q in quantizer_ranges(int4) if not q.weights][:2]
        [('', 8), ('relu', 8)]
    """
    if not is_wrapped(model):
        return []
    ranges = []
    for name, module in get_hook_storage(model).named_hooks():
        if not isinstance(module, BaseQuantizer):
            continue
        with torch.no_grad():
            low, high = module.get_input_low_input_high()
        port = int(name.rsplit("__", 1)[1].split(".")[0])
        ranges.append(QuantizerRange(name, module, int(module.num_bits), low.detach().clone(), high.detach().clone(),
                                     weights=name.startswith("pre_hooks.") and port >= 1))
    return ranges


@contextmanager
def clipping_counts(model: nn.Module) -> Iterator[dict[str, list[int]]]:
    """Count, while the block runs, the activation values each quantizer clips to its range.

    Yields ``{quantizer name: [clipped, total]}``, updated by every forward pass of ``model`` in
    the block (weight quantizers are left out). Empty for models without quantizers.

    Example:
        >>> with clipping_counts(int8) as counts:
        ...     int8(images)
        >>> {name: c / t for name, (c, t) in counts.items()}
    """
    counts: dict[str, list[int]] = {}
    handles = []
    for q in quantizer_ranges(model):
        if q.weights:
            continue
        counts[q.name] = [0, 0]

        def hook(module: nn.Module, inputs: tuple, q: QuantizerRange = q) -> None:
            x = inputs[0].detach()
            low, high = q.low.to(x.device), q.high.to(x.device)
            counts[q.name][0] += int(((x < low) | (x > high)).sum())
            counts[q.name][1] += x.numel()

        handles.append(q.module.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()
