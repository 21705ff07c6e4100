"""Scoring maps against ground-truth masks and by deletion/insertion, on synthetic and real models."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import surgery
from surgery.attribution import gradcam
from surgery.data import ShapesDataset, ShapesSpec
from surgery.scoring import deletion_insertion, dilate, energy_in_mask, pointing_game

logger = logging.getLogger(__name__)


def _square_masks(n: int = 4, size: int = 16) -> torch.Tensor:
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[:, 4:8, 4:8] = True
    return masks


def test_pointing_game_hits_misses_ties_and_tolerance():
    masks = _square_masks()
    maps = torch.zeros(4, 16, 16)
    maps[0, 5, 5] = 1.0  # inside
    maps[1, 12, 12] = 1.0  # far outside
    maps[2, 5, 8] = 1.0  # just right of the mask (columns 4 to 7): one pixel away
    # maps[3] stays constant: every pixel ties for the maximum
    scores = pointing_game(maps, masks)
    assert scores[:3].tolist() == [1.0, 0.0, 0.0]
    assert scores[3] == pytest.approx(16 / 256)  # chance: the mask's area
    tolerant = pointing_game(maps, masks, tolerance=1)
    assert tolerant[:3].tolist() == [1.0, 0.0, 1.0]
    assert dilate(masks, 1)[0].sum() == 16 + 4 * 4  # a disk of radius 1 grows each side by one pixel
    with pytest.raises(ValueError, match="same shape"):
        pointing_game(maps[:, :8], masks)
    with pytest.raises(TypeError, match="boolean"):
        pointing_game(maps, masks.float())


def test_energy_in_mask():
    masks = _square_masks()
    maps = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(energy_in_mask(masks.float(), masks), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(energy_in_mask(-maps, masks), torch.full((4,), 16 / 256, dtype=torch.float64))
    half = masks.float() + (~masks).float() * 16 / 240  # equal mass inside and outside
    assert torch.allclose(energy_in_mask(half, masks), torch.full((4,), 0.5, dtype=torch.float64))


class RegionDetector(nn.Module):
    """A real model whose class-0 logit says whether the top-left quarter of the image is bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = 40 * (x[:, :, :8, :8].mean(dim=(1, 2, 3)) - 0.8)
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


def test_deletion_and_insertion_reward_the_map_that_finds_the_evidence():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 16, 16, generator=g) * 0.3
    images[:, :, :8, :8] = 1.0
    good = torch.zeros(6, 16, 16)
    good[:, :8, :8] = 1.0
    good += 0.01 * torch.rand(6, 16, 16, generator=g)
    model, target = RegionDetector(), torch.zeros(6, dtype=torch.long)
    right = deletion_insertion(model, images, good, target, steps=8, batch_size=7)
    wrong = deletion_insertion(model, images, -good, target, steps=8, batch_size=7)
    assert right.deletion.shape == (6, 9) and right.fractions[-1] == 1.0
    assert torch.all(right.deletion_auc < wrong.deletion_auc - 0.3)
    assert torch.all(right.insertion_auc > wrong.insertion_auc + 0.3)
    # Deletion starts from the intact image, insertion ends on it, whatever the map.
    assert torch.allclose(right.deletion[:, 0], wrong.deletion[:, 0])
    assert torch.allclose(right.insertion[:, -1], right.deletion[:, 0])
    # The batch size only changes how the forwards are grouped, not the result.
    assert torch.allclose(deletion_insertion(model, images, good, target, steps=8, batch_size=64).deletion,
                          right.deletion)
    with pytest.raises(ValueError, match="same N, H, W"):
        deletion_insertion(model, images, good[:, :8], target)


def test_fp32_gradcam_peak_falls_inside_the_object_on_held_out_shapes(shapes_zoo):
    """Issue 4: on the shapes family, the FP32 GradCAM peak lies strictly inside the object mask on
    at least 80% of held-out images; here on 1,000 of them. Measured with the shapes recipe of 640
    steps (README), seeds 0/1/2: 0.869/0.860/0.896 where FP32 trains under bfloat16 autocast (Xeon
    with AMX), 0.898/0.870/0.890 where it trains in FP32 (the same CPU limited to AVX2); the lowest
    sits 5 standard errors above the floor."""
    model, config = surgery.load_variant(shapes_zoo / "fp32")
    family = surgery.get_family(config["family"])
    ds = ShapesDataset(ShapesSpec("test", 1000, family.input_size, config["recipe"].get("seed", 0)))
    images = ds.images.float() / 255
    maps = torch.cat([gradcam(model, x, target=y) for x, y in zip(images.split(100), ds.labels.split(100))])
    scores = pointing_game(maps, ds.masks)
    hits = surgery.mean_ci(scores, seed=0)
    per_class = {name: round(float(scores[ds.labels == c].mean()), 3) for c, name in enumerate(ds.classes)}
    logger.info("FP32 GradCAM pointing game %s; per class %s", hits, per_class)
    assert hits.value >= 0.8, f"pointing game {hits}; per class {per_class}"
