"""Distillation through the project's own loop, on a tiny scale: the loss it minimises really falls,
the student's agreement with its teacher really rises, BatchNorm statistics stay frozen when asked."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery import compression
from surgery.architectures import MOBILENET_V2
from surgery.data.photos import HeldOutCrops, PhotoCrops
from surgery.registry import Recipe
from training import distributed
from training.distillation import distillation_loss
from training.loop import fit, predict, seed_everything

SIZE = 32


def _mobilenet() -> nn.Module:
    """A small MobileNetV2 built from its architecture description (which names its 8-bit edges)."""
    return MOBILENET_V2.build(MOBILENET_V2.config(10, SIZE, [0.5] * 3, [0.25] * 3, width_mult=0.25))


def _teacher() -> nn.Module:
    """A small MobileNetV2 (depthwise convolutions, BatchNorm) whose outputs depend on the image:
    its BatchNorm statistics are estimated on photo crops, and its classifier is scaled so that it
    is confident, as a trained network is."""
    seed_everything(0)
    model = _mobilenet()
    crops = PhotoCrops(SIZE, 64)
    model.train()
    with torch.no_grad():
        model(torch.stack([crops[i][0] for i in range(64)]))
        model.classifier[1].weight.mul_(30)
    return model.eval()


def test_distillation_loss_is_the_softened_kl_scaled_by_t_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    p = F.softmax(teacher / 3.0, 1)
    expected = (p * (p.log() - F.log_softmax(student / 3.0, 1))).sum(1).mean() * 9
    assert distillation_loss(student, teacher, 3.0).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, 0.0)


def test_a_distillation_recipe_needs_a_teacher():
    model = _mobilenet()
    ctx = distributed.Context(device=torch.device("cpu"))
    with pytest.raises(ValueError, match="teacher"):
        fit(model, PhotoCrops(SIZE, 8), Recipe(epochs=1, lr=1e-3, batch_size=4, distill_temperature=2.0), ctx,
            seed=0, state_dir=None, desc="student")


def test_distilling_a_quantized_student_lowers_its_loss_and_raises_its_agreement():
    teacher = _teacher()
    held = HeldOutCrops(SIZE, per_photo=12)
    images = held.images.float() / 255
    calibration = [torch.stack([c for c, _ in (PhotoCrops(SIZE, 32)[i] for i in range(32))])]
    student = compression.quantize(copy.deepcopy(teacher), calibration, 32, weight_bits=2, activation_bits=8)
    bn = {n: b.running_mean.clone() for n, b in student.named_modules() if isinstance(b, nn.BatchNorm2d)}

    def measure() -> tuple[float, float]:
        with torch.no_grad(), compression.forward_lock(student):
            s, t = student.eval()(images), teacher(images)
        return distillation_loss(s, t, 2.0).item(), (s.argmax(1) == t.argmax(1)).float().mean().item()

    loss_before, agreement_before = measure()
    recipe = Recipe(epochs=1, lr=2e-3, batch_size=16, optimizer="adamw", weight_decay=0.0, steps_per_epoch=16,
                    quantizer_lr_scale=1.0, distill_temperature=2.0, freeze_batchnorm=True)
    seed_everything(0)
    fit(student, PhotoCrops(SIZE, 256), recipe, distributed.Context(device=torch.device("cpu")), seed=0,
        state_dir=None, desc="student", teacher=teacher)
    loss_after, agreement_after = measure()
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    assert agreement_after > agreement_before + 0.1, (agreement_before, agreement_after)
    for name, b in student.named_modules():
        if isinstance(b, nn.BatchNorm2d):
            assert torch.equal(b.running_mean, bn[name]), f"{name}: frozen BatchNorm statistics moved"
    assert compression.bit_widths(student), "the student is still quantized"
    logits, labels = predict(teacher, held, torch.device("cpu"))
    assert (labels == -1).all() and logits.shape == (len(held), 10)
