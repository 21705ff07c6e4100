"""Where a pruned model's zeros go, and fine-tuning it without reviving them.

:func:`lamp_reallocate` moves a pruned model's zeros between its layers by LAMP scores (Lee et al.
2021, "Layer-adaptive Sparsity for the Magnitude-based Pruning", ICLR): a weight's score is its
squared magnitude over the sum of the squared magnitudes of the weights of its layer at least as
large, and the globally lowest scores are pruned. That spares each layer's largest weights, so
thin layers keep more of theirs than one global magnitude threshold would leave them, and wide
ones give up more than one level for every layer would take.

Once the masks are baked into the weights (:func:`surgery.compression.bake_sparsity`), a pruned
weight is an ordinary 0 that any gradient step would move. :func:`zeros_held` masks the gradients
of those weights instead of re-inserting NNCF's masks: with a zero gradient from the first step,
SGD (with momentum), Adam and AdamW all leave a zero weight exactly at zero (their moments stay 0
and decoupled weight decay scales the weight), so the sparsity pattern the refit was made for is the
one that is saved.

Example:
    >>> lamp_reallocate(sparse_model, fp32)          # the same number of zeros, LAMP's layers
    >>> with zeros_held(sparse_model):
    ...     fit(sparse_model, photos, recipe, ctx, seed=0, state_dir=None, desc="sparse50", teacher=fp32)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from surgery.compression import weight_layers


@contextmanager
def zeros_held(model: nn.Module) -> Iterator[int]:
    """Within the block, the gradient of every convolution or linear weight that is zero on entry is
    zero; yields how many weights are held."""
    handles, held = [], 0
    for module in weight_layers(model).values():
        mask = module.weight.detach() != 0
        if not bool(mask.all()):
            held += int((~mask).sum())
            handles.append(module.weight.register_hook(lambda grad, mask=mask: grad * mask))
    try:
        yield held
    finally:
        for handle in handles:
            handle.remove()


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score of every weight of one layer: ``w_i^2 / sum_{j: |w_j| >= |w_i|} w_j^2``, in the
    weight's shape (the largest weight scores 1)."""
    squared = weight.detach().double().flatten() ** 2
    ordered, order = squared.sort()
    tail = ordered.flip(0).cumsum(0).flip(0)  # the sum of every weight at least as large
    scores = torch.empty_like(squared)
    scores[order] = ordered / tail
    return scores.view_as(weight)


@torch.no_grad()
def lamp_reallocate(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    """Re-choose the zeros of ``model``'s pruned layers (those with a zero weight) from
    ``reference``'s weights (FP32, matched by name) by LAMP: as many zeros as ``model`` has over
    those layers, at the globally lowest scores; kept weights get ``reference``'s values. Layers
    with no zero stay as they are. Returns each pruned layer's new sparsity."""
    layers, originals = weight_layers(model), weight_layers(reference)
    pruned = {name: m for name, m in layers.items() if bool((m.weight == 0).any())}
    if not pruned:
        return {}
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.values())
    scores = {name: lamp_scores(originals[name].weight) for name in pruned}
    threshold = torch.cat([s.flatten() for s in scores.values()]).kthvalue(zeros).values
    sparsity = {}
    for name, layer in pruned.items():
        kept = scores[name] > threshold
        layer.weight.copy_(originals[name].weight * kept)
        sparsity[name] = 1 - float(kept.double().mean())
    return sparsity
