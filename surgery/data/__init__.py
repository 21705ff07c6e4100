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

__all__ = ["SHAPE_CLASSES", "ShapesDataset", "ShapesSpec", "build_dataset", "build_datasets", "offline_available"]


def offline_available(family: str | ModelFamily) -> bool:
    """Whether ``family``'s training data is on this machine without a download.

    Generated data (shapes) always is; CIFAR-10 and ImageNet need a download or a copy.
    The Space builds a zoo on the spot only for such families.

    Example:
        >>> offline_available("resnet18-shapes"), offline_available("resnet18-cifar10")
        (True, False)
    """
    from surgery.registry import get_family  # the registry imports this package

    spec = get_family(family) if isinstance(family, str) else family
    return spec.dataset == "shapes"


def build_dataset(family: ModelFamily, split: str, root: str | Path | None = None, *, download: bool = False,
                  samples: int | None = None, seed: int = 0) -> Dataset:
    """The family's ``"train"`` split (with augmentation) or held-out ``"eval"`` split.

    ``samples`` caps the size (a deterministic prefix of a fixed permutation for real datasets;
    the generated size for shapes, which come from ``seed``).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    train = split == "train"
    if family.dataset == "shapes":
        default = family.train_samples if train else family.eval_samples
        spec = ShapesSpec("train" if train else "test", samples or default, family.input_size, seed)
        return ShapesDataset(spec, progress=True)
    if root is None:
        raise ValueError(f"{family.name} needs --data-root pointing at the {family.dataset} data")
    if family.dataset == "cifar10":
        dataset = _cifar10(Path(root), family.input_size, train, download)
    elif family.dataset == "imagenet":
        dataset = _imagenet(Path(root), family, train)
    else:
        raise ValueError(f"unknown dataset {family.dataset!r}")
    return _cap(dataset, samples)


def build_datasets(family: ModelFamily, root: str | Path | None = None, *, download: bool = False,
                   train_samples: int | None = None, eval_samples: int | None = None,
                   seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(train, eval)``: both splits of :func:`build_dataset`."""
    return (build_dataset(family, "train", root, download=download, samples=train_samples, seed=seed),
            build_dataset(family, "eval", root, download=download, samples=eval_samples, seed=seed))


def _cifar10(root: Path, size: int, train: bool, download: bool) -> Dataset:
    transform = transforms.ToTensor()
    if train:
        transform = transforms.Compose([transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip(),
                                        transform])
    try:
        return datasets.CIFAR10(str(root), train=train, transform=transform, download=download)
    except RuntimeError as exc:
        raise FileNotFoundError(f"CIFAR-10 not found under {root} ({exc}); pass --download where "
                                "there is internet, or copy cifar-10-batches-py there") from None


def _imagenet(root: Path, family: ModelFamily, train: bool) -> Dataset:
    size = family.input_size
    if train:
        transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                        transforms.ToTensor()])
    else:
        transform = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                        transforms.ToTensor()])
    folder = root / ("train" if train else "val")
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet folder {folder} not found: expected "
                                f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG")
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    # Label i must mean class_names[i]: the wnid folders, sorted, are torchvision's class order.
    if len(dataset.classes) != family.num_classes:
        raise ValueError(f"{folder}: found {len(dataset.classes)} class folders, {family.name} needs "
                         f"{family.num_classes} (one per ImageNet synset)")
    return dataset


def _cap(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    # A fixed permutation, so a capped run still sees every class.
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    logger.info("using %d of %d images", limit, len(dataset))
    return Subset(dataset, order.tolist())
