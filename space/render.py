"""Turning maps and matrices into pictures for the page (presentation only, no analysis).

The map helpers (:func:`colorize`, :func:`overlay`) live in :mod:`surgery.overlay`, shared with the study.

Example:
    >>> rgb = overlay(photo_uint8, gradcam_map)          # HxWx3 uint8, the map in colour on the photo
    >>> png = heatmap_figure(matrix, rows, cols, "FP32", "INT8")
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from surgery.overlay import MAP_CMAP, colorize, overlay

__all__ = ["MAP_CMAP", "colorize", "heatmap_figure", "overlay"]


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
