"""The three ways a variant is made: train FP32, derive a quantized model at any bit width (PTQ + QAT),
derive a sparse model at any level (gradual magnitude pruning).

Each function trains, evaluates on the held-out set and saves in the checkpoint format
(rank 0 only), returning the model and its config.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from collections.abc import Callable
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
from training.batchnorm import match_batchnorm_statistics
from training.reconstruction import reconstruct_pruned_layers, reconstruct_quantized_layers
from training.loop import accuracy_metrics, fit, predict, seed_everything
from training.masks import lamp_reallocate, zeros_held
from training.synthetic import cached_batchnorm_images

logger = logging.getLogger(__name__)

RAMP_UPDATES = 16  # mask recomputations over the sparsity ramp (each is a global top-k over all weights)
# Where the zeros of a sparse variant go, and how its method names it.
SPARSITY_ALLOCATIONS = {"global": "global", "per_layer": "per layer", "lamp": "per layer, re-allocated by LAMP"}


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


def _synthetic_cache(out: Path) -> Path:
    """Where synthetic images are cached: beside the variant, so a zoo's variants share them."""
    return out.parent / ".synthetic"


def _finish(model: nn.Module, job: Job, out: Path, variant: str, kind: str, recipe: Recipe,
            comp: dict, reference: torch.Tensor | None, started: float) -> tuple[dict, torch.Tensor]:
    """Evaluate, save (rank 0) and return the metrics and the held-out logits (``reference`` is
    FP32's held-out logits, for the comparisons with FP32)."""
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
    logger.info("%s/%s: %s", job.family.name, variant, ", ".join(
        f"{key} {metrics[key]:.4f}" for key in ("top1", "agreement_with_fp32", "top5_overlap_with_fp32",
                                                 "kl_from_fp32") if key in metrics))
    return metrics, logits


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
    metrics, logits = _finish(model, job, out, variant, "fp32", recipe, {"method": None, "init": init},
                              None, started)
    return model, metrics, logits


def _image_batches(dataset: Dataset, seed: int, batch_size: int = 64):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return (images for images, _ in loader)


def derive_quantized(job: Job, fp32: nn.Module, recipe: Recipe, spec: VariantSpec, calibration_samples: int,
                     out: Path, reference: torch.Tensor | None, *, activation_ranges: str = "mean_minmax",
                     batchnorm_correction: int = 0, bias_correction: bool = True) -> tuple[nn.Module, dict]:
    """Post-training quantization with NNCF at the variant's bit widths (first convolution and
    classifier at 8 bits; depthwise convolutions too for ``-dw8``), then quantization-aware
    fine-tuning with the ranges trained too: on the labels, or distilled from ``fp32`` when the
    recipe says so (:mod:`training.distillation`). Before fine-tuning, on the recipe's
    ``reconstruction_samples`` images, each layer's weights are refitted to FP32's outputs and rounded onto their grid
    (:func:`training.reconstruction.reconstruct_quantized_layers`), and then, with
    ``batchnorm_correction`` images, the BatchNorm statistics are matched to FP32's
    (:mod:`training.batchnorm`)."""
    if spec.kind != "quantized":
        raise ValueError(f"{spec.name} is not a quantized variant")
    started = time.perf_counter()
    seed_everything(job.seed)
    quantized = compression.quantize(copy.deepcopy(fp32).to(job.ctx.device),
                                     _image_batches(job.train_set, job.seed), calibration_samples,
                                     weight_bits=spec.weight_bits, activation_bits=spec.activation_bits,
                                     activation_ranges=activation_ranges, keep_depthwise=spec.keep_depthwise,
                                     bias_correction=bias_correction,
                                     asymmetric_activations=recipe.asymmetric_activations)
    reconstruction = recipe.reconstruction_samples
    refit = ({"reconstruction": _refit(quantized, fp32, job, recipe, reconstruct_quantized_layers, _synthetic_cache(out))}
             if reconstruction else {})
    if batchnorm_correction:
        match_batchnorm_statistics(quantized, fp32, _correction_images(job, batchnorm_correction))
    steps = _steps(recipe, job)
    if steps:  # a recipe of 0 epochs: calibration (and corrections) alone
        quantized = fit(quantized, job.train_set, recipe, job.ctx, seed=job.seed, state_dir=_state_dir(out),
                        desc=f"{spec.name}-qat", workers=job.workers, teacher=_teacher(fp32, recipe))
    method = " + ".join(["nncf.quantize" + ("" if bias_correction else " (no bias correction)")]
                        + (["layer-wise reconstruction (GPTQ rounding)"] if reconstruction else [])
                        + (["BatchNorm statistics matched to FP32"] if batchnorm_correction else [])
                        + ([("distillation from FP32" if recipe.distill_temperature else "quantization-aware training")]
                           if steps else []))
    comp = {"method": method, "weight_bits": spec.weight_bits,
            "activation_bits": spec.activation_bits, "first_last_bits": compression.FIRST_LAST_BITS,
            "calibration_samples": calibration_samples, "activation_ranges": activation_ranges,
            "activation_quantizers": "asymmetric" if recipe.asymmetric_activations else "symmetric",
            "bias_correction": bias_correction, "batchnorm_correction_samples": batchnorm_correction,
            "depthwise_bits": compression.FIRST_LAST_BITS if spec.keep_depthwise else spec.weight_bits,
            "qat_steps": steps, **refit, **(_distillation_record(recipe) if steps else {})}
    metrics, _ = _finish(quantized, job, out, spec.name, "quantized", recipe, comp, reference, started)
    return quantized, metrics


def derive_sparse(job: Job, fp32: nn.Module, recipe: Recipe, spec: VariantSpec, ramp: float,
                  out: Path, reference: torch.Tensor | None, *, allocation: str = "global",
                  batchnorm_correction: int = 0, dense_below: int = 0) -> tuple[nn.Module, dict]:
    """Magnitude pruning (``allocation``: one ``global`` threshold, every layer alike ``per_layer``, or
    per layer then re-allocated by ``lamp`` scores (:func:`training.masks.lamp_reallocate`, with the
    refit only); depthwise convolutions left dense for ``-dwdense``, layers with fewer than
    ``dense_below`` weights too) ramped from 0 to the variant's
    sparsity over the first ``ramp`` fraction of fine-tuning (the rest trains around the final
    masks); masks then baked into the weights. With the recipe's ``reconstruction_samples`` images,
    the masks are set at once and each layer's kept weights refitted to FP32's outputs
    (:mod:`training.reconstruction`); fine-tuning, if the recipe has any, follows with the pruned
    weights held at zero (:mod:`training.masks`). With ``batchnorm_correction`` images, BatchNorm statistics
    are matched to FP32's after every change of the masks (:mod:`training.batchnorm`)."""
    if spec.kind != "sparse":
        raise ValueError(f"{spec.name} is not a sparse variant")
    if not 0 < ramp < 1:
        raise ValueError(f"the sparsity ramp must be a fraction of fine-tuning in (0, 1), got {ramp}")
    if allocation not in SPARSITY_ALLOCATIONS or (allocation == "lamp" and not recipe.reconstruction_samples):
        raise ValueError(f"sparsity allocation must be one of {tuple(SPARSITY_ALLOCATIONS)} ('lamp' with a refit's "
                         f"reconstruction_samples), got {allocation!r}")
    started = time.perf_counter()
    seed_everything(job.seed)
    model = copy.deepcopy(fp32).to(job.ctx.device)
    example = next(iter(_image_batches(job.train_set, job.seed, batch_size=2))).to(job.ctx.device)
    spared = set(compression.depthwise_layers(model) if spec.keep_depthwise else []) \
        | set(compression.small_layers(model, dense_below))
    dense = [name for name, _ in model.named_modules() if name in spared]
    images = _correction_images(job, batchnorm_correction) if batchnorm_correction else None

    def correct() -> None:
        if images is not None:
            match_batchnorm_statistics(model, fp32, images)

    scheduler = compression.start_magnitude_sparsity(model, example, spec.sparsity, RAMP_UPDATES,
                                                     per_layer=allocation != "global", dense=dense)
    if recipe.reconstruction_samples:
        scheduler.step(RAMP_UPDATES)  # the target masks at once: the refit replaces fine-tuning
        compression.bake_sparsity(model)
        if allocation == "lamp":
            lamp_reallocate(model, fp32)
        refit = {"reconstruction": _refit(model, fp32, job, recipe, reconstruct_pruned_layers, _synthetic_cache(out),
                                          spared)}
        correct()
        steps = _steps(recipe, job)
        if steps:  # fine-tuning around the refitted weights keeps the masks the refit was made for
            with zeros_held(model):
                model = fit(model, job.train_set, recipe, job.ctx, seed=job.seed, state_dir=_state_dir(out),
                            desc=spec.name, workers=job.workers, teacher=_teacher(fp32, recipe))
        how, schedule = "layer-wise reconstruction", "one-shot"
        if steps:
            how += " + " + ("distillation from FP32" if recipe.distill_temperature else "fine-tuning")
    else:
        grow, steps = _MaskRamp(scheduler, ramp * recipe.epochs, correct), _steps(recipe, job)
        # NNCF's mask update flattens weights with .view(-1): they must stay in the standard layout.
        model = fit(model, job.train_set, recipe, job.ctx, seed=job.seed, state_dir=_state_dir(out),
                    desc=spec.name, workers=job.workers, channels_last=False, on_step=grow,
                    teacher=_teacher(fp32, recipe))
        if grow.finish():
            logger.warning("%s: %d steps were too few for the sparsity ramp; pruned to %.0f%% without fine-tuning",
                           spec.name, steps, spec.sparsity * 100)
        compression.bake_sparsity(model)
        refit, how = {}, "fine-tuning"
        schedule = f"NNCF exponential ramp, {RAMP_UPDATES} updates over the first {ramp:.0%} of fine-tuning"
    comp = {"method": f"nncf.prune (unstructured magnitude, {SPARSITY_ALLOCATIONS[allocation]}) + {how}",
            "allocation": allocation,
            "mode": str(scheduler.mode), "schedule": schedule, **refit,
            "target_sparsity": spec.sparsity, "dense_layers": dense, "finetune_steps": steps,
            "batchnorm_correction_samples": batchnorm_correction, **(_distillation_record(recipe) if steps else {})}
    metrics, _ = _finish(model, job, out, spec.name, "sparse", recipe, comp, reference, started)
    return model, metrics


def _refit(model: nn.Module, fp32: nn.Module, job: Job, recipe: Recipe,
           reconstruct: Callable[..., dict[str, float]], cache: Path,
           spared: set[str] = frozenset()) -> dict:
    """Refit ``model``'s layers to FP32 with ``reconstruct`` on the recipe's ``reconstruction_samples``
    training images and ``synthetic_samples`` synthetic ones (at its image size; cached under
    ``cache``); what the checkpoint records of it (the error over the layers not ``spared``)."""
    samples, size = recipe.reconstruction_samples, recipe.image_size or job.family.input_size
    images = _correction_images(job, samples, salt=2)
    if recipe.image_size:
        images = nn.functional.interpolate(images, size=recipe.image_size, mode="bilinear", antialias=True)
    if recipe.synthetic_samples:
        synthetic = cached_batchnorm_images(fp32, recipe.synthetic_samples, size, cache, seed=job.seed)
        images = torch.cat([images, synthetic.to(images.device)])
    errors = reconstruct(model, fp32, images, damping=recipe.reconstruction_damping)
    pruned = [e for name, e in errors.items() if name not in spared]  # the layers the refit makes up for
    return {"samples": samples, "synthetic_samples": recipe.synthetic_samples, "image_size": size,
            "damping": recipe.reconstruction_damping,
            "layers_refitted": len(errors),
            "median_relative_output_error": float(torch.tensor(pruned or [math.nan]).median())}


@dataclass
class _MaskRamp:
    """Grows the masks along the scheduler over the first ``epochs`` of fine-tuning (``on_step`` of
    :func:`training.loop.fit`), calling ``changed`` after each growth."""

    scheduler: object
    epochs: float
    changed: Callable[[], None]
    current: int = -1

    def __call__(self, step: int, steps_per_epoch: int) -> None:
        ramp_steps = max(round(self.epochs * steps_per_epoch), 1)
        self.grow(min(step * RAMP_UPDATES // ramp_steps + 1, RAMP_UPDATES))

    def grow(self, k: int) -> None:
        if k != self.current:
            self.scheduler.step(k)
            self.current = k
            self.changed()

    def finish(self) -> bool:
        """Prune to the target if fine-tuning ended before the ramp did (smoke runs); True if so."""
        short = self.current < RAMP_UPDATES
        self.grow(RAMP_UPDATES)
        return short


def _correction_images(job: Job, n: int, salt: int = 1) -> torch.Tensor:
    """``n`` training images, drawn apart from the calibration ones (another ``salt``, another draw),
    for matching BatchNorm statistics."""
    loader = DataLoader(job.train_set, batch_size=n, shuffle=True,
                        generator=torch.Generator().manual_seed(job.seed + salt))
    return next(iter(loader))[0].to(job.ctx.device)


def _teacher(fp32: nn.Module, recipe: Recipe) -> nn.Module | None:
    """The FP32 model the variant is fitted to when its recipe distils (labels are not used then)."""
    return fp32 if recipe.distill_temperature is not None else None


def _distillation_record(recipe: Recipe) -> dict:
    if recipe.distill_temperature is None:
        return {}
    return {"distillation": {"teacher": "fp32", "loss": "KL divergence of softened outputs (Hinton et al. 2015)",
                             "temperature": recipe.distill_temperature,
                             "batchnorm": "running statistics frozen" if recipe.freeze_batchnorm else "trained"}}


def _steps(recipe: Recipe, job: Job) -> int:
    """Optimiser steps a recipe makes on the job's training set (as :func:`training.loop.fit` counts)."""
    per_epoch = len(job.train_set) // max(recipe.batch_size // job.ctx.world_size, 1)
    return recipe.epochs * min(per_epoch, recipe.steps_per_epoch or per_epoch)
