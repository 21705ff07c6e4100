"""What decides a study's numbers: recorded in ``metrics.json`` and in every shard."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from surgery.similarity.stats import DEFAULT_GROUPS


@dataclass(frozen=True)
class Settings:
    """Settings of one study (every shard of a study must share them)."""

    images: int | None = 512  # held-out images (None: the whole held-out split)
    seed: int = 0  # draws the images
    batch_size: int = 32  # images per forward pass; also the unit of the jackknife groups
    groups: int = DEFAULT_GROUPS  # jackknife groups of batches
    deletion_images: int = 64  # images scored by deletion/insertion (2 (steps + 1) forwards each)
    deletion_steps: int = 8
    tolerance: int = 2  # pointing-game tolerance in pixels, next to the strict score
    top_fraction: float = 0.1  # IoU of the top 10% pixels of two maps
    match_images: int = 256  # images for the layer-matching check (all block pairs of two FP32 seeds)
    exemplars: int = 8  # compression-identified exemplars drawn per variant
    confidence: float = 0.95
    eval_samples: int | None = None  # shapes: generate this many held-out images (default: the family's)
    device: str | None = None  # None: $SURGERY_DEVICE, else auto (surgery.devices.resolve_device)
    data_root: str | None = None  # families other than shapes read their data here

    def validate(self) -> None:
        for name in ("batch_size", "groups", "deletion_steps", "match_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.images is not None and self.images < 4 * 2:
            raise ValueError(f"--images must be at least 8, got {self.images}")
        if self.groups < 2:
            raise ValueError("--groups must be at least 2 for an interval")
        if self.batch_size < 4:
            raise ValueError("--batch-size must be at least 4 (the unbiased HSIC of minibatch CKA needs 4 images)")
        if not 0 < self.confidence < 1:
            raise ValueError(f"--confidence must be in (0, 1), got {self.confidence}")

    def measured(self) -> dict:
        """The settings that change measured numbers (not where they are computed)."""
        return {k: v for k, v in asdict(self).items() if k not in ("device",)}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.measured(), sort_keys=True).encode()).hexdigest()[:16]
