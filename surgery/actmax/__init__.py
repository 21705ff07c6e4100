"""Activation maximisation (feature visualisation) for FP32, NNCF INT8 and sparse models.

Example:
    >>> from surgery import activation_maximization, load_variant
    >>> model, config = load_variant("zoo/resnet18-shapes/int8")
    >>> result = activation_maximization(model, "layer4", range(16), gradient="ste")
    >>> result.images.shape        # [16, 3, 64, 64]
"""

from surgery.actmax.objectives import OBJECTIVES
from surgery.actmax.optimize import GRADIENTS, ActMaxResult, activation_maximization
from surgery.actmax.param import FourierImage
from surgery.actmax.transform import standard_transforms

__all__ = ["GRADIENTS", "OBJECTIVES", "ActMaxResult", "FourierImage", "activation_maximization",
           "standard_transforms"]
