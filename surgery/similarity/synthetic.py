"""Gaussian representations whose population CKA, SVCCA and PWCCA are known in closed form.

Used to measure whether the intervals of :mod:`surgery.similarity.stats` cover the population
value at their nominal rate (``tests/test_coverage.py``, ``bench/bench_coverage.py``).

Model: every image has ``positions`` rows (the spatial positions of a conv map). A row is

    x = s * (sqrt(c) z_image + sqrt(1 - c) z_row),       y = a * x + sigma * (sqrt(c) e_image + sqrt(1 - c) e_row)

with independent standard normal ``z``, ``e`` and per-feature scales ``s`` and gains ``a``
(``p = q`` features). Rows of one image are correlated (``c``), as positions of one image are,
so an interval that treated rows as independent would be too narrow; images are independent.
With diagonal covariances the canonical directions are the coordinate axes:

- canonical correlations ``rho_i = a_i s_i / sqrt(a_i^2 s_i^2 + sigma^2)``;
- SVCCA (every direction kept, see :func:`svcca_keeps_all`) = ``mean_i rho_i``;
- PWCCA: the canonical variate ``u_i = x_i / s_i`` has ``Cov(u_i, x_j) = s_i [i = j]``, so
  ``alpha_i = s_i`` and PWCCA = ``sum_i s_i rho_i / sum_i s_i``;
- linear CKA of the rows = ``sum a_i^2 s_i^4 / sqrt(sum s_i^4 * sum (a_i^2 s_i^2 + sigma^2)^2)``;
  flattening each image's positions into one row (as CKA on conv maps does) multiplies every
  covariance by the same Kronecker factor, which cancels: the value is the same.

Example:
    >>> model = SyntheticPair()
    >>> x, y = model.sample(200, seed=0)          # [200, positions, p] each
    >>> model.svcca, model.pwcca, model.cka
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SyntheticPair:
    """Parameters of the model in the module docstring; properties give the population values."""

    scales: tuple[float, ...] = (2.0, 1.4, 1.0, 0.7)
    gains: tuple[float, ...] = (1.5, 1.0, 0.6, 0.35)
    noise: float = 1.0
    positions: int = 4
    within_image: float = 0.5  # correlation of the rows of one image

    @property
    def rho(self) -> np.ndarray:
        s, a = np.array(self.scales), np.array(self.gains)
        return a * s / np.sqrt(a ** 2 * s ** 2 + self.noise ** 2)

    @property
    def svcca(self) -> float:
        return float(self.rho.mean())

    @property
    def pwcca(self) -> float:
        s = np.array(self.scales)
        return float((s * self.rho).sum() / s.sum())

    @property
    def cka(self) -> float:
        s, a = np.array(self.scales), np.array(self.gains)
        cross = (a ** 2 * s ** 4).sum()
        return float(cross / np.sqrt((s ** 4).sum() * ((a ** 2 * s ** 2 + self.noise ** 2) ** 2).sum()))

    def svcca_keeps_all(self, keep: float = 0.99) -> bool:
        """Whether every population direction of both sides carries more than ``1 - keep`` of the variance."""
        s, a = np.array(self.scales), np.array(self.gains)
        vx, vy = s ** 2, a ** 2 * s ** 2 + self.noise ** 2
        return bool(vx.min() / vx.sum() > 1 - keep and vy.min() / vy.sum() > 1 - keep)

    def sample(self, images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x, y: [images, positions, p]`` float64."""
        g = torch.Generator().manual_seed(seed)
        p, c = len(self.scales), self.within_image

        def correlated() -> torch.Tensor:
            shared = torch.randn(images, 1, p, generator=g, dtype=torch.float64)
            own = torch.randn(images, self.positions, p, generator=g, dtype=torch.float64)
            return c ** 0.5 * shared + (1 - c) ** 0.5 * own

        s = torch.tensor(self.scales, dtype=torch.float64)
        a = torch.tensor(self.gains, dtype=torch.float64)
        x = s * correlated()
        return x, a * x + self.noise * correlated()


@dataclass(frozen=True)
class SpectrumPair:
    """Many channels with a power-law spectrum, as conv layers have: the report's regime for CCA.

    ``x_i = s_i u_i`` and ``y_i = a_i x_i + r s_i v_i`` per channel ``i`` (``u``, ``v`` correlated
    across the ``positions`` rows of an image as in :class:`SyntheticPair`), with scales
    ``s_i = (1 + i)^-decay`` and gains ``a_i = gain * exp(-i / reach)``. Both sides' variances fall
    with ``i``, so each side's top-``k`` principal directions are the first ``k`` channels, and:

    - canonical correlations ``rho_i = a_i / sqrt(a_i^2 + r^2)`` (falling with ``i``);
    - SVCCA keeping ``k_x``, ``k_y`` directions = ``mean(rho[:min(k_x, k_y)])`` (:meth:`svcca`);
    - PWCCA of the first ``k`` directions = ``sum s_i rho_i / sum s_i`` over them (:meth:`pwcca`;
      ``Cov(u_i, x_j) = s_i [i = j]`` as in :class:`SyntheticPair`), and with variance weights
      ``sum_j <h_i, x_j>^2 = s_i^2`` (``weights="variance"``) ``sum s_i^2 rho_i / sum s_i^2``.

    Example:
        >>> model = SpectrumPair()                # 512 channels, 16 positions per image
        >>> x, y = model.sample(256, seed=0)      # 4,096 rows: 8 per direction
    """

    channels: int = 512
    positions: int = 16
    decay: float = 0.8
    gain: float = 1.5
    reach: float = 150.0
    noise: float = 0.8
    within_image: float = 0.3

    @property
    def scales(self) -> np.ndarray:
        return (1.0 + np.arange(self.channels)) ** -self.decay

    @property
    def rho(self) -> np.ndarray:
        a = self.gain * np.exp(-np.arange(self.channels) / self.reach)
        return a / np.sqrt(a ** 2 + self.noise ** 2)

    def svcca(self, kept: tuple[int, int]) -> float:
        return float(self.rho[: min(kept)].mean())

    def pwcca(self, kept: tuple[int, int] | None = None, weights: str = "l1") -> float:
        """``weights``: ``"l1"`` (Morcos et al.) or ``"variance"``, as in :func:`surgery.similarity.cca.cca_scores`."""
        k = self.channels if kept is None else min(kept)
        s = self.scales[:k] ** (1 if weights == "l1" else 2)
        return float((s * self.rho[:k]).sum() / s.sum())

    def sample(self, images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x, y: [images, positions, channels]`` float64."""
        g = torch.Generator().manual_seed(seed)
        c = self.within_image

        def correlated() -> torch.Tensor:
            shared = torch.randn(images, 1, self.channels, generator=g, dtype=torch.float64)
            own = torch.randn(images, self.positions, self.channels, generator=g, dtype=torch.float64)
            return c ** 0.5 * shared + (1 - c) ** 0.5 * own

        s = torch.from_numpy(self.scales)
        a = torch.from_numpy(self.gain * np.exp(-np.arange(self.channels) / self.reach))
        x = s * correlated()
        return x, a * x + self.noise * s * correlated()
