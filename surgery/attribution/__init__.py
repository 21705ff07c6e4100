"""Attribution maps that work alike on FP32, NNCF INT8 and sparse models.

- :func:`gradcam`: GradCAM at a layer (default: the model's GradCAM layer, from its architecture);
- :func:`saliency`: vanilla gradient, SmoothGrad, Integrated Gradients;
- :func:`explain`: prediction, GradCAM and gradient saliency from one forward and one backward.

All maps are ``[N, H, W]`` at the input's resolution, each divided by its maximum into [0, 1].
Calls are safe from several threads sharing one model: hooks are per call and per thread.

Example:
    >>> from surgery import explain, load_variant
    >>> model, config = load_variant("zoo/resnet18-shapes/int8")
    >>> e = explain(model, images)
"""

from surgery.attribution.activations import LayerCapture, resolve_layer
from surgery.attribution.base import normalize_maps
from surgery.attribution.explain import Explanation, explain
from surgery.attribution.gradcam import gradcam
from surgery.attribution.saliency import METHODS, saliency

__all__ = ["METHODS", "Explanation", "LayerCapture", "explain", "gradcam",
           "normalize_maps", "resolve_layer", "saliency"]
