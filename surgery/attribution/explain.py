"""GradCAM and gradient saliency from one forward and one backward pass.

Both need the gradient of the same score: GradCAM at a layer, saliency at the input. One
backward from the logits to the input passes through the layer on its way, so the fused pass
costs about one Captum ``Saliency`` call instead of ``LayerGradCam`` plus ``Saliency``
(``bench/bench_attribution.py`` measures it). The maps equal those of :func:`gradcam` and
``saliency(method="gradient")``.

Example:
    >>> from surgery import explain
    >>> e = explain(model, images)
    >>> e.probabilities.max(1), e.target, e.gradcam.shape, e.saliency.shape
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from surgery.attribution.base import Target, check_images, check_model, forward_backward
from surgery.attribution.gradcam import gradcam_maps
from surgery.attribution.saliency import gradient_map


@dataclass(frozen=True)
class Explanation:
    """A prediction and its two maps for a batch of images."""

    logits: torch.Tensor  # [N, classes]
    probabilities: torch.Tensor  # softmax of the logits
    target: torch.Tensor  # [N] class explained per image
    gradcam: torch.Tensor  # [N, H, W] in [0, 1]
    saliency: torch.Tensor  # [N, H, W] in [0, 1], vanilla gradient
    layer: str  # the GradCAM layer


def explain(model: nn.Module, x: torch.Tensor, target: Target = None,
            layer: str | nn.Module | None = None) -> Explanation:
    """Predict ``x`` and explain ``target`` (None: the prediction) with GradCAM and the gradient.

    Arguments as :func:`~surgery.attribution.gradcam.gradcam`; safe to call from several threads
    on one shared model.
    """
    x = check_images(x, check_model(model))
    result = forward_backward(model, x, target, layer=layer)
    return Explanation(
        logits=result.logits,
        probabilities=result.logits.softmax(dim=1),
        target=result.target,
        gradcam=gradcam_maps(result.activations, result.layer_grad, x.shape[-2:], result.layer),
        saliency=gradient_map(result.input_grad),
        layer=result.layer,
    )
