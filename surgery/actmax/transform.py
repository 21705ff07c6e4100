"""Transformation robustness (Lucid/Lucent ``transform.standard_transforms``): at every step the
image is padded, jittered, scaled and rotated at random before the model sees it, so the
optimiser cannot exploit pixel-exact, high-frequency patterns.

Randomness comes from a ``torch.Generator`` passed in, never the global RNG: a fixed seed gives
the same sequence of transformations, and concurrent optimisations do not disturb each other.
The whole batch gets the same transformation at a step, as in Lucent.

Example:
    >>> transform = standard_transforms(64)
    >>> out = transform(images, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
_LUCENT_SIZE = 224  # Lucent's pixel amounts are for 224x224 images; they are scaled to the image size


def _choice(options: Sequence, generator: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def pad(width: int, value: float = 0.5) -> Transform:
    """Constant (grey) border of ``width`` pixels."""
    return lambda x, g: F.pad(x, [width] * 4, value=value)


def jitter(d: int) -> Transform:
    """Shift by 0..d-1 pixels down and right, zero-filled, keeping the size (kornia ``translate``)."""
    if d < 2:
        raise ValueError(f"jitter needs d >= 2, got {d}")

    def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        dx, dy = (int(v) for v in torch.randint(d, (2,), generator=g))
        return F.pad(x, [dx, 0, dy, 0])[..., : x.shape[-2], : x.shape[-1]]

    return shift


def random_scale(scales: Sequence[float]) -> Transform:
    """Resize by a random factor (bilinear); a shrunk image is padded back to its size."""

    def scale(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        factor = _choice(scales, g)
        h, w = x.shape[-2:]
        sh, sw = math.ceil(factor * h), math.ceil(factor * w)
        out = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=True)
        ph, pw = max(0, math.ceil((h - sh) / 2)), max(0, math.ceil((w - sw) / 2))
        return F.pad(out, [pw, pw, ph, ph])

    return scale


def random_rotate(degrees: Sequence[float]) -> Transform:
    """Rotate about the centre by a random angle, bilinear, zero-filled corners."""

    def rotate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        angle = math.radians(_choice(degrees, g))
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
        grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    return rotate


def center_crop(size: int) -> Transform:
    """Cut (or grey-pad) the centre ``size`` x ``size``: the model sees the size it was trained on."""

    def crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < size or w < size:
            ph, pw = max(0, size - h), max(0, size - w)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=0.5)
            h, w = x.shape[-2:]
        top, left = (h - size) // 2, (w - size) // 2
        return x[..., top: top + size, left: left + size]

    return crop


def compose(transforms: Sequence[Transform]) -> Transform:
    def run(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        for transform in transforms:
            x = transform(x, g)
        return x

    return run


def standard_transforms(size: int) -> Transform:
    """Lucent's ``standard_transforms`` with pixel amounts scaled from 224 to ``size``, then a crop.

    pad 12, jitter 8, scale 0.9..1.1, rotate -10..10 degrees (0 more often), jitter 4 at 224;
    at 64x64: pad 3, jitter 2, same scales and angles, jitter 2. Unlike Lucent, the result is
    cropped back to ``size``: at 64x64 a 3-pixel grey frame is a fifth of a layer4 cell, and an
    image optimised only inside such a frame scored far lower once shown alone, at its own size.
    """
    s = size / _LUCENT_SIZE
    return compose([
        pad(max(1, round(12 * s))),
        jitter(max(2, round(8 * s))),
        random_scale([1 + (i - 5) / 50 for i in range(11)]),
        random_rotate(list(range(-10, 11)) + 5 * [0]),
        jitter(max(2, round(4 * s))),
        center_crop(size),
    ])
