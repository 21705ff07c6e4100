"""Maps as pictures: a 2-D map through a colour map, and a map laid over the image it explains.

Shared by the Space (:mod:`space.render`) and the study's exemplar gallery (:mod:`study.page`).
Needs matplotlib for its colour maps (the ``[study]`` extra; the ``[space]`` extra includes it).

Example:
    >>> rgb = overlay(photo_uint8, gradcam_map)          # HxWx3 uint8, the map in colour on the photo
    >>> heat = colorize(saliency_map, size=256)          # HxWx3 uint8 through "inferno"
"""

from __future__ import annotations

import matplotlib
import numpy as np
import torch

MAP_CMAP = "inferno"


def _unit(values: np.ndarray) -> np.ndarray:
    """Rescale to [0, 1] for display; a constant map shows as all zeros rather than NaN."""
    values = np.nan_to_num(values.astype(np.float64))
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _resize(values: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def colorize(values: np.ndarray | torch.Tensor, size: int | None = None, cmap: str = MAP_CMAP) -> np.ndarray:
    """A 2-D map as an RGB uint8 image through ``cmap``, optionally resized to ``size`` x ``size``."""
    values = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values)
    if size is not None:
        values = _resize(values, size)
    rgb = matplotlib.colormaps[cmap](_unit(values))[..., :3]
    return np.round(rgb * 255).astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray | torch.Tensor, alpha: float = 0.5,
            cmap: str = "jet") -> np.ndarray:
    """``values`` in colour over ``image`` (HxWx3 uint8), the map resized to the image."""
    heat = colorize(values, image.shape[0], cmap).astype(np.float32)
    blend = (1 - alpha) * image.astype(np.float32) + alpha * heat
    return np.round(blend).clip(0, 255).astype(np.uint8)
