"""BatchNorm statistics correction: a compressed network's normalised activations given the moments
its FP32 model has on the same images, one layer after the other, with no training step.

Quantizing or pruning a convolution shifts the mean and the spread of every channel it outputs,
and the shifts add up through the depth of the network: MobileNetV2 quantized at 4 bits (weights)
by calibration alone answers like chance. Bias correction (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction") removes the shift of the mean;
correcting the variance too follows Banner et al. 2019 ("Post training 4-bit quantization of
convolutional networks for rapid-deployment"). Re-estimating BatchNorm statistics on the data
at hand would also do it, but on a few photos it would replace ImageNet's statistics by the
photos'; here the *teacher's* moments on the same photos are the target, so what the photos
change in both networks alike stays as the FP32 model had it.

For the BatchNorm layer with running mean ``m`` and variance ``v`` in the FP32 model, and input
moments ``(mu_t, var_t)`` there and ``(mu_s, var_s)`` in the compressed model on the same images,
the compressed layer gets ``v' = v * var_s / var_t`` and ``m' = mu_s - (mu_t - m) * sqrt(var_s / var_t)``:
its output then has the FP32 output's per-channel mean and variance. The layers are set in forward
order within one forward pass over all the images, so each layer sees its inputs as already
corrected upstream.

Example:
    >>> match_batchnorm_statistics(int4_model, fp32_model, photo_crops)   # [N, 3, H, W], N ~ 64
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from surgery import compression

logger = logging.getLogger(__name__)


def _batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.dim()) if d != 1]
    x = x.double()
    return x.mean(dims), x.var(dims, unbiased=False)


@torch.no_grad()
def match_batchnorm_statistics(student: nn.Module, teacher: nn.Module, images: torch.Tensor) -> float:
    """Set the running statistics of every BatchNorm layer of ``student`` (matched to ``teacher``'s
    by name) so that its outputs on ``images`` have the per-channel mean and variance of the
    teacher's (see the module docstring); returns the mean shift of the running means, in running
    standard deviations. Channels dead in either network (no variance on these images) keep their
    statistics. ``images`` go through both networks as one batch."""
    layers, references = _batchnorms(student), _batchnorms(teacher)
    if not layers or set(layers) != set(references):
        raise ValueError("the student's and the teacher's BatchNorm layers must be the same, by name "
                         f"({len(layers)} and {len(references)} found)")
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            targets[name] = _moments(inputs[0])
        return hook

    def correct(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            mean, var = _moments(inputs[0])
            target_mean, target_var = targets[name]
            ref = references[name]
            floor = 1e-6 * ref.running_var.double()
            alive = (var > floor) & (target_var > floor)
            ratio = torch.where(alive, var / target_var.clamp_min(1e-30), torch.ones_like(var))
            new_mean = torch.where(alive, mean - (target_mean - ref.running_mean.double()) * ratio.sqrt(),
                                   module.running_mean.double())
            new_var = torch.where(alive, ref.running_var.double() * ratio, module.running_var.double())
            shifts.append(float(((new_mean - module.running_mean.double()).abs()
                                 / module.running_var.double().sqrt()).mean()))
            module.running_mean.copy_(new_mean)
            module.running_var.copy_(new_var)
        return hook

    shifts: list[float] = []
    # Every module's mode is restored as it was (a loop may hold BatchNorm frozen in a training model).
    modes = [(m, m.training) for model in (student, teacher) for m in model.modules()]
    handles = [m.register_forward_pre_hook(record(n)) for n, m in references.items()]
    try:
        teacher.eval()(images)
    finally:
        for h in handles:
            h.remove()
    handles = [m.register_forward_pre_hook(correct(n)) for n, m in layers.items()]
    try:
        with compression.forward_lock(student):
            student.eval()(images)
    finally:
        for h in handles:
            h.remove()
        for module, training in modes:
            module.training = training
    shift = sum(shifts) / len(shifts)
    logger.info("BatchNorm statistics matched to FP32 on %d images: running means moved %.3f sd on average",
                len(images), shift)
    return shift
