"""Datasets of the registered families, as ``(train, eval)`` pairs of image datasets in [0, 1].

- ``cifar10``: torchvision's CIFAR10 under ``root`` (downloaded there when ``download`` is set);
- ``imagenet``: an ImageFolder tree ``root/train/<wnid>/*`` and ``root/val/<wnid>/*``;
- ``shapes``: generated from the seed, with masks (:mod:`surgery.data.shapes`).

Normalisation is not applied here: it is the first operation of every model (see the registry).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from surgery.data.shapes import SHAPE_CLASSES, ShapesDataset, ShapesSpec

if TYPE_CHECKING:  # the registry imports the shapes class names from this package
    from surgery.registry import ModelFamily

logger = logging.getLogger(__name__)

__all__ = ["SHAPE_CLASSES", "ShapesDataset", "ShapesSpec", "build_datasets"]


def build_datasets(family: ModelFamily, root: str | Path | None = None, *, download: bool = False,
                   train_samples: int | None = None, eval_samples: int | None = None,
                   seed: int = 0) -> tuple[Dataset, Dataset]:
    """The family's training set (with augmentation) and held-out evaluation set.

    ``train_samples``/``eval_samples`` cap the sizes (a deterministic prefix of a fixed
    permutation for real datasets; the generated size for shapes).
    """
    if family.dataset == "shapes":
        size = family.input_size
        train = ShapesDataset(ShapesSpec("train", train_samples or family.train_samples, size, seed), progress=True)
        held_out = ShapesDataset(ShapesSpec("test", eval_samples or family.eval_samples, size, seed), progress=True)
        return train, held_out
    if root is None:
        raise ValueError(f"{family.name} needs --data-root pointing at the {family.dataset} data")
    if family.dataset == "cifar10":
        train, held_out = _cifar10(Path(root), family.input_size, download)
    elif family.dataset == "imagenet":
        train, held_out = _imagenet(Path(root), family)
    else:
        raise ValueError(f"unknown dataset {family.dataset!r}")
    return _cap(train, train_samples), _cap(held_out, eval_samples)


def _cifar10(root: Path, size: int, download: bool) -> tuple[Dataset, Dataset]:
    train_tf = transforms.Compose([transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor()])
    try:
        train = datasets.CIFAR10(str(root), train=True, transform=train_tf, download=download)
        held_out = datasets.CIFAR10(str(root), train=False, transform=transforms.ToTensor(), download=download)
    except RuntimeError as exc:
        raise FileNotFoundError(f"CIFAR-10 not found under {root} ({exc}); pass --download where "
                                "there is internet, or copy cifar-10-batches-py there") from None
    return train, held_out


def _imagenet(root: Path, family: ModelFamily) -> tuple[Dataset, Dataset]:
    size = family.input_size
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor()])
    eval_tf = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                  transforms.ToTensor()])
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"ImageNet folder {root / split} not found: expected "
                                    f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG")
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    held_out = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
    # Label i must mean class_names[i]: the wnid folders, sorted, are torchvision's class order.
    for ds in (train, held_out):
        if len(ds.classes) != family.num_classes:
            raise ValueError(f"{ds.root}: found {len(ds.classes)} class folders, {family.name} needs "
                             f"{family.num_classes} (one per ImageNet synset)")
    return train, held_out


def _cap(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    # A fixed permutation, so a capped run still sees every class.
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    logger.info("using %d of %d images", limit, len(dataset))
    return Subset(dataset, order.tolist())
