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
channels, pruned filters) are handled: directions without variance are dropped. Moments also
take per-example weights, which is how the bootstrap resamples images cheaply.

Example:
    >>> x = torch.randn(2000, 20)
    >>> svcca(x, x @ torch.randn(20, 20))    # ~1.0: an invertible map
    >>> pwcca(x, torch.randn(2000, 20))       # small: independent
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from surgery.similarity.cka import Matrix, paired_matrices

logger = logging.getLogger(__name__)

CCA_METHODS = ("svcca", "pwcca")


class Moments(NamedTuple):
    """Centred cross-products of two representations: ``x^T x``, ``y^T y``, ``x^T y``."""

    xx: torch.Tensor
    yy: torch.Tensor
    xy: torch.Tensor


def moments(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None) -> Moments:
    """Centred (optionally example-weighted) second moments; weights are resampling multiplicities."""
    if weights is None:
        x, y = x - x.mean(0), y - y.mean(0)
        return Moments(x.T @ x, y.T @ y, x.T @ y)
    w = weights.to(x.dtype)[:, None]
    x = x - (w * x).sum(0) / w.sum()
    y = y - (w * y).sum(0) / w.sum()
    wx = w * x
    return Moments(x.T @ wx, y.T @ (w * y), wx.T @ y)


class ImageMoments:
    """Per-image sums and cross-products of ``x: [N, P, p]`` and ``y: [N, P, q]`` (P rows per image).

    Resampling images (a bootstrap replicate) then costs one weighted sum over the ``N`` images
    instead of a pass over all ``N * P`` rows: :meth:`moments` with ``weights`` equals
    :func:`moments` of the rows, each row weighted by its image's weight. Memory:
    :meth:`nbytes` (``N (p^2 + q^2 + p q)`` doubles).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # Centre on the overall mean first: the per-image products are uncentred, and small
        # values keep the later subtraction of the weighted mean from cancelling digits.
        x, y = x - x.mean((0, 1)), y - y.mean((0, 1))
        self.positions = x.shape[1]
        self.sum_x, self.sum_y = x.sum(1), y.sum(1)
        self.xx = torch.einsum("npi,npj->nij", x, x)
        self.yy = torch.einsum("npi,npj->nij", y, y)
        self.xy = torch.einsum("npi,npj->nij", x, y)

    @staticmethod
    def nbytes(images: int, p: int, q: int) -> int:
        return images * (p * p + q * q + p * q) * 8

    def moments(self, weights: torch.Tensor | None = None) -> Moments:
        w = torch.ones(len(self.xx), dtype=self.xx.dtype) if weights is None else weights.to(self.xx.dtype)
        rows = w.sum() * self.positions
        mean_x, mean_y = w @ self.sum_x / rows, w @ self.sum_y / rows
        return Moments(torch.einsum("n,nij->ij", w, self.xx) - rows * torch.outer(mean_x, mean_x),
                       torch.einsum("n,nij->ij", w, self.yy) - rows * torch.outer(mean_y, mean_y),
                       torch.einsum("n,nij->ij", w, self.xy) - rows * torch.outer(mean_x, mean_y))


def _spectrum(cov: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of a covariance, cut at its numerical rank."""
    eigvals, eigvecs = torch.linalg.eigh(cov)
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    top = float(eigvals[0]) if eigvals.numel() else 0.0
    rank = int((eigvals > top * cov.shape[0] * 1e-12).sum()) if top > 0 else 0
    if rank == 0:
        raise ValueError(f"{name} has no variance: every example has the same representation")
    return eigvals[:rank], eigvecs[:, :rank]


def _whitener(spectrum: tuple[torch.Tensor, torch.Tensor], keep: float | int | None) -> torch.Tensor:
    """``[d, k]`` map to whitened coordinates of the top-``k`` principal directions.

    ``keep``: a fraction of variance in (0, 1], a number of directions, or None for every
    direction above numerical rank.
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


def _cca(m: Moments, wx: torch.Tensor, wy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical correlations (descending) and the x-side canonical weights ``[d_x, k]``.

    The i-th canonical variate is ``h_i = x_centred @ a_i``, of unit norm over the examples.
    """
    p, rho, _ = torch.linalg.svd(wx.T @ m.xy @ wy, full_matrices=False)
    return rho.clamp(0.0, 1.0), wx @ p[:, :rho.numel()]


def cca_scores(m: Moments, methods: tuple[str, ...] = CCA_METHODS, keep: float | int | None = 0.99) -> dict[str, float]:
    """SVCCA (``keep`` as in :func:`svcca`) and/or PWCCA from precomputed moments.

    Both share one eigendecomposition per side, the costly step of every bootstrap replicate.
    """
    unknown = [method for method in methods if method not in CCA_METHODS]
    if unknown:
        raise ValueError(f"unknown CCA method {unknown[0]!r}; choose from {CCA_METHODS}")
    sx, sy = _spectrum(m.xx, "x"), _spectrum(m.yy, "y")
    scores = {}
    if "svcca" in methods:
        scores["svcca"] = float(_cca(m, _whitener(sx, keep), _whitener(sy, keep))[0].mean())
    if "pwcca" in methods:
        rho, a = _cca(m, _whitener(sx, None), _whitener(sy, None))
        # <h_i, x_j> = a_i^T x^T x_j: the weights need only the moments too.
        alpha = (a.T @ m.xx).abs().sum(1)
        scores["pwcca"] = float((alpha * rho).sum() / alpha.sum())
    return scores


def warn_if_overfit(n: int, dims: int) -> None:
    if dims * 10 > n:
        logger.warning("CCA on %d examples with up to %d canonical directions: expect correlations inflated "
                       "towards 1 (keep examples >> dimensions)", n, dims)


def canonical_correlations(x: Matrix, y: Matrix, keep: float | int | None = None) -> torch.Tensor:
    """All canonical correlations between ``x: [n, p]`` and ``y: [n, q]``, in descending order.

    ``keep`` truncates each side to its top principal directions first (see :func:`svcca`).
    """
    check_keep(keep)
    x, y = paired_matrices(x, y, 2)
    m = moments(x, y)
    rho = _cca(m, _whitener(_spectrum(m.xx, "x"), keep), _whitener(_spectrum(m.yy, "y"), keep))[0]
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
