"""Input-gradient saliency: vanilla gradient, SmoothGrad and Integrated Gradients.

- ``"gradient"``: Simonyan, Vedaldi and Zisserman 2014, "Deep Inside Convolutional Networks";
- ``"smoothgrad"``: Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise": the mean
  absolute gradient over noisy copies. Written here rather than with Captum's ``NoiseTunnel``,
  which draws from the global RNG: these maps are reproducible from ``seed`` and thread-safe;
- ``"integrated_gradients"``: Sundararajan, Taly and Yan 2017, "Axiomatic Attribution for Deep
  Networks", through Captum's ``IntegratedGradients`` from a black baseline.

Every method reduces the three colour channels by the maximum absolute value (as Simonyan et al.)
and divides each map by its maximum, so maps are ``[N, H, W]`` in [0, 1] like GradCAM's.

Example:
    >>> from surgery import saliency
    >>> maps = saliency(model, images)                               # vanilla gradient
    >>> maps = saliency(model, images, method="smoothgrad", samples=32)
    >>> maps = saliency(model, images, target=2, method="integrated_gradients", steps=64)
"""

from __future__ import annotations

import torch
from captum.attr import IntegratedGradients
from torch import nn

from surgery import compression
from surgery.attribution.base import (Target, check_images, check_model, forward_backward, normalize_maps,
                                      resolve_target)

METHODS = ("gradient", "smoothgrad", "integrated_gradients")
_IG_BATCH = 64  # images per forward inside Integrated Gradients: bounds memory on large models


def saliency(model: nn.Module, x: torch.Tensor, target: Target = None, method: str = "gradient", *,
             samples: int = 16, noise: float = 0.15, steps: int = 32, seed: int = 0) -> torch.Tensor:
    """Saliency maps ``[N, H, W]`` in [0, 1] by ``method`` (one of :data:`METHODS`).

    Args:
        model: an eval-mode classifier taking images in [0, 1].
        x: images ``[N, 3, H, W]`` in [0, 1].
        target: class per image; None explains the predicted class (of the clean image).
        method: ``"gradient"``, ``"smoothgrad"`` or ``"integrated_gradients"``.
        samples, noise, seed: SmoothGrad's number of noisy copies, their standard deviation in
            pixel units ([0, 1] images: 0.15 is Smilkov et al.'s 15%) and the noise seed.
        steps: Integrated Gradients' number of steps along the path from the black image.
    """
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; choose from {METHODS}")
    x = check_images(x, check_model(model))
    if method == "gradient":
        return gradient_map(forward_backward(model, x, target, capture_layer=False).input_grad)
    if method == "smoothgrad":
        return _smoothgrad(model, x, target, samples, noise, seed)
    return _integrated_gradients(model, x, target, steps)


def gradient_map(input_grad: torch.Tensor) -> torch.Tensor:
    """Reduce an input attribution ``[N, 3, H, W]`` to normalised maps ``[N, H, W]``."""
    return normalize_maps(input_grad.abs().amax(dim=1))


def _predict(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    with torch.no_grad(), compression.forward_lock(model):
        return resolve_target(target, model(x))


def _smoothgrad(model: nn.Module, x: torch.Tensor, target: Target, samples: int, noise: float,
                seed: int) -> torch.Tensor:
    if samples < 1 or noise < 0:
        raise ValueError(f"SmoothGrad needs samples >= 1 and noise >= 0, got {samples} and {noise}")
    target_t = _predict(model, x, target)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    total = torch.zeros_like(x)
    for _ in range(samples):
        noisy = x + noise * torch.randn(x.shape, generator=generator, device=x.device)
        total += forward_backward(model, noisy, target_t, capture_layer=False).input_grad.abs()
    return gradient_map(total / samples)


def _integrated_gradients(model: nn.Module, x: torch.Tensor, target: Target, steps: int) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"Integrated Gradients needs steps >= 1, got {steps}")
    target_t = _predict(model, x, target)

    def forward(images: torch.Tensor) -> torch.Tensor:
        with compression.forward_lock(model):
            return model(images)

    attributions = IntegratedGradients(forward).attribute(
        x, baselines=torch.zeros_like(x), target=target_t, n_steps=steps,
        internal_batch_size=max(_IG_BATCH, len(x)))
    return gradient_map(attributions.detach())
