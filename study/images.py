"""The held-out images of a study, drawn once from the seed and streamed batch by batch.

Only the image *indices* are kept; each batch is read from the dataset when it is needed, so
memory is one batch of images whatever the number of images (shapes generates its held-out
split in memory, at about 49 KB an image: its own cost, not the study's).

Example:
    >>> data = held_out(get_family("resnet18-shapes"), Settings(images=256))
    >>> for start, images, labels, masks in data.batches(32): ...
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from study.settings import Settings
from surgery.data import ShapesDataset, build_dataset
from surgery.registry import ModelFamily


@dataclass(frozen=True)
class HeldOut:
    dataset: Dataset
    indices: np.ndarray  # dataset index of each image, in stream order (a seeded permutation)
    source: str

    @property
    def has_masks(self) -> bool:
        return isinstance(self.dataset, ShapesDataset)

    def __len__(self) -> int:
        return len(self.indices)

    def digest(self) -> str:
        return hashlib.sha256(self.indices.astype(np.int64).tobytes()).hexdigest()[:16]

    def take(self, positions: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images, labels and (shapes) masks at these stream positions."""
        idx = [int(self.indices[p]) for p in positions]
        items = [self.dataset[i] for i in idx]
        images = torch.stack([x for x, _ in items]) if items else torch.zeros(0)
        labels = torch.tensor([int(y) for _, y in items], dtype=torch.long)
        masks = self.dataset.masks[idx] if self.has_masks else None
        return images, labels, masks

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor | None]]:
        """``(first stream position, images, labels, masks)`` per batch, in stream order."""
        end = len(self) if limit is None else min(limit, len(self))
        for start in range(0, end, batch_size):
            yield (start, *self.take(range(start, min(start + batch_size, end))))


def held_out(family: ModelFamily, s: Settings, data_seed: int = 0) -> HeldOut:
    """``s.images`` images of the family's held-out split (all of it for None), in a seeded order."""
    ds = build_dataset(family, "eval", s.data_root, seed=data_seed, samples=s.eval_samples)
    count = len(ds) if s.images is None else s.images
    if count > len(ds):
        raise ValueError(f"asked for {count} images; the held-out split of {family.name} has {len(ds)} "
                         "(shapes: raise --eval-samples)")
    # A random order, not sorted: the jackknife groups (batches modulo G) are then random subsets.
    indices = np.random.default_rng(s.seed).permutation(len(ds))[:count]
    return HeldOut(ds, indices, f"{family.dataset} held-out split (data seed {data_seed}), {count} of {len(ds)} images")
