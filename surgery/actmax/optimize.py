"""Activation maximisation: the image that most excites a channel, a neuron or a class logit.

Feature visualisation in the manner of Lucid/Lucent (Olah, Mordvintsev and Schubert 2017,
"Feature Visualization", Distill; greentfrapp/lucent): a Fourier-space, colour-decorrelated
image (:mod:`~surgery.actmax.param`), random transformations at every step
(:mod:`~surgery.actmax.transform`) and Adam. Many channels are optimised at once as one batch:
image ``i`` serves ``channels[i]`` and, the model being in eval mode, the images do not interact.

**INT8 models.** NNCF's fake-quantizers pass the gradient only where their input lies inside the
calibrated range; an image that drives a layer beyond the range NNCF calibrated on real data
gets exactly zero gradient through the saturated quantizers, and the optimisation can stall (a
pixel-space loop on ResNet18-CIFAR layer4 got a zero input gradient in 69 of 128 steps).

- ``gradient="true"`` follows the quantized network's own gradient. The picture is what the INT8
  model's training signal can reach: a stall (see :attr:`ActMaxResult.zero_gradient_steps`)
  shows the optimisation hit the calibrated ceiling.
- ``gradient="ste"`` (the default) uses a straight-through estimate
  (:func:`surgery.compression.straight_through`): forward values are the INT8 ones, but the
  gradient passes every quantizer as if it were the identity. The picture is then the input the
  INT8 network responds to most, found by following the gradient of its float shadow; every
  objective value reported is still measured through the quantized forward.

For models without quantizers (FP32, sparse) both are the exact gradient and the result says
``"true"``. Seen on the trained resnet18-shapes INT8 model (layer4, 8 channels, 128 steps): both
reached values within 2% of each other, and their only zero-gradient steps (10 of 128, one channel)
came from a channel dead on the starting image, identically with either gradient.

Example:
    >>> from surgery import activation_maximization
    >>> result = activation_maximization(model, "layer4", [3, 17, 42], steps=128, seed=0)
    >>> result.images.shape, result.values, result.gradient, result.zero_gradient_steps
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from surgery import compression
from surgery.actmax.objectives import OBJECTIVES, objective_values
from surgery.actmax.param import FourierImage
from surgery.actmax.transform import standard_transforms
from surgery.attribution.activations import LayerCapture
from surgery.attribution.base import check_model

logger = logging.getLogger(__name__)

GRADIENTS = ("ste", "true")
Progress = Callable[[int, int], object]


@dataclass(frozen=True)
class ActMaxResult:
    """Images found by :func:`activation_maximization` and how the optimisation went."""

    images: torch.Tensor  # [C, 3, H, W] in [0, 1]; image i maximises channels[i]
    channels: tuple[int, ...]
    layer: str | None  # None for the logit objective
    objective: str
    gradient: str  # the gradient followed: "true" (exact, or NNCF's own) or "ste"
    values: torch.Tensor  # [C] objective of the final, untransformed images
    history: torch.Tensor  # [steps, C] objective at each step (on the transformed images)
    grad_norms: torch.Tensor  # [steps, C] L2 norm of each image's gradient at each step
    seed: int

    @property
    def zero_gradient_steps(self) -> torch.Tensor:
        """Per image, the number of steps whose input gradient was exactly zero (no update signal).

        Besides saturated quantizers ("true" gradient on INT8), a channel whose ReLU output is
        zero everywhere on the current image gives zero gradient on any model: compare "true"
        with "ste" on the same seed to see the quantizers' share.
        """
        return (self.grad_norms == 0).sum(dim=0)


def activation_maximization(
    model: nn.Module,
    layer: str | nn.Module | None,
    channels: int | Sequence[int],
    *,
    objective: str = "channel",
    steps: int = 128,
    lr: float = 0.05,
    size: int | None = None,
    seed: int = 0,
    gradient: str = "ste",
    transforms: bool = True,
    decorrelate: bool = True,
    progress: Progress | None = None,
) -> ActMaxResult:
    """Optimise one image per entry of ``channels`` to maximise ``objective`` at ``layer``.

    Args:
        model: an eval-mode classifier taking images in [0, 1] (FP32, NNCF INT8 or sparse).
        layer: module name or module whose output holds the channels; must be None for
            ``objective="logit"``, whose "channels" are class indices.
        channels: channel (or class) indices; all are optimised together as one batch.
        objective: ``"channel"`` (spatial mean), ``"neuron"`` (centre position) or ``"logit"``.
        steps, lr: Adam steps and learning rate (Lucent's default 0.05).
        size: image side in pixels; None takes the input size the model was built for (the
            ``architecture`` of its config).
        seed: image ``i`` starts from seed ``(seed, channels[i])`` and the transformations
            follow ``seed``: same arguments, same images.
        gradient: ``"ste"`` or ``"true"``, how to differentiate NNCF quantizers (module docstring).
        transforms, decorrelate: Lucent's transformation robustness and colour decorrelation
            (on by default; off for ablations).
        progress: called as ``progress(step, total)`` after each step; a ``gr.Progress`` takes a
            tuple, so pass ``lambda s, t: gr_progress((s, t))``. Without it, a tqdm bar.
    """
    _check_arguments(layer, objective, steps, gradient)
    device = check_model(model)
    channel_list = _channel_list(channels)
    size = size or _input_size(model)
    image = FourierImage.random(len(channel_list), size, [_image_seed(seed, c) for c in channel_list],
                                decorrelate=decorrelate, device=device)
    index = torch.tensor(channel_list, device=device)
    capture = LayerCapture(model, layer) if layer is not None else None
    transform = standard_transforms(size) if transforms else (lambda x, g: x)
    with torch.enable_grad(), capture or nullcontext(), _gradient_mode(model, gradient) as used:
        history, grad_norms = _optimise(model, image, capture, index, objective, transform, steps, lr, seed,
                                        progress)
        final = image().detach()
        with torch.no_grad():
            values = _evaluate(model, capture, final, index, objective)
    logger.info("act. max. %s %s: gradient %s, zero-gradient steps %s", layer or "logits", channel_list, used,
                (grad_norms == 0).sum(dim=0).tolist())
    return ActMaxResult(images=final, channels=tuple(channel_list), layer=capture.name if capture else None,
                        objective=objective, gradient=used, values=values.cpu(), history=history,
                        grad_norms=grad_norms, seed=seed)


def _check_arguments(layer: str | nn.Module | None, objective: str, steps: int, gradient: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}; choose from {GRADIENTS}")
    if objective == "logit" and layer is not None:
        raise ValueError(f"the logit objective reads the model's output; pass layer=None, not {layer!r}")
    if objective != "logit" and layer is None:
        raise ValueError(f"the {objective!r} objective needs a layer, e.g. 'layer4'")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


@contextmanager
def _gradient_mode(model: nn.Module, gradient: str) -> Iterator[str]:
    """Yields the gradient actually followed: "ste" only where there are quantizers to bypass."""
    if gradient == "true":
        yield "true"
        return
    with compression.straight_through(model) as hooked:
        if not hooked:
            logger.info("model has no quantizers: the straight-through estimate is the exact gradient")
        yield "ste" if hooked else "true"


def _optimise(model: nn.Module, image: FourierImage, capture: LayerCapture | None, index: torch.Tensor,
              objective: str, transform: Callable, steps: int, lr: float, seed: int,
              progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on the spectrum; returns the objective and the image-gradient norm per step ``[steps, C]``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([image.spectrum], lr=lr)
    history, grad_norms = torch.empty(steps, len(index)), torch.empty(steps, len(index))
    bar = tqdm(total=steps, desc=f"act. max. {len(index)} ch", leave=False, disable=progress is not None)
    for step in range(steps):
        pixels = image()
        values = _evaluate(model, capture, transform(pixels, generator), index, objective)
        # Gradients w.r.t. our own tensors only: the model's parameters never accumulate .grad.
        g_spectrum, g_pixels = torch.autograd.grad(-values.sum(), [image.spectrum, pixels])
        image.spectrum.grad = g_spectrum
        optimizer.step()
        history[step] = values.detach().cpu()
        grad_norms[step] = g_pixels.flatten(1).norm(dim=1).cpu()
        bar.update()
        if progress is not None:
            progress(step + 1, steps)
    bar.close()
    return history, grad_norms


def _evaluate(model: nn.Module, capture: LayerCapture | None, x: torch.Tensor, index: torch.Tensor,
              objective: str) -> torch.Tensor:
    if capture is not None:
        capture.reset()
    with compression.forward_lock(model):
        logits = model(x)
    output = capture.output if capture is not None else logits
    if int(index.max()) >= output.shape[1]:
        what = f"layer {capture.name!r} has {output.shape[1]} channels" if capture else \
            f"the model has {output.shape[1]} classes"
        raise ValueError(f"channel {int(index.max())} out of range: {what}")
    return objective_values(objective, output, index)


def _channel_list(channels: int | Sequence[int]) -> list[int]:
    values = [channels] if isinstance(channels, (int, np.integer)) else list(channels)
    if not values:
        raise ValueError("channels is empty")
    if any(not isinstance(c, (int, np.integer)) or c < 0 for c in values):
        raise ValueError(f"channels must be non-negative ints, got {channels!r}")
    return [int(c) for c in values]


def _image_seed(seed: int, channel: int) -> int:
    # Image i depends on (seed, channel) only, not on which other channels share the batch.
    return int(np.random.SeedSequence([seed, channel]).generate_state(1)[0])


def _input_size(model: nn.Module) -> int:
    """The input size the model was built for (its architecture config), else a ``ValueError``."""
    config = getattr(model, "arch_config", None)
    if not isinstance(config, dict) or "input_size" not in config:
        raise ValueError(f"cannot tell the input size of this {type(model).__name__}; pass size=")
    return int(config["input_size"])
