"""torchvision's MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

``features.0`` is the stem convolution, ``features.1`` .. ``features.17`` the inverted-residual
blocks, ``features.18`` the final 1x1 convolution to 1280 channels (GradCAM's layer, as
pytorch-grad-cam takes ``model.features[-1]``), ``classifier.1`` the linear classifier. Its
depthwise convolutions make it the classic hard case for low-bit quantization (Nagel et al. 2019,
"Data-Free Quantization Through Weight Equalization and Bias Correction").

Options (recorded in ``config.json``'s ``architecture``):

- ``width_mult``: torchvision's channel multiplier (1.0 for the ImageNet weights);
- ``last_stage_stride``: 1 keeps the 160- and 320-channel blocks and ``features.18`` at the
  resolution of the 96-channel ones (4x4 maps at 64x64 instead of 2x2), as ``last_stage_stride``
  does for a ResNet's ``layer4``. Strides have no weights: state dicts are the same either way.

Example:
    >>> model = MOBILENET_V2.build(MOBILENET_V2.config(10, 64, [0.5] * 3, [0.25] * 3, width_mult=0.5))
    >>> model(torch.rand(1, 3, 64, 64)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

from typing import Any

import torch  # noqa: F401  (the docstring's example)
import torchvision

from surgery.architectures.base import Architecture, Normalized

# torchvision's setting (expansion t, channels c, repeats n, stride s of the first repeat): the
# blocks features.1 .. features.17 in order.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))


class NormalizedMobileNetV2(Normalized, torchvision.models.MobileNetV2):
    """torchvision's MobileNetV2 with input normalisation as its first step (images in [0, 1])."""


def _build(config: dict[str, Any]) -> NormalizedMobileNetV2:
    stride = int(config["last_stage_stride"])
    if stride not in (1, 2):
        raise ValueError(f"last_stage_stride must be 1 or 2, got {stride}")
    setting = [list(row) for row in INVERTED_RESIDUAL_SETTING]
    setting[5][3] = stride  # the 160-channel blocks: the network's last downsampling
    return NormalizedMobileNetV2(config["mean"], config["std"], num_classes=int(config["num_classes"]),
                                 width_mult=float(config["width_mult"]), inverted_residual_setting=setting)


MOBILENET_V2 = Architecture(
    name="mobilenet_v2", builder=_build, first_conv="features.0.0", classifier="classifier.1",
    blocks=tuple(f"features.{i}" for i in range(1, 19)),
    # The last module at each resolution of the ImageNet network: strides 2, 4, 8, 16 and 32.
    stages=("features.1", "features.3", "features.6", "features.13", "features.18"), gradcam_layer="features.18",
    weights="MobileNet_V2_Weights", options={"width_mult": 1.0, "last_stage_stride": 2})
