"""Knowledge distillation: the student matches the teacher's softened outputs, no labels needed.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015): the loss is the KL
divergence from the teacher's to the student's class distribution, both softened at temperature
``T``, times ``T**2`` so its gradients keep their scale across temperatures. A compressed variant
fitted this way to its FP32 model needs no labelled data: crops of a few photos do (Asano & Saeed,
"The Augmented Image Prior", ICLR 2023; :mod:`surgery.data.photos`).

Example:
    >>> loss = distillation_loss(student(x), teacher(x).detach(), temperature=2.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be positive, got {temperature}")
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (its running statistics stay the teacher's) while the
    rest trains; the affine scale and shift still learn. Returns how many layers it froze.

    A few photos' statistics would replace the ones estimated on ImageNet: the student should
    change its weights to match the teacher, not its normalisation to match the photos."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.eval()
    return len(layers)
