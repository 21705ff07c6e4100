"""What every architecture description holds, and the normalising mixin every built model has.

An :class:`Architecture` is one network's description, in the spirit of timm's ``pretrained_cfg``
and ``feature_info``: how it is built from the ``architecture`` dict of a checkpoint's
``config.json``, where its first convolution and its classifier are (kept at 8 bits by
:mod:`surgery.compression`), its named blocks and stages (where variants are compared, and
whose channels the Features tab offers), and the layer GradCAM reads. A model built from it
carries it as ``model.architecture`` (and its config as ``model.arch_config``), so every consumer
asks the model, not a list of names: :func:`architecture_of`.

Example:
    >>> model = build_from_architecture({"arch": "resnet18", "num_classes": 10, "input_size": 64,
    ...                                  "mean": [0.5] * 3, "std": [0.25] * 3})
    >>> architecture_of(model).gradcam_layer
    'layer4'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch
from torch import nn

COMMON_KEYS = ("arch", "num_classes", "input_size", "mean", "std")


class Normalized:
    """Mixin for a torchvision network class: input normalisation is the model's first operation.

    Images come in [0, 1], so attribution maps and activation maximisation work in pixel space.
    The constants are non-persistent buffers: the state dict keeps torchvision's own keys, and
    torchvision's checkpoints load without renaming anything.

    Example:
        >>> class NormalizedMobileNetV2(Normalized, torchvision.models.MobileNetV2): ...
        >>> model = NormalizedMobileNetV2([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], num_classes=10)
    """

    def __init__(self, mean, std, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.input_mean) / self.input_std)


@dataclass(frozen=True)
class Architecture:
    """One network: how it is built and where its parts are (module names of the built model).

    ``builder`` turns the complete ``architecture`` dict (common keys plus ``options``) into an
    untrained :class:`Normalized` model; ``options`` are the architecture's own config keys with
    their defaults (a checkpoint without one gets the default; an option left at None is not
    recorded); ``weights`` is torchvision's
    weights enum of the network (``"ResNet50_Weights"``), whose members name pretrained weights.
    """

    name: str  # config.json's "arch"
    builder: Callable[[dict[str, Any]], nn.Module]
    first_conv: str
    classifier: str
    blocks: tuple[str, ...]  # in order: where variants are compared (CKA, SVCCA/PWCCA, the study)
    stages: tuple[str, ...]  # the modules whose outputs end each stage (the Features tab's layers)
    gradcam_layer: str
    weights: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def config(self, num_classes: int, input_size: int, mean, std, **options) -> dict[str, Any]:
        """The ``architecture`` dict a checkpoint records: the common keys, then every option."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"{self.name} has no option {', '.join(unknown)}; its options: "
                             f"{', '.join(self.options) or 'none'}")
        chosen = {k: asdict(v) if is_dataclass(v) else v for k, v in {**self.options, **options}.items()
                  if v is not None}
        return {"arch": self.name, "num_classes": int(num_classes), "input_size": int(input_size),
                "mean": list(mean), "std": list(std), **chosen}

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        """An untrained model from an ``architecture`` dict, carrying this description."""
        missing = [k for k in COMMON_KEYS if k not in config]
        if missing:
            raise ValueError(f"architecture dict lacks {', '.join(missing)}")
        options = {k: v for k, v in config.items() if k not in COMMON_KEYS}
        complete = self.config(config["num_classes"], config["input_size"], config["mean"], config["std"], **options)
        model = self.builder(complete)
        model.architecture = self
        model.arch_config = complete
        return model


def architecture_of(model: nn.Module) -> Architecture:
    """The description a model built by :mod:`surgery.architectures` carries (also after NNCF
    quantization or pruning, which keep the model's class and attributes).

    Raises ``ValueError`` for a model built elsewhere: name its layers explicitly then.
    """
    arch = getattr(model, "architecture", None)
    if not isinstance(arch, Architecture):
        raise ValueError(f"this {type(model).__name__} carries no architecture description (build it with "
                         "surgery.build_model or load it with surgery.load_variant), so its layers must be named")
    return arch
