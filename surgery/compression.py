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
from nncf.torch.quantization import extensions as _extensions
from nncf.torch.quantization.layers import BaseQuantizer
from nncf.torch.quantization.reference import ReferenceQuantizedFunctions
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
    quantizer_backend(next(model.parameters()).device)
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


_BACKENDS: dict[str, str] = {}  # device type -> what runs the quantizers there, once decided


def quantizer_backend(device: torch.device | str) -> str:
    """Load NNCF's quantizer kernels for ``device`` now and say which run: its compiled extension or torch.

    NNCF compiles a C++ extension the first time a quantizer runs on a device type (the CUDA one
    needs the CUDA toolkit's ``nvcc``). On the CPU a failed compile falls back to NNCF's torch
    implementation of the same functions (``ReferenceQuantizedFunctions``); on CUDA NNCF 3.4 raises
    ``InstallationError`` instead, so here the CUDA path gets that same fallback, which gives
    the same values up to float rounding and is slower. Logged once per device type; returns
    ``"compiled extension"`` or ``"torch fallback"``.
    """
    kind = torch.device(device).type
    if kind not in _BACKENDS:
        namespace = _extensions.QuantizedFunctionsCUDA if kind == "cuda" else _extensions.QuantizedFunctionsCPU
        try:
            namespace.get("Quantize_forward")  # compiles or loads the extension, once per process
        except nncf.InstallationError as exc:
            logger.warning("NNCF could not build its CUDA extension (%s); using its torch fallback",
                           str(exc).splitlines()[0])
            namespace._loaded_namespace = ReferenceQuantizedFunctions  # private: NNCF has no switch for it
        fallback = getattr(namespace, "_loaded_namespace", None) is ReferenceQuantizedFunctions
        _BACKENDS[kind] = "torch fallback" if fallback else "compiled extension"
        logger.info("NNCF quantizers on %s run %s", kind, "NNCF's torch fallback (slower)" if fallback
                    else f"NNCF's compiled {kind.upper()} extension")
    return _BACKENDS[kind]


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
