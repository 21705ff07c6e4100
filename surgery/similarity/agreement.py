"""Per-image agreement between two variants: their predictions and their attribution maps.

Every function returns one score per image (``[N]``), so :func:`surgery.similarity.stats.mean_ci`
turns it into an aggregate with a bootstrap interval over images. Scores that are undefined for
an image (a constant map has no ranking) are NaN and left out of the aggregate.

Example:
    >>> logits_fp32, logits_int8 = fp32(images), int8(images)
    >>> mean_ci(prediction_agreement(logits_fp32, logits_int8))
    >>> mean_ci(map_spearman(gradcam(fp32, images), gradcam(int8, images)))
"""

from __future__ import annotations

import torch


def _pair(a: torch.Tensor, b: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a).detach().cpu(), torch.as_tensor(b).detach().cpu()
    if a.shape != b.shape:
        raise ValueError(f"{what} of the two variants differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"{what} must have a leading image dimension, got shape {tuple(a.shape)}")
    return a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()


def prediction_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """1.0 where both variants predict the same top-1 class, else 0.0 (``[N]``)."""
    a, b = _pair(logits_a, logits_b, "logits")
    return (a.argmax(1) == b.argmax(1)).double()


def topk_overlap(logits_a: torch.Tensor, logits_b: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Share of the top-``k`` classes the two variants have in common, in [0, 1] (``[N]``)."""
    a, b = _pair(logits_a, logits_b, "logits")
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"k must be between 1 and the number of classes ({a.shape[1]}), got {k}")
    top_a, top_b = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return (top_a[:, :, None] == top_b[:, None, :]).any(2).double().mean(1)


def output_divergence(logits_reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL divergence, in nats, of a variant's softmax output from the reference's (``[N]``):
    ``sum_c p_ref(c) log(p_ref(c) / p(c))``, the loss distillation minimises (at temperature 1).
    Unlike agreement, it sees a change of confidence that leaves the top-1 class where it was, so
    it separates variants on a few hundred images where agreement ties."""
    ref, other = _pair(logits_reference, logits, "logits")
    log_ref, log_other = ref.log_softmax(1), other.log_softmax(1)
    return (log_ref.exp() * (log_ref - log_other)).sum(1)


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks along dim 1 with ties given their average rank (as Spearman's rho requires)."""
    ordered = v.sort(dim=1).values
    below = torch.searchsorted(ordered, v, side="left")
    upto = torch.searchsorted(ordered, v, side="right")
    return (below + upto - 1).double() / 2


def _constant(v: torch.Tensor) -> torch.Tensor:
    return v.amax(1) == v.amin(1)


def map_spearman(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation between two maps of each image (``[N]``, NaN if a map is constant).

    Rank-based, so it compares where each variant looks, not its scale: an INT8 map that is a
    monotone rescaling of the FP32 map scores 1. Ties (the zeros GradCAM's ReLU leaves) get
    average ranks.
    """
    a, b = _pair(maps_a, maps_b, "maps")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    rho = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))
    return torch.where(_constant(a) | _constant(b), torch.nan, rho)


def top_pixels(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean ``[N, P]`` mask of each flattened map's top ``fraction`` of pixels (ties by position)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = maps.reshape(maps.shape[0], -1)
    k = max(1, round(fraction * flat.shape[1]))
    # A stable sort makes the choice among tied pixels deterministic.
    order = flat.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)


def topk_iou(maps_a: torch.Tensor, maps_b: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Intersection over union of the two maps' top ``fraction`` of pixels (``[N]``, NaN if a map is constant)."""
    a, b = _pair(maps_a, maps_b, "maps")
    top_a, top_b = top_pixels(a, fraction), top_pixels(b, fraction)
    iou = (top_a & top_b).sum(1).double() / (top_a | top_b).sum(1).double()
    return torch.where(_constant(a) | _constant(b), torch.nan, iou)
