"""Confidence intervals: every aggregate the analysis reports carries one, and it contains its estimate.

Two schemes, both with **images as the resampling unit** (the images are what would change if
the study were repeated):

- **Means of per-image scores** (agreement, pointing game, map correlation...): the percentile
  bootstrap (Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 13), images drawn
  with replacement (:func:`mean_ci`). A mean is linear in the multiplicities, so duplicates do
  not bias it.
- **Everything else** (CKA, SVCCA/PWCCA, recall slopes, contrasts between models): the
  delete-a-group jackknife (Quenouille 1956; Efron & Tibshirani ch. 11; the grouped form in
  Shao & Tu 1995, *The Jackknife and Bootstrap*, sec. 2.3). The images are split into ``G``
  fixed groups; the statistic is recomputed ``G`` times, each time *without* one group:

      se^2 = (G - 1) / G * sum_g (theta_(g) - mean_g theta_(g))^2,
      interval = theta_hat +- t_{G-1, (1+confidence)/2} * se.

  Why not the bootstrap here: resampling with replacement duplicates images, and statistics
  that fit something to the data (CCA's correlations, the unbiased HSIC inside minibatch CKA)
  are not linear in the multiplicities. CCA's correlations rise as the effective number of
  distinct examples falls, so bootstrap replicates sit above the estimate: the percentile
  interval of SVCCA/PWCCA missed its own estimate in 11 of 24 cases on a real zoo. A
  leave-group-out replicate holds only distinct images, the interval is centred on the
  estimate (so it always contains it), and ``t`` with ``G - 1`` degrees of freedom accounts for
  the few groups. The coverage of both schemes on data with a known population value is
  measured by ``tests/test_coverage.py`` and ``bench/bench_coverage.py``.

Replicates of several statistics computed on the same groups can be combined linearly
(:class:`Jackknife` supports ``-``, ``+`` and scaling): the jackknife of a paired contrast,
e.g. (compressed vs FP32) minus (FP32 seed 1 vs FP32) on the same images, is the contrast of
the replicates.

Example:
    >>> hits = torch.tensor([1.0, 1.0, 0.0, 1.0])
    >>> mean_ci(hits, n_boot=1000, seed=0)
    Estimate(value=0.75, low=0.25, high=1.0, n=4, unit='image', confidence=0.95, method='bootstrap', replicates=1000)
    >>> grouped_mean(torch.rand(100), groups=10).estimate()     # jackknife over 10 groups of images
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy import stats as scipy_stats

DEFAULT_BOOT = 1000
DEFAULT_GROUPS = 20
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Estimate:
    """A point estimate on the full sample and its interval (which always contains it).

    ``method`` is ``"bootstrap"`` (``replicates`` resamples) or ``"jackknife"`` (``replicates``
    groups left out one at a time).
    """

    value: float
    low: float
    high: float
    n: int  # images that entered the estimate (with a defined score)
    unit: str = "image"
    confidence: float = 0.95
    method: str = "bootstrap"
    replicates: int = DEFAULT_BOOT

    def __post_init__(self) -> None:
        # The contract every caller relies on; a violation is a bug in the interval, not data.
        if all(math.isfinite(v) for v in (self.value, self.low, self.high)):
            if not self.low - _TOLERANCE <= self.value <= self.high + _TOLERANCE:
                raise AssertionError(f"interval [{self.low}, {self.high}] does not contain its estimate {self.value}")

    def to_dict(self, digits: int = 6) -> dict:
        """JSON-ready: floats rounded (outwards for the bounds, so rounding keeps the estimate inside), NaN as ``None``."""
        out = {k: _json_float(v, digits) if isinstance(v, float) else v for k, v in asdict(self).items()}
        if out["low"] is not None:
            out["low"] = math.floor(self.low * 10**digits) / 10**digits
            out["high"] = math.ceil(self.high * 10**digits) / 10**digits
        return out

    def excludes(self, value: float = 0.0) -> bool:
        """Whether the interval lies entirely on one side of ``value``."""
        return math.isfinite(self.low) and (self.low > value or self.high < value)

    def __str__(self) -> str:
        if math.isnan(self.value):
            return "n/a"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _json_float(value: float, digits: int) -> float | None:
    return None if not math.isfinite(value) else round(value, digits)


# -- Bootstrap (means) ----------------------------------------------------------------------------

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
    _check_confidence(confidence)
    alpha = (1 - confidence) / 2
    replicates = np.asarray(replicates, dtype=np.float64)
    undefined = np.isnan(replicates).all(axis=0)
    # nanquantile warns on all-NaN slices: fill them, then put NaN back.
    low, high = np.nanquantile(np.where(undefined, 0.0, replicates), [alpha, 1 - alpha], axis=0)
    return np.where(undefined, np.nan, low), np.where(undefined, np.nan, high)


def bootstrap(statistic: Callable[[np.ndarray], float | np.ndarray], n: int, *, n_boot: int = DEFAULT_BOOT,
              confidence: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of a statistic of ``n`` units that is linear in their multiplicities (a mean).

    ``statistic(indices)`` gets the resampled unit indices (length ``n``, with repeats). For
    statistics that fit something to the data use :func:`jackknife` instead (see the module
    docstring).

    Example:
        >>> x = np.random.default_rng(0).normal(size=200)
        >>> low, high = bootstrap(lambda i: x[i].mean(), len(x), n_boot=200)
    """
    counts = resample_counts(n, n_boot, seed)
    units = np.arange(n)
    replicates = np.stack([np.asarray(statistic(np.repeat(units, c)), dtype=np.float64) for c in counts])
    return percentile_interval(replicates, confidence)


def mean_ci(values: torch.Tensor | np.ndarray, *, n_boot: int = DEFAULT_BOOT, confidence: float = 0.95,
            seed: int = 0, unit: str = "image") -> Estimate:
    """Mean of per-unit scores with its percentile-bootstrap interval; NaN scores (undefined) are left out.

    Example:
        >>> mean_ci(pointing_game(maps, masks)).low
    """
    values = np.asarray(torch.as_tensor(values).detach().cpu().double().flatten())
    values = values[~np.isnan(values)]
    if values.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, unit, confidence, "bootstrap", n_boot)
    counts = resample_counts(values.size, n_boot, seed)
    low, high = percentile_interval(counts @ values / values.size, confidence)
    mean = float(values.mean())
    # A percentile interval of a mean contains the mean but for floating-point ties at its ends.
    return Estimate(mean, min(float(low), mean), max(float(high), mean), int(values.size), unit, confidence,
                    "bootstrap", n_boot)


# -- Jackknife (everything fitted) ----------------------------------------------------------------

def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def jackknife_interval(value: np.ndarray | float, leave_out: np.ndarray,
                       confidence: float = 0.95, allowance: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Delete-a-group jackknife interval ``value +- t_{G-1} sqrt(se^2 + allowance^2)`` (see the module docstring).

    ``leave_out: [G, *shape]`` holds the statistic recomputed without each group. Groups where
    it is undefined (NaN) are left out of the variance; with fewer than 2 defined groups, or an
    undefined ``value``, the interval is NaN. ``allowance``: the s.d. of an error the replicates
    do not see (a bias correction's own, :meth:`Jackknife.bias_corrected`); 0 for a plain jackknife.
    """
    _check_confidence(confidence)
    value = np.asarray(value, dtype=np.float64)
    leave_out = np.asarray(leave_out, dtype=np.float64)
    g = (~np.isnan(leave_out)).sum(0)
    t = scipy_stats.t.ppf((1 + confidence) / 2, np.maximum(g - 1, 1))
    half = np.where(np.isfinite(value), t * jackknife_standard_error(leave_out, allowance), np.nan)
    return value - half, value + half


def jackknife_standard_error(leave_out: np.ndarray, allowance: np.ndarray | float = 0.0) -> np.ndarray:
    """``sqrt((G - 1) / G * sum_g (theta_(g) - mean theta_(g))^2 + allowance^2)`` over the defined
    (not NaN) groups of ``leave_out: [G, *shape]``; NaN with fewer than 2."""
    leave_out = np.asarray(leave_out, dtype=np.float64)
    defined = ~np.isnan(leave_out)
    g = defined.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.where(defined, leave_out, 0.0).sum(0) / g
        spread = np.where(defined, (leave_out - centre) ** 2, 0.0).sum(0)
        return np.where(g >= 2, np.sqrt((g - 1) / g * spread + np.asarray(allowance, dtype=np.float64) ** 2), np.nan)


@dataclass(frozen=True)
class Jackknife:
    """A statistic on all images and recomputed without each of ``G`` fixed groups of images.

    Linear combinations of statistics on the *same* groups are again jackknives (the contrast
    of two similarity values on the same images is ``a - b``). ``allowance`` is the s.d. of an
    error the replicates cannot show (set by :meth:`bias_corrected`); it widens the interval and
    adds in quadrature through sums and differences.
    """

    value: np.ndarray  # any shape; a 0-d array for a scalar
    leave_out: np.ndarray  # [G, *value.shape]
    n: int  # images
    unit: str = "image"
    extra: dict = field(default_factory=dict, compare=False)
    allowance: np.ndarray = 0.0  # broadcast to value.shape

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", np.asarray(self.value, dtype=np.float64))
        object.__setattr__(self, "leave_out", np.asarray(self.leave_out, dtype=np.float64))
        if self.leave_out.shape[1:] != self.value.shape:
            raise ValueError(f"leave-out replicates {self.leave_out.shape} do not match the value {self.value.shape}")
        object.__setattr__(self, "allowance", np.broadcast_to(np.asarray(self.allowance, dtype=np.float64),
                                                              self.value.shape).copy())

    @property
    def groups(self) -> int:
        return self.leave_out.shape[0]

    def interval(self, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        return jackknife_interval(self.value, self.leave_out, confidence, self.allowance)

    def standard_error(self) -> np.ndarray:
        """:func:`jackknife_standard_error` of the replicates, with this jackknife's allowance."""
        return jackknife_standard_error(self.leave_out, self.allowance)

    def bias_corrected(self, sizes: np.ndarray | None = None, error: float = 2 ** -0.5) -> "Jackknife":
        """Quenouille's jackknife bias correction, for statistics whose bias falls as 1 / images, with
        an interval that allows for the correction's own error.

        ``theta_J = G theta_hat - sum_g (1 - m_g / n) theta_(g)`` over the ``G`` defined groups of
        ``m_g`` images each (``sizes``; equal when omitted), the delete-a-group form for unequal
        groups (Busing, Meijer & van der Leeden 1999, "Delete-m jackknife for unequal m", Statistics
        and Computing): with equal groups it is ``G theta_hat - (G - 1) mean_g theta_(g)`` (Efron &
        Tibshirani 1993, *An Introduction to the Bootstrap*, sec. 10.5). A bias ``b / n`` cancels
        exactly. The replicates are shifted by the same amount, so the jackknife's standard error
        is kept, and ``allowance = error |theta_hat - theta_J| / G`` is added to it in quadrature.

        Why the allowance: the jackknife's standard error is that of ``theta_hat``; ``theta_J``
        also carries the error of the estimated bias, which Efron & Tibshirani warn can make a
        corrected estimate more variable than the plain one, and which no single-level replicate
        shows. For SVCCA (Raghu et al. 2017) in the study's regime (512 channels, 8 rows per
        direction, 16 groups) it is not small: the SVD truncation at a fixed count of a spectrum
        without a gap picks up other directions at the cut in each leave-one-group-out fit, and
        the correction multiplies those jumps by ``G - 1``. Measured
        (``bench/bench_coverage.py --regime report``): the corrected SVCCA's s.d. was 1.2-1.4x the
        jackknife's standard error, the excess growing with the size of the correction, and the
        double (jackknife-after-jackknife) standard error overshot it 2x. The allowance, an error
        of about one leave-out step ``|b_hat| / G`` shared in quadrature, is sized from those
        measurements, not derived; with ``error = 1 / sqrt(2)`` (the default) the 95% interval
        covered 0.90-0.99 there (``tests/test_cca_bias.py``). The study's PWCCA needs another
        ``error`` (:data:`surgery.similarity.cca.CORRECTION_ERROR`). It vanishes where there is
        nothing to correct. Apply once.

        Example:
            >>> jk = cca.jackknife()["svcca"]            # canonical correlations overfit: biased up
            >>> jk.bias_corrected().estimate()
        """
        defined = ~np.isnan(self.leave_out)
        sizes = np.ones(self.groups) if sizes is None else np.asarray(sizes, dtype=np.float64)
        if sizes.shape != (self.groups,):
            raise ValueError(f"sizes must give the images of each of the {self.groups} groups, got {sizes.shape}")
        shape = (self.groups,) + (1,) * self.value.ndim
        m = np.where(defined, sizes.reshape(shape), 0.0)
        g = defined.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            weights = np.where(defined, 1 - m / m.sum(0), 0.0)
            corrected = g * self.value - (weights * np.where(defined, self.leave_out, 0.0)).sum(0)
            allowance = error * np.abs(corrected - self.value) / g
        corrected = np.where(g >= 2, corrected, np.nan)
        return Jackknife(corrected, self.leave_out + (corrected - self.value), self.n, self.unit, dict(self.extra),
                         np.where(g >= 2, allowance, np.nan))

    def estimate(self, confidence: float = 0.95, index: tuple = ()) -> Estimate:
        """The scalar at ``index`` as an :class:`Estimate`."""
        low, high = self.interval(confidence)
        return Estimate(float(self.value[index]), float(low[index]), float(high[index]), self.n, self.unit,
                        confidence, "jackknife", self.groups)

    def _combine(self, other: "Jackknife | float", op) -> "Jackknife":
        if isinstance(other, Jackknife):
            if other.groups != self.groups:
                raise ValueError(f"cannot combine jackknives over {self.groups} and {other.groups} groups")
            return Jackknife(op(self.value, other.value), op(self.leave_out, other.leave_out),
                             min(self.n, other.n), self.unit, allowance=np.hypot(self.allowance, other.allowance))
        scale = abs(other) if op is np.multiply else 1.0
        return Jackknife(op(self.value, other), op(self.leave_out, other), self.n, self.unit,
                         allowance=self.allowance * scale)

    def __sub__(self, other): return self._combine(other, np.subtract)
    def __add__(self, other): return self._combine(other, np.add)
    def __mul__(self, k: float): return self._combine(float(k), np.multiply)
    def __getitem__(self, index: tuple | int) -> "Jackknife":
        index = index if isinstance(index, tuple) else (index,)
        return Jackknife(self.value[index], self.leave_out[(slice(None), *index)], self.n, self.unit,
                         allowance=self.allowance[index])

    @staticmethod
    def mean(items: list["Jackknife"]) -> "Jackknife":
        """The average of statistics on the same groups (e.g. over the FP32 seed pairs)."""
        total = items[0]
        for item in items[1:]:
            total = total + item
        return total * (1.0 / len(items))


def group_of(index: np.ndarray | int, groups: int, batch_size: int) -> np.ndarray:
    """The jackknife group of an image at position ``index`` in the stream: its batch, modulo ``groups``.

    Whole batches form the groups, so the minibatch CKA (a statistic per batch) and per-image
    scores share one partition of the images.
    """
    return (np.asarray(index) // batch_size) % groups


def grouped_sums(values: np.ndarray, groups: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums and counts of ``values [N, ...]`` (NaN left out)."""
    values = np.asarray(values, dtype=np.float64)
    defined = ~np.isnan(values)
    sums = np.zeros((num_groups, *values.shape[1:]))
    counts = np.zeros((num_groups, *values.shape[1:]))
    np.add.at(sums, groups, np.where(defined, values, 0.0))
    np.add.at(counts, groups, defined.astype(np.float64))
    return sums, counts


def grouped_mean(values: torch.Tensor | np.ndarray, groups: np.ndarray | int, unit: str = "image") -> Jackknife:
    """Mean of per-image scores (NaN left out), with its leave-one-group-out replicates.

    ``groups``: the group of each image (``[N]``), or a number of groups for consecutive blocks.

    Example:
        >>> grouped_mean(agreement, group_of(np.arange(len(agreement)), 20, 32)).estimate()
    """
    values = np.asarray(torch.as_tensor(values).detach().cpu().double())
    if isinstance(groups, (int, np.integer)):
        groups = (np.arange(len(values)) * int(groups)) // max(len(values), 1)
    groups = np.asarray(groups)
    num_groups = int(groups.max()) + 1 if groups.size else 1
    sums, counts = grouped_sums(values, groups, num_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = sums.sum(0) / counts.sum(0)
        leave_out = (sums.sum(0) - sums) / (counts.sum(0) - counts)
    leave_out = np.where(counts > 0, leave_out, np.nan)  # an empty group is no replicate
    return Jackknife(value, leave_out, int((~np.isnan(values)).sum()) if values.ndim == 1 else len(values), unit)


def jackknife(statistic: Callable[[np.ndarray], float | np.ndarray], groups: np.ndarray) -> Jackknife:
    """Any statistic of a set of images (``statistic(image_indices)``), left out group by group.

    Example:
        >>> jk = jackknife(lambda i: svcca(x[i], y[i]), np.arange(len(x)) % 20)
        >>> jk.estimate()
    """
    groups = np.asarray(groups)
    everything = np.arange(len(groups))
    value = statistic(everything)
    leave_out = np.stack([np.asarray(statistic(everything[groups != g]), dtype=np.float64)
                          for g in range(int(groups.max()) + 1)])
    return Jackknife(value, leave_out, len(groups))
