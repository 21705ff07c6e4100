"""The three ways a variant is made: train FP32, derive a quantized model at any bit width (PTQ + QAT),
derive a sparse model at any level (gradual magnitude pruning).

Each function trains, evaluates on the held-out set and saves in the checkpoint format
(rank 0 only), returning the model and its config.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from surgery import compression
from surgery.architectures import WeightsUnavailable
from surgery.checkpoint import VariantInfo, save_variant
from surgery.registry import ModelFamily, Recipe, build_model
from surgery.variants import VariantSpec, parse_variant
from training import distributed
from training.loop import accuracy_metrics, fit, predict, seed_everything

logger = logging.getLogger(__name__)

RAMP_UPDATES = 16  # mask recomputations over the sparsity ramp (each is a global top-k over all weights)


@dataclass
class Job:
    """What every stage shares: family, data, where it runs and how long."""

    family: ModelFamily
    train_set: Dataset | None  # None when only evaluating
    eval_set: Dataset
    ctx: distributed.Context
    seed: int = 0
    workers: int = 0


def _state_dir(out: Path) -> Path:
    return out / ".resume"


def _finish(model: nn.Module, job: Job, out: Path, variant: str, kind: str, recipe: Recipe,
            comp: dict, reference: torch.Tensor | None, started: float) -> tuple[dict, torch.Tensor]:
    """Evaluate, save (rank 0) and return the metrics and the held-out predictions."""
    logits, labels = predict(model, job.eval_set, job.ctx.device, workers=job.workers)
    metrics = accuracy_metrics(logits, labels, job.family.class_names, reference)
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    if kind == "sparse":
        metrics["sparsity"] = compression.weight_sparsity(model)["overall"]
        comp = {**comp, "achieved_sparsity": metrics["sparsity"]}
    if job.ctx.is_main:
        info = VariantInfo(family=job.family.name, variant=variant, kind=kind,
                           architecture=job.family.architecture(), class_names=list(job.family.class_names),
                           compression=comp,
                           recipe={**recipe.to_dict(), "seed": job.seed, "world_size": job.ctx.world_size,
                                   "train_samples": len(job.train_set)},
                           metrics=metrics)
        save_variant(model, out, info)
        shutil.rmtree(_state_dir(out), ignore_errors=True)
    job.ctx.barrier()
    logger.info("%s/%s: top-1 %.4f%s", job.family.name, variant, metrics["top1"],
                f", agreement {metrics['agreement_with_fp32']:.4f}" if reference is not None else "")
    return metrics, logits.argmax(1)


def initial_fp32(family: ModelFamily, required: bool = False, weights: str | None = None) -> tuple[nn.Module, str]:
    """The family's starting point: torchvision's weights (``weights``, default the family's) where
    they can be had, else random.

    With ``required`` (a recipe of 0 epochs: the weights *are* the FP32 model; or another
    recipe's run) a missing or refused weights file is an error, with the message that names the
    ways to get it.
    """
    weights = weights or family.pretrained
    if weights is None:
        return build_model(family), "random"
    try:
        return build_model(family, pretrained=weights), f"torchvision {weights}"
    except WeightsUnavailable as exc:
        if required:
            raise
        logger.warning("%s: starting from random weights", exc)
        return build_model(family), "random (torchvision weights unavailable)"


def train_fp32(job: Job, recipe: Recipe, out: Path, variant: str = "fp32") -> tuple[nn.Module, dict, torch.Tensor]:
    """Train (or, with 0 epochs, take torchvision's weights as) the FP32 model ``variant``:
    ``fp32``, a seed control ``fp32-seed<k>`` or another recipe's run ``fp32-recipe<k>``."""
    started = time.perf_counter()
    seed_everything(job.seed)
    spec = parse_variant(variant)
    try:
        model, init = initial_fp32(job.family, required=recipe.epochs == 0 or spec.is_recipe_control,
                                   weights=job.family.fp32_weights(spec))
    except WeightsUnavailable as exc:
        if spec.is_recipe_control:
            raise
        # 0 epochs from random weights would save an untrained model.
        raise WeightsUnavailable(f"{exc} Or pass --epochs to train {job.family.name} from random weights.") from None
    if recipe.epochs:
        model = fit(model, job.train_set, recipe, job.ctx, seed=job.seed, state_dir=_state_dir(out),
                    desc=variant, workers=job.workers)
    else:  # torchvision's weights are the model, as they are: no training data is read
        model.to(job.ctx.device)
    metrics, predictions = _finish(model, job, out, variant, "fp32", recipe, {"method": None, "init": init},
                                   None, started)
    return model, metrics, predictions


def _image_batches(dataset: Dataset, seed: int, batch_size: int = 64):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return (images for images, _ in loader)


def derive_quantized(job: Job, fp32: nn.Module, recipe: Recipe, spec: VariantSpec, calibration_samples: int,
                     out: Path, reference: torch.Tensor | None) -> tuple[nn.Module, dict]:
    """Post-training quantization with NNCF at the variant's bit widths (first convolution and
    classifier at 8 bits), then quantization-aware fine-tuning with the ranges trained too."""
    if spec.kind != "quantized":
        raise ValueError(f"{spec.name} is not a quantized variant")
    started = time.perf_counter()
    seed_everything(job.seed)
    quantized = compression.quantize(copy.deepcopy(fp32).to(job.ctx.device),
                                     _image_batches(job.train_set, job.seed), calibration_samples,
                                     weight_bits=spec.weight_bits, activation_bits=spec.activation_bits)
    quantized = fit(quantized, job.train_set, recipe, job.ctx, seed=job.seed, state_dir=_state_dir(out),
                    desc=f"{spec.name}-qat", workers=job.workers)
    comp = {"method": "nncf.quantize + quantization-aware training", "weight_bits": spec.weight_bits,
            "activation_bits": spec.activation_bits, "first_last_bits": compression.FIRST_LAST_BITS,
            "calibration_samples": calibration_samples, "qat_steps": _steps(recipe, job)}
    metrics, _ = _finish(quantized, job, out, spec.name, "quantized", recipe, comp, reference, started)
    return quantized, metrics


def derive_sparse(job: Job, fp32: nn.Module, recipe: Recipe, spec: VariantSpec, ramp: float,
                  out: Path, reference: torch.Tensor | None) -> tuple[nn.Module, dict]:
    """Global magnitude pruning ramped from 0 to the variant's sparsity over the first ``ramp``
    fraction of fine-tuning (the rest trains around the final masks); masks then baked into the weights."""
    if spec.kind != "sparse":
        raise ValueError(f"{spec.name} is not a sparse variant")
    if not 0 < ramp < 1:
        raise ValueError(f"the sparsity ramp must be a fraction of fine-tuning in (0, 1), got {ramp}")
    sparsity = spec.sparsity
    started = time.perf_counter()
    seed_everything(job.seed)
    model = copy.deepcopy(fp32).to(job.ctx.device)
    example = next(iter(_image_batches(job.train_set, job.seed, batch_size=2))).to(job.ctx.device)
    scheduler = compression.start_magnitude_sparsity(model, example, sparsity, RAMP_UPDATES)
    current = [-1]

    def grow_masks(step: int, steps_per_epoch: int) -> None:
        ramp_steps = max(round(ramp * recipe.epochs * steps_per_epoch), 1)
        k = min(step * RAMP_UPDATES // ramp_steps + 1, RAMP_UPDATES)
        if k != current[0]:
            scheduler.step(k)
            current[0] = k

    # NNCF's mask update flattens weights with .view(-1): they must stay in the standard layout.
    model = fit(model, job.train_set, recipe, job.ctx, seed=job.seed, state_dir=_state_dir(out),
                desc=spec.name, workers=job.workers, channels_last=False, on_step=grow_masks)
    if current[0] < RAMP_UPDATES:  # fine-tuning too short for the ramp (smoke runs): prune to the target anyway
        logger.warning("%s: %d steps were too few for the sparsity ramp; pruned to %.0f%% without fine-tuning",
                       spec.name, _steps(recipe, job), sparsity * 100)
        scheduler.step(RAMP_UPDATES)
    compression.bake_sparsity(model)
    comp = {"method": "nncf.prune (unstructured magnitude, global) + fine-tuning",
            "mode": str(compression.SPARSITY_MODE), "target_sparsity": sparsity,
            "schedule": f"NNCF exponential ramp, {RAMP_UPDATES} updates over the first {ramp:.0%} of fine-tuning",
            "finetune_steps": _steps(recipe, job)}
    metrics, _ = _finish(model, job, out, spec.name, "sparse", recipe, comp, reference, started)
    return model, metrics


def _steps(recipe: Recipe, job: Job) -> int:
    """Optimiser steps a recipe makes on the job's training set (as :func:`training.loop.fit` counts)."""
    per_epoch = len(job.train_set) // max(recipe.batch_size // job.ctx.world_size, 1)
    return recipe.epochs * min(per_epoch, recipe.steps_per_epoch or per_epoch)
