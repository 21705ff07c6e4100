"""torchvision's ResNet18 and ResNet50 (He et al. 2016, "Deep Residual Learning for Image Recognition").

Options (recorded in ``config.json``'s ``architecture``):

- ``cifar_stem``: the seed's CIFAR stem, a 3x3 stride-1 ``conv1`` and no max-pool;
- ``stem``: any :class:`Stem` (``{"kernel", "stride", "maxpool"}``), replacing torchvision's 7x7
  stride-2 ``conv1`` and max-pool (wins over ``cifar_stem``);
- ``last_stage_stride``: 1 keeps ``layer4`` at ``layer3``'s resolution (finer GradCAM maps).

Example:
    >>> model = RESNET18.build(RESNET18.config(10, 64, [0.5] * 3, [0.25] * 3, last_stage_stride=1))
    >>> model(torch.rand(1, 3, 64, 64)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch  # noqa: F401  (the docstring's example)
import torchvision
from torch import nn

from surgery.architectures.base import Architecture, Normalized


class NormalizedResNet(Normalized, torchvision.models.ResNet):
    """torchvision's ResNet with input normalisation as its first step (images in [0, 1]).

    It stays a ``torchvision.models.ResNet``: ``model.layer4`` and torchvision state dicts work as usual.
    """


@dataclass(frozen=True)
class Stem:
    """The first convolution (``conv1``, 64 channels) and whether torchvision's 3x3 max-pool follows it.

    torchvision's ImageNet stem is ``Stem(7, 2, maxpool=True)`` (stride 4 in all); the CIFAR stem is
    ``Stem(3, 1, maxpool=False)``; ``Stem(3, 2, maxpool=False)`` halves 28x28 inputs once, so layer1
    runs at 14x14 (a quarter of its cost under the CIFAR stem, at 28x28).
    """

    kernel: int = 7
    stride: int = 2
    maxpool: bool = True


def _builder(block: type[nn.Module], layers: list[int]):
    def build(config: dict[str, Any]) -> NormalizedResNet:
        model = NormalizedResNet(config["mean"], config["std"], block=block, layers=layers,
                                 num_classes=int(config["num_classes"]))
        stem = (Stem(**config["stem"]) if config.get("stem")
                else Stem(3, 1, maxpool=False) if config["cifar_stem"] else None)
        if stem is not None:
            model.conv1 = nn.Conv2d(3, 64, kernel_size=stem.kernel, stride=stem.stride, padding=stem.kernel // 2,
                                    bias=False)
            if not stem.maxpool:
                model.maxpool = nn.Identity()
        stride = int(config["last_stage_stride"])
        if stride not in (1, 2):
            raise ValueError(f"last_stage_stride must be 1 or 2, got {stride}")
        if stride == 1:
            # torchvision's BasicBlock refuses dilation, so the stride is simply dropped: layer4
            # keeps layer3's resolution, as in output-stride-16 ResNets.
            first = model.layer4[0]
            (first.conv2 if block is torchvision.models.resnet.Bottleneck else first.conv1).stride = (1, 1)
            first.downsample[0].stride = (1, 1)
        return model

    return build


def _resnet(name: str, block: type[nn.Module], layers: list[int], weights: str) -> Architecture:
    stages = tuple(f"layer{i + 1}" for i in range(4))
    return Architecture(
        name=name, builder=_builder(block, layers), first_conv="conv1", classifier="fc",
        blocks=tuple(f"{stage}.{i}" for stage, n in zip(stages, layers) for i in range(n)),
        stages=stages, gradcam_layer="layer4", weights=weights,
        options={"cifar_stem": False, "last_stage_stride": 2, "stem": None})


RESNET18 = _resnet("resnet18", torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], "ResNet18_Weights")
RESNET50 = _resnet("resnet50", torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], "ResNet50_Weights")
