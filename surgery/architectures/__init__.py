"""Every network the registry builds, each described once (:class:`Architecture`).

A family (:mod:`surgery.registry`) names its architecture; a checkpoint's ``config.json``
records it as the ``architecture`` dict (``{"arch": "mobilenet_v2", "num_classes", "input_size",
"mean", "std", ...options}``), from which :func:`build_from_architecture` rebuilds the model.
The model then carries its description, and every consumer (compression, attribution, the
study, the Space, the benches) reads it with :func:`architecture_of`:

======================  ===============  =================  ===================================  ==============
architecture            first conv       classifier         blocks / stages                      GradCAM layer
======================  ===============  =================  ===================================  ==============
``resnet18``            ``conv1``        ``fc``             ``layer1.0`` .. ``layer4.1`` /       ``layer4``
                                                            ``layer1`` .. ``layer4``
``resnet50``            ``conv1``        ``fc``             ``layer1.0`` .. ``layer4.2`` / same  ``layer4``
``mobilenet_v2``        ``features.0.0`` ``classifier.1``   ``features.1`` .. ``features.18`` /  ``features.18``
                                                            one per resolution
======================  ===============  =================  ===================================  ==============

Example:
    >>> model = build_from_architecture({"arch": "mobilenet_v2", "num_classes": 1000, "input_size": 224,
    ...                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    >>> load_pretrained(model, "IMAGENET1K_V1")   # torchvision's weights, fetched and checked
    >>> architecture_of(model).gradcam_layer
    'features.18'
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torchvision
from torch import nn

from surgery.architectures.base import Architecture, Normalized, architecture_of
from surgery.architectures.mobilenetv2 import MOBILENET_V2, NormalizedMobileNetV2
from surgery.architectures.resnet import RESNET18, RESNET50, NormalizedResNet, Stem
from surgery.architectures.weights import WeightsRefused, WeightsUnavailable, pretrained_state_dict

logger = logging.getLogger(__name__)

__all__ = ["ARCHITECTURES", "Architecture", "Normalized", "NormalizedMobileNetV2", "NormalizedResNet", "Stem",
           "WeightsRefused", "WeightsUnavailable", "architecture_of", "build_from_architecture", "get_architecture",
           "load_pretrained", "torchvision_weights"]

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (RESNET18, RESNET50, MOBILENET_V2)}


def get_architecture(name: str) -> Architecture:
    """The description called ``name``; ``ValueError`` listing the known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unsupported architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}") from None


def build_from_architecture(config: Mapping[str, Any]) -> nn.Module:
    """An untrained model from a checkpoint's ``architecture`` dict (``ModelFamily.architecture()``)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"an architecture must be a dict, got {type(config).__name__}")
    return get_architecture(config.get("arch")).build(config)


def torchvision_weights(architecture: Architecture, name: str) -> torchvision.models.WeightsEnum:
    """torchvision's weights ``name`` (``"IMAGENET1K_V1"``) of the architecture."""
    return torchvision.models.get_weight(f"{architecture.weights}.{name}")


def load_pretrained(model: nn.Module, name: str) -> nn.Module:
    """Load torchvision's weights ``name`` into ``model`` (in place), found or fetched and checked
    by :mod:`surgery.architectures.weights`; returns the model.

    A model with another number of classes keeps its own freshly initialised classifier (the
    description's ``classifier``) on torchvision's features: the start of transfer learning.
    """
    arch = architecture_of(model)
    weights = torchvision_weights(arch, name)
    logger.info("loading torchvision weights %s", weights)
    state = pretrained_state_dict(weights)
    head = {k for k in state if k.startswith(arch.classifier + ".")}
    if any(state[k].shape != model.state_dict()[k].shape for k in head):
        logger.info("%d classes, not %d: a new classifier %s on torchvision's features",
                    model.arch_config["num_classes"], len(weights.meta["categories"]), arch.classifier)
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
        if set(missing) != head or unexpected:
            raise ValueError(f"torchvision's {weights} does not fit {arch.name} apart from its classifier: "
                             f"missing {sorted(set(missing) - head)}, unexpected {unexpected}")
    else:
        model.load_state_dict(state)
    return model
