"""One training loop for every stage (FP32, quantization-aware, sparse fine-tuning) and evaluation."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from surgery import compression
from surgery.registry import Recipe
from surgery.similarity.agreement import output_divergence, topk_overlap
from training import distributed, resume
from training.distillation import distillation_loss, freeze_batchnorm

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then step decay at the milestones, or cosine decay when there are none."""
    epoch = step / steps_per_epoch
    if epoch < recipe.warmup_epochs:
        return recipe.lr * (step + 1) / (recipe.warmup_epochs * steps_per_epoch)
    if recipe.milestones:
        return recipe.lr * recipe.gamma ** sum(epoch >= m for m in recipe.milestones)
    span = max(recipe.epochs - recipe.warmup_epochs, 1e-9)
    progress = min((epoch - recipe.warmup_epochs) / span, 1.0)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    """The recipe's mixed-precision dtype where ``device`` computes in it natively, else None (FP32).

    On a CPU without bfloat16 instructions autocast would emulate them, slower than FP32.
    """
    if recipe.autocast is None:
        return None
    dtype = getattr(torch, recipe.autocast)
    if device.type == "cuda":
        native = dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    else:  # oneDNN's check, as PyTorch's own CPU autocast tests use it
        native = dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if not native:
        logger.warning("%s: no native %s here, training in FP32", device, recipe.autocast)
        return None
    return dtype


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimiser; quantizer ranges (if any) form a group of their own, at
    ``recipe.quantizer_lr_scale`` times the learning rate and without weight decay (decay would
    shrink the ranges), or frozen when the scale is 0."""
    ranges = compression.quantizer_parameters(model)
    if recipe.quantizer_lr_scale == 0:
        for p in ranges:
            p.requires_grad_(False)
    range_ids = {id(p) for p in ranges}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in range_ids],
               "lr_scale": 1.0}]
    if ranges and recipe.quantizer_lr_scale > 0:
        groups.append({"params": ranges, "lr_scale": recipe.quantizer_lr_scale, "weight_decay": 0.0})
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def train_loader(dataset: Dataset, recipe: Recipe, ctx: distributed.Context, seed: int,
                 workers: int) -> DataLoader:
    per_rank = max(recipe.batch_size // ctx.world_size, 1)
    if ctx.distributed:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, seed=seed)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=workers, drop_last=True,
                      persistent_workers=workers > 0)


def fit(model: nn.Module, dataset: Dataset, recipe: Recipe, ctx: distributed.Context, *,
        seed: int, state_dir: Path | None, desc: str, workers: int = 0, channels_last: bool = True,
        on_step: Callable[[int, int], None] | None = None, teacher: nn.Module | None = None) -> nn.Module:
    """Train ``model`` in place for ``recipe.epochs`` epochs and return it (unwrapped).

    With ``recipe.distill_temperature`` the loss is :func:`training.distillation.distillation_loss`
    against ``teacher``'s outputs on the same batch (labels unused: unlabelled data will do);
    otherwise cross-entropy on the labels. ``recipe.freeze_batchnorm`` keeps BatchNorm's running
    statistics as they are; ``recipe.image_size`` trains on the batches resized to that side
    (cheaper steps; FixRes, Touvron et al. 2019, trains below the test resolution on purpose).

    ``on_step(step, steps_per_epoch)`` runs before every optimiser step (the sparsity ramp uses
    it). ``state_dir`` holds the resume state: a rerun continues after the last finished epoch.
    ``recipe.steps_per_epoch`` truncates every epoch; ``recipe.autocast`` runs the forward in mixed
    precision (see :func:`autocast_dtype`). ``channels_last`` trains in that memory
    format (~20% faster convolutions on CPU); the model is returned in the standard format.
    """
    if (recipe.distill_temperature is None) != (teacher is None):
        raise ValueError(f"{desc}: a distillation recipe needs a teacher and a teacher needs a distillation "
                         f"recipe (temperature {recipe.distill_temperature}, teacher {type(teacher).__name__})")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(ctx.device, memory_format=memory_format).train()
    if recipe.freeze_batchnorm:
        freeze_batchnorm(model)
    if teacher is not None:
        teacher.to(ctx.device, memory_format=memory_format).eval()
    loader = train_loader(dataset, recipe, ctx, seed, workers)
    steps_per_epoch = min(len(loader), recipe.steps_per_epoch or len(loader))
    if steps_per_epoch == 0:
        raise ValueError(f"{desc}: {len(dataset)} images are fewer than one batch of {recipe.batch_size}")
    optimizer = make_optimizer(model, recipe)
    key = {"stage": desc, "recipe": recipe.to_dict(), "seed": seed, "world_size": ctx.world_size}
    start = resume.load(state_dir, model, optimizer, key) if state_dir else 0
    trained = distributed.wrap(model, ctx)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    dtype = autocast_dtype(recipe, ctx.device)
    for epoch in range(start, recipe.epochs):
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        else:
            loader.sampler.generator.manual_seed(seed + epoch)
        bar = tqdm(loader, total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{recipe.epochs}",
                   disable=not ctx.is_main, leave=False)
        for i, (images, labels) in enumerate(bar):
            if i >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + i
            if on_step is not None:
                on_step(step, steps_per_epoch)
            lr = learning_rate(recipe, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            images = images.to(ctx.device)
            if recipe.image_size and images.shape[-1] != recipe.image_size:
                images = F.interpolate(images, size=recipe.image_size, mode="bilinear", antialias=True)
            images = images.contiguous(memory_format=memory_format)
            with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None):
                if teacher is None:
                    loss = loss_fn(trained(images), labels.to(ctx.device))
                else:
                    with torch.no_grad():
                        target = teacher(images)
                    loss = distillation_loss(trained(images), target, recipe.distill_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2g}")
        logger.info("%s epoch %d/%d: last loss %.4f", desc, epoch + 1, recipe.epochs, loss.item())
        if state_dir and ctx.is_main:
            resume.save(state_dir, model, optimizer, epoch + 1, key)
        ctx.barrier()
    if teacher is not None:
        teacher.to(memory_format=torch.contiguous_format)
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256,
            workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for every image of ``dataset`` and the labels, in dataset order."""
    model.eval().to(device)
    logits, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    for images, y in tqdm(loader, desc="evaluate", leave=False):
        logits.append(model(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(logits), torch.cat(labels)


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str] | tuple[str, ...],
                     reference_logits: torch.Tensor | None = None) -> dict:
    """Top-1 (and top-5) and per-class accuracy and, given FP32's logits on the same images, agreement
    with FP32's predictions, the share of FP32's top-5 classes in the variant's top-5 and the mean
    KL divergence of the variant's outputs from FP32's (nats).

    Unlabelled images (label :data:`surgery.data.photos.UNLABELLED`, e.g. the held-out photo crops)
    have no accuracy: their metrics are the comparisons with FP32 alone, never a "top-1".
    """
    predictions = logits.argmax(1)
    labelled = labels >= 0
    metrics: dict = {"eval_samples": len(labels)}
    if bool(labelled.all()):
        correct = predictions == labels
        metrics["top1"] = float(correct.float().mean())
        metrics["per_class_top1"] = {name: float(correct[labels == c].float().mean())
                                     for c, name in enumerate(class_names) if bool((labels == c).any())}
        if logits.shape[1] > 5:
            top5 = logits.topk(5, dim=1).indices
            metrics["top5"] = float((top5 == labels[:, None]).any(1).float().mean())
    elif bool(labelled.any()):
        raise ValueError(f"{int(labelled.sum())} of {len(labels)} images are labelled: a set is labelled or not")
    if reference_logits is not None:
        metrics["agreement_with_fp32"] = float((predictions == reference_logits.argmax(1)).float().mean())
        if logits.shape[1] > 5:
            metrics["top5_overlap_with_fp32"] = float(topk_overlap(logits, reference_logits, 5).mean())
        metrics["kl_from_fp32"] = float(output_divergence(reference_logits, logits).mean())
    return metrics
