"""GradCAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV): the layer's channels weighted by their mean gradient.

Example:
    >>> from surgery import gradcam, load_variant
    >>> model, _ = load_variant("zoo/resnet18-shapes/int8")
    >>> maps = gradcam(model, images)            # [N, 64, 64] in [0, 1], one map per image
    >>> maps = gradcam(model, images, target=3, layer="layer3")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgery.attribution.base import Target, check_images, check_model, forward_backward, normalize_maps


def gradcam(model: nn.Module, x: torch.Tensor, target: Target = None,
            layer: str | nn.Module | None = None) -> torch.Tensor:
    """GradCAM maps ``[N, H, W]`` at the input's resolution, each normalised to [0, 1].

    Args:
        model: an eval-mode classifier taking images in [0, 1] (FP32, NNCF INT8 or sparse).
        x: images ``[N, 3, H, W]`` in [0, 1].
        target: class per image; None explains each image's predicted class.
        layer: module name (``"layer4"``), module, or None for the model's GradCAM layer
            (``architecture_of(model).gradcam_layer``: ``layer4``, ``features.18``).

    The map is ``ReLU(sum_k mean_ij(dy/dA_kij) * A_k)``, upsampled bilinearly (as Captum's
    ``LayerAttribution.interpolate(..., "bilinear")``) and divided by its maximum
    (:func:`~surgery.attribution.base.normalize_maps`). The backward stops at ``layer``.
    """
    x = check_images(x, check_model(model))
    result = forward_backward(model, x, target, layer=layer, input_grad=False)
    return gradcam_maps(result.activations, result.layer_grad, x.shape[-2:], result.layer)


def gradcam_maps(activations: torch.Tensor, layer_grad: torch.Tensor, size: tuple[int, int] | torch.Size,
                 layer: str | None = None) -> torch.Tensor:
    """GradCAM from a captured layer output and its gradient, upsampled to ``size`` and normalised."""
    if activations.dim() != 4:
        raise ValueError(f"GradCAM needs a convolutional layer with output [N, C, h, w]; layer {layer!r} "
                         f"gives {list(activations.shape)}")
    weights = layer_grad.mean(dim=(2, 3), keepdim=True)
    cam = (weights * activations).sum(dim=1, keepdim=True).relu()
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return normalize_maps(cam)
