"""Linear centered kernel alignment (CKA), on full matrices and streamed over minibatches.

CKA (Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of Neural Network Representations
Revisited", ICML) compares two representations of the same examples, ``x: [n, p]`` and
``y: [n, q]``, through the Hilbert-Schmidt independence criterion (HSIC) of their linear kernels:

    CKA(x, y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),   K = x x^T,  L = y y^T.

It is invariant to orthogonal transforms and isotropic scaling of either side, and not to
arbitrary invertible linear maps, so it sees differences a whitening-based measure (CCA) hides.

The minibatch estimator (Nguyen, Raghu & Kornblith 2021, "Do Wide and Deep Networks Learn the
Same Things?", ICLR) averages the *unbiased* HSIC estimator (Song et al. 2012, "Feature Selection
via Dependence Maximization", JMLR) over minibatches, so memory is bounded by one batch while the
number of images grows; with one batch holding every image it equals debiased full CKA.

Example:
    >>> x = torch.randn(500, 64)
    >>> cka(x, x @ torch.linalg.qr(torch.randn(64, 64))[0])   # orthogonal map: 1.0
    >>> acc = MinibatchCKA()
    >>> for xb, yb in zip(x.split(100), (2 * x).split(100)):
    ...     acc.update(xb, yb)
    >>> acc.compute()   # tensor(1.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from surgery.similarity.stats import Jackknife

Matrix = torch.Tensor | np.ndarray


def as_matrix(x: Matrix, name: str) -> torch.Tensor:
    """``x`` as a float64 ``[n_examples, n_features]`` tensor; a clear error for anything else."""
    t = torch.as_tensor(x).detach()
    if t.dim() != 2:
        raise ValueError(f"{name} must be a [n_examples, n_features] matrix, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return t.to(torch.float64)


def paired_matrices(x: Matrix, y: Matrix, min_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two checked float64 matrices describing the same ``n >= min_examples`` examples."""
    x, y = as_matrix(x, "x"), as_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must describe the same examples: {x.shape[0]} rows vs {y.shape[0]}")
    if x.shape[0] < min_examples:
        raise ValueError(f"need at least {min_examples} examples, got {x.shape[0]}")
    return x, y.to(x.device)


def _products(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``||x^T y||^2, ||x^T x||^2, ||y^T y||^2`` through the cheaper of Gram or feature space.

    ``||x^T y||_F^2 = <x x^T, y y^T>``: with more features than examples the ``n x n`` Grams
    are smaller than the ``p x q`` cross-covariance, and each is computed once.
    """
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if n * n < max(p * q, p * p, q * q):
        k, l = x @ x.T, y @ y.T
        return (k * l).sum(), k.square().sum(), l.square().sum()
    return (x.T @ y).square().sum(), (x.T @ x).square().sum(), (y.T @ y).square().sum()


def _unbiased_hsic(cross: torch.Tensor, rows_x: torch.Tensor, rows_y: torch.Tensor, n: int) -> torch.Tensor:
    """Song et al.'s unbiased HSIC for column-centred features, up to the factor ``1 / (n (n - 3))``.

    ``cross`` is ``||x^T y||^2``, ``rows_*`` the squared row norms (the Gram diagonals). With
    centred columns ``1^T K = 0``, which reduces the estimator to these three terms.
    """
    sum_x, sum_y = rows_x.sum(-1), rows_y.sum(-1)
    return cross - n / (n - 2) * (rows_x * rows_y).sum(-1) + sum_x * sum_y / ((n - 1) * (n - 2))


CKA_ESTIMATORS = ("debiased", "biased")


def cka(x: Matrix, y: Matrix, estimator: str = "debiased") -> float:
    """Linear CKA of two representations of the same ``n`` examples (Kornblith et al. 2019).

    ``x: [n, p]`` and ``y: [n, q]``; rows are examples (flatten conv maps to ``C*H*W``).
    ``estimator="debiased"`` (the default, at least 4 examples) uses the unbiased HSIC estimator
    (Song et al. 2012): the plug-in ``"biased"`` one of Kornblith et al. rises towards 1 when
    features outnumber examples, even for unrelated representations. The debiased value may fall
    slightly below 0. Returns NaN when either side has no variance.

    Example:
        >>> x = torch.randn(256, 32)
        >>> cka(x, 3.0 * x)            # 1.0
        >>> cka(x, torch.randn(256, 32)) < 0.1
        True
        >>> cka(x, torch.randn(256, 32), estimator="biased")   # about 0.1: 32 features, 256 examples
    """
    if estimator not in CKA_ESTIMATORS:
        raise ValueError(f"unknown CKA estimator {estimator!r}; choose from {CKA_ESTIMATORS}")
    debiased = estimator == "debiased"
    x, y = paired_matrices(x, y, 4 if debiased else 2)
    x, y = x - x.mean(0), y - y.mean(0)
    n = x.shape[0]
    cross, self_x, self_y = _products(x, y)
    if debiased:
        rows_x, rows_y = x.square().sum(1), y.square().sum(1)
        cross = _unbiased_hsic(cross, rows_x, rows_y, n)
        self_x = _unbiased_hsic(self_x, rows_x, rows_x, n)
        self_y = _unbiased_hsic(self_y, rows_y, rows_y, n)
    return _ratio(cross, self_x, self_y)


def _ratio(cross: torch.Tensor, self_x: torch.Tensor, self_y: torch.Tensor) -> float:
    denominator = float(self_x) * float(self_y)
    return float(cross) / math.sqrt(denominator) if denominator > 0 else math.nan


class MinibatchCKA:
    """Streaming debiased linear CKA between several layers of two models (Nguyen et al. 2021).

    Each :meth:`update` takes one minibatch of the same images seen through ``I`` layers
    (``xs``) and ``J`` layers (``ys``), each ``[b, features]`` (or a single matrix), and stores
    the three unbiased HSIC values of every pair. :meth:`compute` returns

        CKA_ij = mean_k HSIC1(K_i^k, L_j^k) / sqrt(mean_k HSIC1(K_i^k, K_i^k) mean_k HSIC1(L_j^k, L_j^k))

    over the batches ``k``: memory is one ``b x b`` Gram matrix per layer plus three numbers per
    pair and batch, whatever the number of images.

    Interval (:meth:`jackknife`): the batches are dealt into ``G`` groups (batch ``k`` into group
    ``k % G``) and the CKA is recomputed without each group. Each batch's unbiased HSIC is a
    U-statistic over *distinct* images; resampling images with replacement would pair an image
    with itself inside a batch and bias it, while leaving whole batches out keeps every batch
    intact. Use at least ~10 batches for a meaningful interval.

    Example:
        >>> acc = MinibatchCKA()
        >>> for images, _ in loader:
        ...     acc.update([f(images) for f in layers_a], [g(images) for g in layers_b])
        >>> values = acc.compute()          # [I, J]
        >>> low, high = acc.jackknife(groups=16).interval()
    """

    def __init__(self) -> None:
        self._cross: list[torch.Tensor] = []  # per batch: [I, J]
        self._self_x: list[torch.Tensor] = []  # per batch: [I]
        self._self_y: list[torch.Tensor] = []  # per batch: [J]
        self._single = False
        self.num_examples = 0

    @property
    def num_batches(self) -> int:
        return len(self._cross)

    def update(self, xs: Matrix | Sequence[Matrix], ys: Matrix | Sequence[Matrix]) -> None:
        """Add one minibatch (at least 4 images: the unbiased estimator needs ``n - 3 > 0``)."""
        single = not isinstance(xs, (list, tuple)) and not isinstance(ys, (list, tuple))
        xs = [xs] if not isinstance(xs, (list, tuple)) else list(xs)
        ys = [ys] if not isinstance(ys, (list, tuple)) else list(ys)
        if self._cross and (len(xs), len(ys)) != tuple(self._cross[0].shape):
            raise ValueError(f"got {len(xs)} x {len(ys)} layers, earlier batches had {tuple(self._cross[0].shape)}")
        grams_x, rows_x = _centred_grams(xs, "xs")
        grams_y, rows_y = _centred_grams(ys, "ys")
        n = grams_x.shape[-1]
        if grams_y.shape[-1] != n:
            raise ValueError(f"xs and ys must hold the same images: {n} rows vs {grams_y.shape[-1]}")
        if n < 4:
            raise ValueError(f"a minibatch needs at least 4 images for the unbiased HSIC, got {n}")
        cross = torch.einsum("iab,jab->ij", grams_x, grams_y)
        self._cross.append(_unbiased_hsic(cross, rows_x[:, None], rows_y[None], n) / (n * (n - 3)))
        self._self_x.append(_unbiased_hsic(grams_x.square().sum((1, 2)), rows_x, rows_x, n) / (n * (n - 3)))
        self._self_y.append(_unbiased_hsic(grams_y.square().sum((1, 2)), rows_y, rows_y, n) / (n * (n - 3)))
        self._single = single
        self.num_examples += n

    def _stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._cross:
            raise ValueError("MinibatchCKA has seen no minibatch yet: call update() first")
        return (torch.stack(self._cross).numpy(), torch.stack(self._self_x).numpy(),
                torch.stack(self._self_y).numpy())

    def batch_values(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-batch unbiased HSIC values ``cross [B, I, J]``, ``self_x [B, I]``, ``self_y [B, J]``
        (what a shard of a study stores; :meth:`from_batch_values` restores the accumulator)."""
        return self._stacked()

    @classmethod
    def from_batch_values(cls, cross: np.ndarray, self_x: np.ndarray, self_y: np.ndarray,
                          num_examples: int) -> "MinibatchCKA":
        acc = cls()
        acc._cross = list(torch.from_numpy(np.asarray(cross, dtype=np.float64)))
        acc._self_x = list(torch.from_numpy(np.asarray(self_x, dtype=np.float64)))
        acc._self_y = list(torch.from_numpy(np.asarray(self_y, dtype=np.float64)))
        acc.num_examples = num_examples
        return acc

    def compute(self) -> torch.Tensor:
        """CKA ``[I, J]`` (a 0-d tensor when single matrices were passed); NaN where a layer is constant."""
        cross, self_x, self_y = self._stacked()
        values = torch.from_numpy(_cka_from_means(cross.mean(0), self_x.mean(0), self_y.mean(0)))
        return values[0, 0] if self._single else values

    def jackknife(self, groups: int | None = None) -> Jackknife:
        """CKA and its values without each group of batches (batch ``k`` in group ``k % groups``).

        ``groups`` defaults to one batch per group; fewer groups than batches pool them.
        """
        cross, self_x, self_y = self._stacked()
        batches = len(cross)
        groups = batches if groups is None else min(groups, batches)
        if groups < 1:
            raise ValueError(f"groups must be at least 1, got {groups}")
        member = np.arange(batches) % groups
        keep = (member[None, :] != np.arange(groups)[:, None]).astype(np.float64)  # [G, batches]
        keep /= keep.sum(1, keepdims=True).clip(min=1)
        means = [np.tensordot(keep, a, axes=1) for a in (cross, self_x, self_y)]
        value = _cka_from_means(cross.mean(0), self_x.mean(0), self_y.mean(0))
        leave_out = _cka_from_means(*means) if groups > 1 else np.full((1, *value.shape), np.nan)
        if self._single:
            value, leave_out = value[0, 0], leave_out[:, 0, 0]
        return Jackknife(value, leave_out, self.num_examples, "image")


def _centred_grams(features: list[Matrix], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrices ``[L, b, b]`` of batch-centred features and their diagonals ``[L, b]``.

    Centring within the batch leaves the unbiased HSIC unchanged (it is a U-statistic of
    differences) and avoids the cancellation that large uncentred ReLU activations cause.
    """
    grams = []
    for i, f in enumerate(features):
        f = torch.as_tensor(f).detach()
        f = f.reshape(f.shape[0], -1).to(torch.float64)
        if not torch.isfinite(f).all():
            raise ValueError(f"{name}[{i}] holds NaN or infinite values")
        f = f - f.mean(0)
        grams.append(f @ f.T)
    if len({g.shape for g in grams}) != 1:
        raise ValueError(f"all matrices in {name} must have the same number of images")
    grams = torch.stack(grams).cpu()
    return grams, grams.diagonal(dim1=1, dim2=2)


def _cka_from_means(cross: np.ndarray, self_x: np.ndarray, self_y: np.ndarray) -> np.ndarray:
    """``cross[..., I, J] / sqrt(self_x[..., I, None] self_y[..., None, J])``, NaN where not positive."""
    denominator = self_x[..., :, None] * self_y[..., None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, cross / np.sqrt(np.where(denominator > 0, denominator, 1.0)), np.nan)
