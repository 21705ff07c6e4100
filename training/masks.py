"""Fine-tuning a pruned model without reviving its zeros.

Once the masks are baked into the weights (:func:`surgery.compression.bake_sparsity`), a pruned
weight is an ordinary 0 that any gradient step would move. :func:`zeros_held` masks the gradients
of those weights instead of re-inserting NNCF's masks: with a zero gradient from the first step,
SGD (with momentum), Adam and AdamW all leave a zero weight exactly at zero (their moments stay 0
and decoupled weight decay scales the weight), so the sparsity pattern the refit was made for is the
one that is saved.

Example:
    >>> with zeros_held(sparse_model):
    ...     fit(sparse_model, photos, recipe, ctx, seed=0, state_dir=None, desc="sparse50", teacher=fp32)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def zeros_held(model: nn.Module) -> Iterator[int]:
    """Within the block, the gradient of every convolution or linear weight that is zero on entry is
    zero; yields how many weights are held."""
    handles, held = [], 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            mask = module.weight.detach() != 0
            if not bool(mask.all()):
                held += int((~mask).sum())
                handles.append(module.weight.register_hook(lambda grad, mask=mask: grad * mask))
    try:
        yield held
    finally:
        for handle in handles:
            handle.remove()
