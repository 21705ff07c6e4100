"""Shapes: a generated, offline image-classification dataset with ground-truth object masks.

Every image holds one filled shape of a random colour, size, rotation and position on a
cluttered, textured background (a smooth colour field, oriented stripes, distractor strokes
and blobs, pixel noise). The class is the shape alone, so a classifier on raw pixels fails
(colour, position and rotation carry no label) while a CNN learns it. Each image comes with
the exact mask of its object, so attribution maps can be scored against where the object is.

Images are a pure function of ``(seed, split, index)``: the same call gives the same pixels on
any machine, and no file is ever downloaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SHAPE_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross",
    "ellipse", "diamond", "heart", "arrow", "bar",
)
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_SUPERSAMPLE = 4  # shapes are rasterised at 4x and box-filtered, for anti-aliased edges
# Objects stand roughly upright, as in photographs; full rotations would cost far more training.
_MAX_TILT = np.deg2rad(30)


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.0, -np.pi / 2), _regular(5, 0.42, -np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross() -> np.ndarray:
    a, b = 0.32, 1.0
    return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                     (-a, a), (-b, a), (-b, -a), (-a, -a)])


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)
    return pts / np.abs(pts).max()


def _arrow() -> np.ndarray:
    return np.array([(-1.0, -0.22), (0.15, -0.22), (0.15, -0.6), (1.0, 0.0), (0.15, 0.6),
                     (0.15, 0.22), (-1.0, 0.22)])


# Each shape is one polygon in unit coordinates, solid and holding its own centre: GradCAM's cells
# on this family are 16 px, too coarse to resolve a hole, so a ring or a crescent would score the
# map's resolution, not where the model looks (seen with an earlier version of this dataset: a
# strict pointing game hit 0% of rings and 10% of crescents, and ~90% of the solid shapes).
_SHAPES = {
    "circle": lambda: _regular(48),
    "square": lambda: _regular(4, 1.15, np.pi / 4),
    "triangle": lambda: _regular(3, 1.15, -np.pi / 2),
    "star": lambda: _star() * 1.1,
    "cross": _cross,
    "ellipse": lambda: _regular(48) * np.array([1.1, 0.55]),
    "diamond": lambda: _regular(4, 1.1) * np.array([0.62, 1.0]),
    "heart": lambda: _heart() * 1.05,
    "arrow": _arrow,
    "bar": lambda: np.array([(-1.0, -0.3), (1.0, -0.3), (1.0, 0.3), (-1.0, 0.3)]),
}


def _downsample(canvas: Image.Image) -> np.ndarray:
    return np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0


def _shape_alpha(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one randomly placed, scaled and rotated shape."""
    radius = rng.uniform(0.30, 0.42) * size
    margin = radius * 0.9
    cx, cy = rng.uniform(margin, size - margin, size=2)
    theta = rng.uniform(-_MAX_TILT, _MAX_TILT)
    aspect = rng.uniform(0.85, 1.15)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    s = size * _SUPERSAMPLE
    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    pts = (_SHAPES[name]() * np.array([aspect, 1 / aspect])) @ rot.T * radius + np.array([cx, cy])
    draw.polygon([tuple(p) for p in pts * _SUPERSAMPLE], fill=255)
    return _downsample(canvas)


def _smooth_field(size: int, rng: np.random.Generator, cells: int = 4) -> np.ndarray:
    # Pillow, not torch: a torch op per image pays a thread wake-up that cost more than the render.
    grid = Image.fromarray(rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8))
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0


def _stripes(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phi, freq = rng.uniform(0, np.pi), rng.uniform(2.0, 7.0) / size
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(phi) + yy * np.sin(phi)) + rng.uniform(0, 2 * np.pi))
    colour = rng.uniform(-1, 1, size=3).astype(np.float32)
    return wave[..., None] * colour * rng.uniform(0.08, 0.22)


def _clutter_alpha(size: int, rng: np.random.Generator) -> np.ndarray:
    """Distractor strokes and small blobs: edges everywhere, but no closed shape of any class."""
    s = size * _SUPERSAMPLE
    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 6)):
        pts = rng.uniform(0, s, size=(rng.integers(2, 4), 2))
        draw.line([tuple(p) for p in pts], fill=255, width=int(rng.integers(2, 6)))
    for _ in range(rng.integers(2, 6)):
        x, y = rng.uniform(0, s, size=2)
        r = rng.uniform(0.01, 0.04) * s
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return _downsample(canvas)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _contrasting_colour(background: float, rng: np.random.Generator) -> np.ndarray:
    """A random colour whose luminance differs from the background's by at least 0.3."""
    for _ in range(32):
        colour = rng.uniform(0, 1, size=3).astype(np.float32)
        if abs(float(_luminance(colour)) - background) >= 0.3:
            return colour
    return np.full(3, 0.0 if background > 0.5 else 1.0, dtype=np.float32)


def render_sample(label: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of class ``label``: returns ``(image HxWx3 float32 in [0,1], mask HxW bool)``."""
    image = _smooth_field(size, rng) * rng.uniform(0.5, 1.0) + _stripes(size, rng)
    clutter = _clutter_alpha(size, rng)[..., None]
    image = image * (1 - clutter) + clutter * rng.uniform(0, 1, size=3).astype(np.float32)
    alpha = _shape_alpha(SHAPE_CLASSES[label], size, rng)
    mask = alpha > 0.5
    background = float(_luminance(image[mask].mean(axis=0))) if mask.any() else 0.5
    colour = _contrasting_colour(background, rng)
    texture = 1 + 0.08 * rng.standard_normal((size, size, 1)).astype(np.float32)
    image = image * (1 - alpha[..., None]) + alpha[..., None] * colour * texture
    image = image + 0.03 * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), mask


@dataclass(frozen=True)
class ShapesSpec:
    """What identifies a shapes split: same spec, same pixels."""

    split: str = "train"
    num_samples: int = 10_000
    image_size: int = 64
    seed: int = 0


class ShapesDataset(Dataset):
    """The generated shapes split, held in memory as uint8 (64x64x3: 12 KiB an image).

    Items are ``(image, label)`` with ``image`` a float tensor ``[3, H, W]`` in [0, 1];
    ``masks[i]`` is the boolean object mask of item ``i``.

    Example:
        >>> ds = ShapesDataset(ShapesSpec("val", num_samples=20))
        >>> image, label = ds[0]
        >>> image.shape, ds.classes[label], ds.masks[0].shape
        (torch.Size([3, 64, 64]), 'circle', torch.Size([64, 64]))
    """

    classes = SHAPE_CLASSES

    def __init__(self, spec: ShapesSpec = ShapesSpec(), progress: bool = False) -> None:
        if spec.split not in _SPLIT_IDS:
            raise ValueError(f"unknown shapes split {spec.split!r}; choose from {sorted(_SPLIT_IDS)}")
        self.spec = spec
        n, size = spec.num_samples, spec.image_size
        self.labels = torch.arange(n) % len(SHAPE_CLASSES)
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        masks = np.empty((n, size, size), dtype=bool)
        for i in tqdm(range(n), desc=f"shapes/{spec.split}", disable=not progress, leave=False):
            rng = np.random.default_rng([spec.seed, _SPLIT_IDS[spec.split], i])
            image, masks[i] = render_sample(int(self.labels[i]), size, rng)
            images[i] = np.round(image * 255)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.masks = torch.from_numpy(masks)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255), int(self.labels[index])
