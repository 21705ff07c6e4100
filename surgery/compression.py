"""The one module that knows NNCF: quantize, prune, bake masks, serialise and restore.

NNCF 3.x inserts its compression modules as hooks (under a ``__nncf_hooks`` submodule) and
keeps the model's own class, so ``model.layer4`` still works on an INT8 or a sparse model.
Everything else in the project goes through these functions, so an NNCF upgrade touches one file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import nncf
import nncf.torch
import torch
from nncf.torch.function_hook.pruning.magnitude.schedulers import ExponentialMagnitudePruningScheduler
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
    return any("__nncf_hooks" in name for name, _ in model.named_modules())


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
