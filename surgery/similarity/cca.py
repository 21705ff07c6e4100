"""Canonical correlation analysis of representations: SVCCA and PWCCA.

- SVCCA (Raghu, Gilmer, Yosinski & Sohl-Dickstein 2017, "SVCCA: Singular Vector Canonical
  Correlation Analysis for Deep Learning Dynamics and Interpretability", NeurIPS): keep the top
  singular directions of each representation (99% of the variance in the paper), run CCA between
  the two subspaces, and average the canonical correlations.
- PWCCA (Morcos, Raghu & Bengio 2018, "Insights on Representational Similarity in Neural Networks
  with Canonical Correlation", NeurIPS): weight each canonical correlation by how much of the
  first representation its canonical variate accounts for, ``alpha_i = sum_j |<h_i, x_j>|``.

Both take ``[n_examples, n_features]`` matrices. CCA is invariant to any invertible linear map
of either side (so is SVCCA without truncation); PWCCA's weights come from ``x``, so it is
invariant to invertible maps of ``y`` only. CCA overfits when the number of directions
approaches the number of examples (every correlation tends to 1): keep ``n`` well above them.

Everything is computed from the centred second moments (as google/svcca's ``cca_core`` does), in
float64, with an eigendecomposition instead of an inverse so rank-deficient layers (dead ReLU
channels, pruned filters) are handled: directions without variance are dropped. Since both scores are functions of the moments,
:class:`MomentAccumulator` streams them batch by batch (exact, no subsample of rows) and keeps
them per group of images, so the jackknife interval refits CCA without each group.

**Overfitting.** With few rows per direction the sample canonical correlations sit well above the
population ones: at 8 rows per direction two *independent* 512-channel representations give a
mean canonical correlation near 0.3. :meth:`MomentAccumulator.jackknife` therefore fixes SVCCA's
kept dimensions once, from all rows (a leave-one-group-out refit must not choose its own), can
pair every image with another image of its batch (``y_shuffled``: the same moments but the cross
products, a baseline of what overfitting alone gives), and its replicates feed
:meth:`surgery.similarity.stats.Jackknife.bias_corrected`, whose interval adds an allowance for
the correction's own error (the SVD cut re-chosen in each leave-one-group-out fit makes it
larger than the jackknife's standard error; see there). :data:`ROWS_PER_DIRECTION_FLOOR` is the
fewest *effective* rows per direction (rows over the design effect of an image's correlated
positions) at which the corrected SVCCA's interval was measured to cover
(``tests/test_cca_bias.py``, ``bench/bench_coverage.py --regime report``).

PWCCA's bias is of another kind: over every direction (as Morcos et al.) the projection weights
``sum_j |<h_i, x_j>|`` of canonical variates whose correlations are nearly tied are mixed in the
sample, and the L1 norm of a mixture is larger, so the many weak directions weigh more and the
plug-in falls *below* the population value (-0.034 at 8 rows per direction in the bench). That
bias does not fall as 1 / rows (on SVCCA's subspaces too: -0.010 with 4,096 independent rows for
512 channels; near 0 with the rows correlated 0.3 within an image only because the overfitting
there cancels it), and the jackknife correction moves the estimate further away. The squared
projections ``alpha_i = sum_j <h_i, x_j>^2``, the variance of ``x`` the canonical variate
accounts for (``pwcca_weights="variance"``), are linear in the squared mixing coefficients, so
mixing near-tied variates leaves their total unchanged: what is left is the overfitting of the
correlations, which falls as 1 / rows and which the jackknife removes, as for SVCCA. The study
reports that PWCCA, on SVCCA's subspaces, bias-corrected, with an allowance for the correction's
own error (:data:`CORRECTION_ERROR`; ``tests/test_cca_bias.py``); :func:`pwcca` keeps Morcos et
al.'s definition.

Example:
    >>> x = torch.randn(2000, 20)
    >>> svcca(x, x @ torch.randn(20, 20))    # ~1.0: an invertible map
    >>> pwcca(x, torch.randn(2000, 20))       # small: independent
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch

from surgery.similarity.cka import Matrix, paired_matrices
from surgery.similarity.stats import Jackknife

logger = logging.getLogger(__name__)

CCA_METHODS = ("svcca", "pwcca")
PWCCA_WEIGHTS = ("l1", "variance")  # Morcos et al.'s sum_j |<h_i, x_j>|; the variance sum_j <h_i, x_j>^2
# The bias correction's own error as a multiple of |plug-in - corrected| / groups (Jackknife.bias_corrected's
# ``error``), sized by simulation for SVCCA and for PWCCA with variance weights on SVCCA's subspaces: the
# corrected PWCCA's s.d. exceeded the jackknife's standard error by 1.9 such steps in quadrature, with and
# without within-image correlation (bench/bench_coverage.py --regime report).
CORRECTION_ERROR = {"svcca": 2 ** -0.5, "pwcca": 2.0}
ROWS_PER_DIRECTION_FLOOR = 8  # effective rows; below it the study reports no CCA value (see the module docstring)
Keep = float | int | tuple[int, int] | None


class Moments(NamedTuple):
    """Centred cross-products of two representations: ``x^T x``, ``y^T y``, ``x^T y``."""

    xx: torch.Tensor
    yy: torch.Tensor
    xy: torch.Tensor


def moments(x: torch.Tensor, y: torch.Tensor) -> Moments:
    """Centred second moments of two representations of the same examples."""
    x, y = x - x.mean(0), y - y.mean(0)
    return Moments(x.T @ x, y.T @ y, x.T @ y)


class MomentAccumulator:
    """Streamed sums and cross-products of ``x: [rows, p]`` and ``y: [rows, q]``, kept per group of images.

    Each :meth:`update` adds one batch's rows (every spatial position of its images) to one of
    ``groups`` groups. :meth:`moments` gives the centred moments of all rows, or of all rows but
    one group's (``leave_out``): what the delete-a-group jackknife refits CCA on. Memory:
    ``groups (p^2 + q^2 + p q)`` doubles, whatever the number of images (:meth:`nbytes`), plus
    ``groups p q`` for the shuffled pairing when given.

    Rows are shifted by the first batch's means before summing, so the final centring does not
    cancel the digits of large ReLU activations.

    Example:
        >>> acc = MomentAccumulator(groups=10)
        >>> for k, (xb, yb) in enumerate(batches):
        ...     acc.update(xb, yb, group=k % 10)
        >>> jk = acc.jackknife()            # {"svcca": Jackknife, "pwcca": Jackknife}
    """

    def __init__(self, groups: int = 1) -> None:
        if groups < 1:
            raise ValueError(f"groups must be at least 1, got {groups}")
        self.groups = groups
        self._shift: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sums: list[list[torch.Tensor]] | None = None  # per group: rows, sx, sy, sxx, syy, sxy[, sxy shuffled]
        self.images = 0

    @staticmethod
    def nbytes(groups: int, p: int, q: int, shuffled: bool = False) -> int:
        return groups * (p * p + q * q + p * q * (2 if shuffled else 1) + p + q + 1) * 8

    def update(self, x: torch.Tensor, y: torch.Tensor, group: int = 0, images: int | None = None,
               y_shuffled: torch.Tensor | None = None) -> None:
        """Add rows ``x: [rows, p]``, ``y: [rows, q]`` (of ``images`` images) to ``group``.

        ``y_shuffled``: the same rows of ``y`` paired with other images' rows of ``x`` (a
        permutation of ``y``'s rows), for the shuffled-images baseline; give it on every update or never.
        """
        x, y = x.detach().to(torch.float64).cpu(), y.detach().to(torch.float64).cpu()
        if x.dim() != 2 or y.dim() != 2 or len(x) != len(y):
            raise ValueError(f"x and y must be [rows, features] with the same rows, got {tuple(x.shape)}, {tuple(y.shape)}")
        if not 0 <= group < self.groups:
            raise ValueError(f"group must be in 0..{self.groups - 1}, got {group}")
        if self._shift is None:
            self._shift = (x.mean(0), y.mean(0))
            p, q = x.shape[1], y.shape[1]
            zeros = [torch.zeros(()), torch.zeros(p), torch.zeros(q), torch.zeros(p, p), torch.zeros(q, q),
                     torch.zeros(p, q)] + ([torch.zeros(p, q)] if y_shuffled is not None else [])
            self._sums = [[z.double().clone() for z in zeros] for _ in range(self.groups)]
        if (y_shuffled is not None) != self.shuffled:
            raise ValueError("give y_shuffled on every update or on none")
        x, y = x - self._shift[0], y - self._shift[1]
        parts = [torch.tensor(float(len(x))), x.sum(0), y.sum(0), x.T @ x, y.T @ y, x.T @ y]
        if y_shuffled is not None:
            y_shuffled = y_shuffled.detach().to(torch.float64).cpu() - self._shift[1]
            if y_shuffled.shape != y.shape:
                raise ValueError(f"y_shuffled must be a permutation of y's rows, got {tuple(y_shuffled.shape)}")
            parts.append(x.T @ y_shuffled)
        sums = self._sums[group]
        for k, part in enumerate(parts):
            sums[k] += part.double()
        self.images += len(x) if images is None else images

    @property
    def shuffled(self) -> bool:
        """Whether the shuffled-images cross products are kept."""
        return self._sums is not None and len(self._sums[0]) == 7

    def moments(self, leave_out: int | None = None, shuffled: bool = False) -> Moments:
        """Centred moments of every row, or of every row outside group ``leave_out``;
        ``shuffled``: with the cross products of the shuffled pairing."""
        if self._sums is None:
            raise ValueError("MomentAccumulator has seen no rows yet: call update() first")
        if shuffled and not self.shuffled:
            raise ValueError("no shuffled pairing was given to update()")
        chosen = [s for g, s in enumerate(self._sums) if g != leave_out]
        rows, sx, sy, sxx, syy, sxy = (sum(s[k] for s in chosen) for k in range(6))
        if shuffled:
            sxy = sum(s[6] for s in chosen)
        if float(rows) < 2:
            raise ValueError("fewer than 2 rows left to estimate moments from")
        mx, my = sx / rows, sy / rows
        return Moments(sxx - rows * torch.outer(mx, mx), syy - rows * torch.outer(my, my),
                       sxy - rows * torch.outer(mx, my))

    @property
    def dims(self) -> tuple[int, int]:
        """Features of ``x`` and ``y`` (0 before the first update)."""
        return (len(self._shift[0]), len(self._shift[1])) if self._shift else (0, 0)

    @property
    def rows(self) -> int:
        return int(sum(float(s[0]) for s in self._sums)) if self._sums else 0

    @property
    def group_rows(self) -> np.ndarray:
        """Rows in each group (the sizes :meth:`Jackknife.bias_corrected` weighs the groups by)."""
        return np.array([float(s[0]) for s in self._sums]) if self._sums else np.zeros(self.groups)

    def jackknife(self, methods: tuple[str, ...] = CCA_METHODS, keep: Keep = 0.99, *, pwcca_keep: Keep = None,
                  pwcca_weights: str = "l1", shuffled: bool = False) -> dict[str, Jackknife]:
        """Each method's score on all rows and without each group (NaN where a group is empty).

        The kept dimensions of ``keep`` (SVCCA) and ``pwcca_keep`` (PWCCA; None: every direction)
        are chosen once, from all rows, and every replicate uses the same counts; they are in each
        result's ``extra["kept"]``. ``pwcca_weights``: see :func:`cca_scores`. ``shuffled``: the
        scores of the shuffled-images pairing.
        """
        full = self.moments()
        # One eigendecomposition per side serves the kept counts and the full-data scores (the
        # shuffled pairing changes only the cross moments): 2 instead of 6, the bulk of the cost.
        sides = None if isinstance(keep, tuple) and isinstance(pwcca_keep, tuple) else spectra(full)
        kept = {"svcca": kept_dims(full, keep, sides), "pwcca": kept_dims(full, pwcca_keep, sides)}
        full = self.moments(shuffled=shuffled) if shuffled else full
        values = _scores_or_nan(full, methods, kept, pwcca_weights, sides)
        leave_out = {m: [] for m in methods}
        for g in range(self.groups):
            empty = float(self._sums[g][0]) == 0
            scores = {m: math.nan for m in methods} if empty or self.groups == 1 else \
                _scores_or_nan(self.moments(g, shuffled), methods, kept, pwcca_weights)
            for m in methods:
                leave_out[m].append(scores[m])
        return {m: Jackknife(values[m], np.array(leave_out[m]), self.images,
                             extra={"kept": kept[m], "rows": self.rows, "dims": self.dims}) for m in methods}


def kept_dims(m: Moments, keep: Keep, sides: tuple[Spectrum, Spectrum] | None = None) -> tuple[int, int]:
    """The directions each side keeps for ``keep`` (see :func:`svcca`), as counts; ``sides``: the
    moments' :func:`spectra`, when already computed."""
    if isinstance(keep, tuple):
        return keep
    return tuple(_whitener(s, keep).shape[1] for s in sides or spectra(m))


def _scores_or_nan(m: Moments, methods: tuple[str, ...], kept: dict[str, tuple[int, int]], pwcca_weights: str,
                   sides: tuple[Spectrum, Spectrum] | None = None) -> dict[str, float]:
    try:
        return cca_scores(m, methods, kept["svcca"], pwcca_keep=kept["pwcca"], pwcca_weights=pwcca_weights,
                          sides=sides)
    except (ValueError, torch.linalg.LinAlgError):  # the rest has no variance, or no SVD converges
        return {method: math.nan for method in methods}


Spectrum = tuple[torch.Tensor, torch.Tensor]  # eigenvalues (descending), eigenvectors [d, rank]


def spectra(m: Moments) -> tuple[Spectrum, Spectrum]:
    """Each side's covariance spectrum, cut at its numerical rank."""
    return _spectrum(m.xx, "x"), _spectrum(m.yy, "y")


def _spectrum(cov: torch.Tensor, name: str) -> Spectrum:
    """Eigenvalues (descending) and eigenvectors of a covariance, cut at its numerical rank."""
    eigvals, eigvecs = torch.linalg.eigh(cov)
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    top = float(eigvals[0]) if eigvals.numel() else 0.0
    rank = int((eigvals > top * cov.shape[0] * 1e-12).sum()) if top > 0 else 0
    if rank == 0:
        raise ValueError(f"{name} has no variance: every example has the same representation")
    return eigvals[:rank], eigvecs[:, :rank]


def _whitener(spectrum: Spectrum, keep: float | int | None) -> torch.Tensor:
    """``[d, k]`` map to whitened coordinates of the top-``k`` principal directions.

    ``keep``: a fraction of variance in (0, 1], a number of directions (at most the numerical
    rank), or None for every direction above numerical rank.
    """
    eigvals, eigvecs = spectrum
    k = len(eigvals)
    if isinstance(keep, int):
        k = min(keep, k)
    elif isinstance(keep, float):
        explained = torch.cumsum(eigvals, 0) / eigvals.sum()
        k = min(int((explained < keep - 1e-12).sum()) + 1, k)
    return eigvecs[:, :k] / eigvals[:k].sqrt()


def check_keep(keep: float | int | None) -> None:
    """Refuse a ``keep`` that is neither a variance fraction in (0, 1], a count >= 1, nor None."""
    if keep is None:
        return
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be a variance fraction, a number of directions or None, got {keep!r}")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"keep must be at least 1 direction, got {keep}")
    if isinstance(keep, float) and not 0 < keep <= 1:
        raise ValueError(f"keep as a variance fraction must be in (0, 1], got {keep}")


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values; LAPACK's slower gesvd where gesdd does not converge
    (it fails on the many repeated singular values of layers with fewer rows than channels)."""
    try:
        p, rho, _ = torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        p, rho, _ = scipy.linalg.svd(a.cpu().numpy(), full_matrices=False, lapack_driver="gesvd")
        p, rho = torch.from_numpy(p).to(a), torch.from_numpy(rho).to(a)
    return p, rho


def _cca(m: Moments, wx: torch.Tensor, wy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical correlations (descending) and the x-side canonical weights ``[d_x, k]``.

    The i-th canonical variate is ``h_i = x_centred @ a_i``, of unit norm over the examples.
    """
    p, rho = _svd(wx.T @ m.xy @ wy)
    return rho.clamp(0.0, 1.0), wx @ p[:, :rho.numel()]


def cca_scores(m: Moments, methods: tuple[str, ...] = CCA_METHODS, keep: Keep = 0.99, *,
               pwcca_keep: Keep = None, pwcca_weights: str = "l1",
               sides: tuple[Spectrum, Spectrum] | None = None) -> dict[str, float]:
    """SVCCA (``keep`` as in :func:`svcca`) and/or PWCCA (on the subspaces ``pwcca_keep`` keeps;
    None: every direction, as Morcos et al.) from precomputed moments. A ``(k_x, k_y)`` tuple
    keeps that many directions on each side. ``sides``: the moments' :func:`spectra`, when the
    caller has them. ``pwcca_weights``: ``"l1"``, Morcos et al.'s ``alpha_i = sum_j |<h_i, x_j>|``,
    or ``"variance"``, ``alpha_i = sum_j <h_i, x_j>^2`` (the variance of ``x`` along ``h_i``,
    whose total does not move where near-tied variates mix: see the module docstring).

    Both share one eigendecomposition per side, the costly step of every jackknife replicate.
    """
    unknown = [method for method in methods if method not in CCA_METHODS]
    if unknown:
        raise ValueError(f"unknown CCA method {unknown[0]!r}; choose from {CCA_METHODS}")
    if pwcca_weights not in PWCCA_WEIGHTS:
        raise ValueError(f"unknown PWCCA weights {pwcca_weights!r}; choose from {PWCCA_WEIGHTS}")
    sx, sy = sides or spectra(m)

    def whiteners(k: Keep) -> tuple[torch.Tensor, torch.Tensor]:
        kx, ky = k if isinstance(k, tuple) else (k, k)
        return _whitener(sx, kx), _whitener(sy, ky)

    scores = {}
    if "svcca" in methods:
        scores["svcca"] = float(_cca(m, *whiteners(keep))[0].mean())
    if "pwcca" in methods:
        rho, a = _cca(m, *whiteners(pwcca_keep))
        # <h_i, x_j> = a_i^T x^T x_j: the weights need only the moments too.
        projections = a.T @ m.xx
        alpha = projections.abs().sum(1) if pwcca_weights == "l1" else projections.square().sum(1)
        scores["pwcca"] = float((alpha * rho).sum() / alpha.sum())
    return scores


def overfitting(rows: int, dims: int, design_effect: float = 1.0) -> str | None:
    """A warning when ``rows`` examples (``rows / design_effect`` effective ones, see
    :class:`surgery.similarity.representations.DesignEffect`) for ``dims`` canonical directions
    inflate the plug-in correlations (fewer than 10 effective per direction), else None."""
    effective = rows / design_effect
    if dims * 10 <= effective:
        return None
    floor = "" if effective >= ROWS_PER_DIRECTION_FLOOR * dims else \
        f"; below the floor of {ROWS_PER_DIRECTION_FLOOR} effective rows per direction"
    repeat = "" if design_effect == 1 else f", {effective / dims:.1f} effective (design effect {design_effect:.1f})"
    return (f"CCA on {rows} rows for up to {dims} canonical directions ({rows / dims:.1f} per direction{repeat}"
            f"{floor}): plug-in correlations are inflated towards 1")


def warn_if_overfit(n: int, dims: int) -> None:
    message = overfitting(n, dims)
    if message:
        logger.warning("%s (keep examples >> dimensions)", message)


def canonical_correlations(x: Matrix, y: Matrix, keep: float | int | None = None) -> torch.Tensor:
    """All canonical correlations between ``x: [n, p]`` and ``y: [n, q]``, in descending order.

    ``keep`` truncates each side to its top principal directions first (see :func:`svcca`).
    """
    check_keep(keep)
    x, y = paired_matrices(x, y, 2)
    m = moments(x, y)
    rho = _cca(m, *(_whitener(s, keep) for s in spectra(m)))[0]
    warn_if_overfit(x.shape[0], rho.numel())
    return rho


def svcca(x: Matrix, y: Matrix, keep: float | int | None = 0.99) -> float:
    """SVCCA similarity (Raghu et al. 2017): mean canonical correlation of the SVD-reduced subspaces.

    ``keep``: the fraction of variance each side keeps (0.99 as in the paper), a number of
    singular directions, or None for plain CCA (mean of all canonical correlations).

    Example:
        >>> acts = torch.randn(5000, 64)
        >>> svcca(acts, acts @ torch.randn(64, 64), keep=None)   # 1.0: CCA ignores invertible maps
    """
    return float(canonical_correlations(x, y, keep).mean())


def pwcca(x: Matrix, y: Matrix) -> float:
    """Projection-weighted CCA (Morcos et al. 2018), weighted by the representation ``x``.

    ``sum_i alpha_i rho_i / sum_i alpha_i`` with ``alpha_i = sum_j |<h_i, x_j>|``: ``h_i`` is
    the i-th canonical variate on ``x``'s side (unit norm over examples) and ``x_j`` the centred
    activations of its j-th feature. Directions that carry much of ``x`` count more, so noise
    directions that happen to correlate count less than in the plain mean.

    Example:
        >>> fp32_acts, int8_acts = torch.randn(4000, 32), torch.randn(4000, 32)
        >>> pwcca(fp32_acts, int8_acts)
    """
    x, y = paired_matrices(x, y, 2)
    warn_if_overfit(x.shape[0], min(x.shape[1], y.shape[1]))
    return cca_scores(moments(x, y), ("pwcca",))["pwcca"]
