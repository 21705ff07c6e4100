"""Bootstrap confidence intervals: every aggregate the analysis reports carries one.

The interval is the percentile bootstrap (Efron & Tibshirani 1993, *An Introduction to the
Bootstrap*, ch. 13): resample the units with replacement ``n_boot`` times, recompute the
statistic, and take the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles.

**Resampling unit: images.** Every statistic in this package is a function of a set of held-out
images, and the images are what would change if the study were repeated, so they are what gets
resampled. Per-image scores (agreement, pointing game, map correlation...) are resampled one
image at a time. The minibatch CKA estimator resamples its minibatches, i.e. images in the fixed
groups it saw them in (see :class:`surgery.similarity.cka.MinibatchCKA` for why).

Example:
    >>> hits = torch.tensor([1.0, 1.0, 0.0, 1.0])
    >>> mean_ci(hits, n_boot=1000, seed=0)
    Estimate(value=0.75, low=0.25, high=1.0, n=4, unit='image', confidence=0.95, n_boot=1000)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

DEFAULT_BOOT = 1000


@dataclass(frozen=True)
class Estimate:
    """A point estimate on the full sample and its bootstrap percentile interval."""

    value: float
    low: float
    high: float
    n: int  # resampling units that entered the estimate (images with a defined score)
    unit: str = "image"
    confidence: float = 0.95
    n_boot: int = DEFAULT_BOOT

    def to_dict(self, digits: int = 6) -> dict:
        """JSON-ready: floats rounded, NaN written as ``None``."""
        return {k: _json_float(v, digits) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        if math.isnan(self.value):
            return "n/a"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _json_float(value: float, digits: int) -> float | None:
    return None if not math.isfinite(value) else round(value, digits)


def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` multiplicities of the ``n`` units in each bootstrap replicate."""
    if n < 1:
        raise ValueError("bootstrap needs at least one resampling unit, got 0")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles of ``replicates`` along axis 0, ignoring replicates where the statistic is NaN."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = (1 - confidence) / 2
    replicates = np.asarray(replicates, dtype=np.float64)
    undefined = np.isnan(replicates).all(axis=0)
    # nanquantile warns on all-NaN slices: fill them, then put NaN back.
    low, high = np.nanquantile(np.where(undefined, 0.0, replicates), [alpha, 1 - alpha], axis=0)
    return np.where(undefined, np.nan, low), np.where(undefined, np.nan, high)


def bootstrap(statistic: Callable[[np.ndarray], float | np.ndarray], n: int, *, n_boot: int = DEFAULT_BOOT,
              confidence: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of any statistic of ``n`` units.

    ``statistic(indices)`` gets the resampled unit indices (length ``n``, with repeats) and returns
    a float or an array; the interval has the statistic's shape.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(200, 8))
        >>> low, high = bootstrap(lambda i: cka(x[i], x[i] ** 2), len(x), n_boot=200)
    """
    counts = resample_counts(n, n_boot, seed)
    units = np.arange(n)
    replicates = np.stack([np.asarray(statistic(np.repeat(units, c)), dtype=np.float64) for c in counts])
    return percentile_interval(replicates, confidence)


def mean_ci(values: torch.Tensor | np.ndarray, *, n_boot: int = DEFAULT_BOOT, confidence: float = 0.95,
            seed: int = 0, unit: str = "image") -> Estimate:
    """Mean of per-unit scores with its bootstrap interval; NaN scores (undefined) are left out.

    Example:
        >>> mean_ci(pointing_game(maps, masks)).low
    """
    values = np.asarray(torch.as_tensor(values).detach().cpu().double().flatten())
    values = values[~np.isnan(values)]
    if values.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, unit, confidence, n_boot)
    counts = resample_counts(values.size, n_boot, seed)
    replicates = counts @ values / values.size
    low, high = percentile_interval(replicates, confidence)
    return Estimate(float(values.mean()), float(low), float(high), int(values.size), unit, confidence, n_boot)
