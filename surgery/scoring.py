"""Scoring attribution maps: against ground-truth object masks, and by their faithfulness to the model.

- Pointing game (Zhang, Bargal, Lin, Brandt, Shen & Sclaroff 2016, "Top-down Neural Attention by
  Excitation Backprop", ECCV): a hit when the map's maximum falls on the object mask (they allowed
  15 pixels of tolerance on PASCAL VOC and COCO images, a few hundred pixels a side).
- Energy inside the mask (Wang et al. 2020, "Score-CAM", CVPR workshops: the "energy-based
  pointing game"): the share of the map's positive mass that lies on the object.
- Deletion and insertion (Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for
  Explanation of Black-box Models", BMVC): remove the most important pixels first and watch the
  class probability fall (deletion, lower area under the curve is better), or reveal them first
  on a blurred image and watch it rise (insertion, higher is better).

All return one score per image (``[N]``), to aggregate with :func:`surgery.mean_ci`.

Example:
    >>> maps = surgery.gradcam(model, images, target=labels)
    >>> surgery.mean_ci(pointing_game(maps, masks))        # share of hits, with a 95% interval
    >>> curves = deletion_insertion(model, images, maps, labels)
    >>> curves.deletion_auc.mean(), curves.insertion_auc.mean()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn


def _maps_and_masks(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    maps, masks = torch.as_tensor(maps).detach().cpu(), torch.as_tensor(masks).detach().cpu()
    if maps.dim() != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps and masks must both be [N, H, W] of the same shape, got "
                         f"{tuple(maps.shape)} and {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise TypeError(f"masks must be boolean, got {masks.dtype}")
    if torch.isnan(maps).any():
        raise ValueError("maps hold NaN values")
    return maps.flatten(1).double(), masks.flatten(1)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """1.0 where the map's maximum lies on the object, 0.0 where it does not (``[N]``).

    ``tolerance``: a maximum within this many pixels (Euclidean) of the mask still counts, as
    in Zhang et al. (15 pixels on images of a few hundred pixels: about 2 on 64-pixel shapes);
    0, the default, asks for the maximum strictly inside the mask.
    Where several pixels share the maximum, the score is the share of them that hit: the
    expected hit of breaking the tie at random, so a constant map scores the (dilated) mask's
    area, i.e. chance.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative number of pixels, got {tolerance}")
    if tolerance:
        masks = dilate(torch.as_tensor(masks), tolerance)
    maps, masks = _maps_and_masks(maps, masks)
    at_max = maps == maps.amax(1, keepdim=True)
    return (at_max & masks).sum(1).double() / at_max.sum(1).double()


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow boolean masks ``[N, H, W]`` by every pixel within ``radius`` pixels (a disk)."""
    if masks.dtype != torch.bool or masks.dim() != 3:
        raise TypeError(f"masks must be boolean [N, H, W], got {masks.dtype} {tuple(masks.shape)}")
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2).float()[None, None]
    return F.conv2d(masks[:, None].float(), disk, padding=radius)[:, 0] > 0.5


def energy_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the map's positive mass inside the object mask, in [0, 1] (``[N]``).

    Negative values are clipped (they are evidence against the class, not location). A map with
    no positive mass is scored as uniform: the mask's area, i.e. chance.
    """
    maps, masks = _maps_and_masks(maps, masks)
    energy = maps.clamp(min=0)
    total = energy.sum(1)
    inside = (energy * masks).sum(1) / total.clamp(min=torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, inside, masks.double().mean(1))


@dataclass(frozen=True)
class DeletionInsertion:
    """Class-probability curves as the top pixels are deleted / inserted, and their areas."""

    fractions: torch.Tensor  # [steps + 1] share of pixels deleted or inserted, 0 .. 1
    deletion: torch.Tensor  # [N, steps + 1]
    insertion: torch.Tensor  # [N, steps + 1]

    @property
    def deletion_auc(self) -> torch.Tensor:
        """``[N]`` area under the deletion curve (lower: the map found what the model needs)."""
        return torch.trapezoid(self.deletion, self.fractions, dim=1)

    @property
    def insertion_auc(self) -> torch.Tensor:
        """``[N]`` area under the insertion curve (higher: the map found what the model needs)."""
        return torch.trapezoid(self.insertion, self.fractions, dim=1)


def blurred(images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """The insertion baseline of Petsiuk et al.: a heavy Gaussian blur of each image."""
    return TF.gaussian_blur(images, [kernel_size, kernel_size], [sigma, sigma])


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = _device(model)
    return torch.cat([model(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)])


def _probabilities(model: nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int) -> torch.Tensor:
    return _logits(model, images, batch_size).softmax(1).gather(1, target[:, None]).squeeze(1)


def deletion_insertion(model: nn.Module, images: torch.Tensor, maps: torch.Tensor,
                       target: torch.Tensor | None = None, steps: int = 16, batch_size: int = 128,
                       deletion_baseline: torch.Tensor | None = None,
                       insertion_baseline: torch.Tensor | None = None) -> DeletionInsertion:
    """Deletion and insertion curves of the softmax probability of ``target`` (Petsiuk et al. 2018).

    ``images: [N, 3, H, W]`` in the model's input range, ``maps: [N, H, W]``; ``target`` defaults
    to the model's prediction on the intact images. At step ``s`` of ``steps`` the
    ``s / steps`` most important pixels (by the map, ties by position) are replaced by the
    deletion baseline (default: zeros, i.e. black) or copied onto the insertion baseline
    (default: :func:`blurred`). Costs ``2 N (steps + 1)`` forward passes.

    Example:
        >>> curves = deletion_insertion(model, images, saliency(model, images), steps=16)
        >>> curves.insertion_auc.mean()
    """
    images = torch.as_tensor(images).detach().cpu().float()
    maps = torch.as_tensor(maps).detach().cpu()
    if images.dim() != 4 or maps.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"images must be [N, C, H, W] and maps [N, H, W] of the same N, H, W; got "
                         f"{tuple(images.shape)} and {tuple(maps.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    n, _, h, w = images.shape
    if target is None:
        target = _logits(model, images, batch_size).argmax(1)
    target = torch.as_tensor(target).cpu().long().reshape(n)
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    order = maps.reshape(n, -1).sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w).expand(n, -1))
    counts = (fractions * h * w).round().long()
    deletion_baseline = torch.zeros_like(images) if deletion_baseline is None else deletion_baseline.cpu()
    insertion_baseline = blurred(images) if insertion_baseline is None else insertion_baseline.cpu()
    # Every (curve, step, image) is one forward; they run in batches built on the fly, so memory
    # stays at one batch whatever the number of steps.
    total = (steps + 1) * n
    probs = []
    for start in range(0, 2 * total, batch_size):
        k = torch.arange(start, min(start + batch_size, 2 * total))
        curve, step, image = k // total, (k % total) // n, k % n
        revealed = (rank[image] < counts[step][:, None]).reshape(-1, 1, h, w).float()
        deleting = (curve == 0).float().reshape(-1, 1, 1, 1)
        original = images[image]
        # deletion: the top pixels become the baseline; insertion: they appear on the blurred image.
        start_image = deleting * original + (1 - deleting) * insertion_baseline[image]
        end_image = deleting * deletion_baseline[image] + (1 - deleting) * original
        probs.append(_probabilities(model, start_image * (1 - revealed) + end_image * revealed,
                                    target[image], len(k)))
    deletion, insertion = torch.cat(probs).reshape(2, steps + 1, n).permute(0, 2, 1).double()
    return DeletionInsertion(fractions, deletion, insertion)
