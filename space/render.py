"""Turning maps and matrices into pictures for the page (presentation only, no analysis).

Example:
    >>> rgb = overlay(photo_uint8, gradcam_map)          # HxWx3 uint8, the map in colour on the photo
    >>> png = heatmap_figure(matrix, rows, cols, "FP32", "INT8")
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

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


def heatmap_figure(matrix: np.ndarray, rows: list[str], cols: list[str], row_label: str, col_label: str,
                   title: str) -> np.ndarray:
    """A labelled layer x layer heatmap with a colour bar, in [0, 1], as an RGB uint8 image."""
    n, m = len(rows), len(cols)
    # A bare Figure, not pyplot: pyplot's global state is not safe across request threads.
    fig = Figure(figsize=(1.6 + 0.42 * m, 1.3 + 0.36 * n), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
    ax.set_xticks(range(m), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), rows, fontsize=7)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")  # keeps the colour bar's labels in
    return np.asarray(Image.open(buffer).convert("RGB"))
