"""Datasets of the registered families, as ``(train, eval)`` pairs of image datasets in [0, 1].

- ``cifar10``: torchvision's CIFAR10 under ``root`` (downloaded there when ``download`` is set);
- ``imagenet``: an ImageFolder tree ``root/train/<wnid>/*`` and ``root/val/<wnid>/*`` (or class folders
  named by their ImageNet index, ``root/val/243/*``, for a subset of the classes); without a root,
  natural photos shipped inside installed packages (:mod:`surgery.data.photos`): augmented crops
  of the fitting photos to train on, fixed crops of the held-out photos to evaluate on, unlabelled;
- ``shapes``: generated from the seed, with masks (:mod:`surgery.data.shapes`);
- ``fashion-mnist``: Zalando's original files, Debian's by default (:mod:`surgery.data.fashion_mnist`).

Normalisation is not applied here: it is the first operation of every model (see the registry).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from surgery.data import fashion_mnist, photos
from surgery.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNISTFiles
from surgery.data.shapes import SHAPE_CLASSES, ShapesDataset, ShapesSpec

if TYPE_CHECKING:  # the registry imports the shapes class names from this package
    from surgery.registry import ModelFamily

logger = logging.getLogger(__name__)

__all__ = ["FASHION_MNIST_CLASSES", "IN_MEMORY", "SHAPE_CLASSES", "FashionMNISTFiles", "ShapesDataset",
           "ShapesSpec", "build_dataset", "build_datasets", "offline_available"]

# Datasets held in memory as tensors: data-loader worker processes would only copy them.
IN_MEMORY = frozenset({"shapes", "fashion-mnist"})


def offline_available(family: ModelFamily | str) -> bool:
    """Whether ``family``'s data is on this machine without a download: generated shapes always,
    Fashion-MNIST when Debian's ``dataset-fashion-mnist`` files are found, ImageNet families when
    the package photos are installed (they fit and evaluate on those), CIFAR-10 never.

    Example:
        >>> offline_available("resnet18-shapes")
        True
    """
    if isinstance(family, str):
        from surgery.registry import get_family  # the registry imports this package

        family = get_family(family)
    if family.dataset == "shapes":
        return True
    if family.dataset == "fashion-mnist":
        return fashion_mnist.find_files() is not None
    if family.dataset == "imagenet":
        return photos.available()
    return False


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
    if family.dataset == "fashion-mnist":  # Debian's files when no root is given
        return _cap(FashionMNISTFiles(root, train=train, augment=train, download=download), samples)
    if family.dataset == "imagenet" and root is None:
        if train:
            return photos.PhotoCrops(family.input_size, samples or family.train_samples or photos.FIT_SAMPLES)
        return _cap(photos.HeldOutCrops(family.input_size), samples)
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
    # Label i must mean class_names[i]: the wnid folders, sorted, are torchvision's class order;
    # folders named by class index say it themselves (any subset of the classes).
    if all(c.isdigit() and int(c) < family.num_classes for c in dataset.classes):
        dataset.samples = [(path, int(dataset.classes[t])) for path, t in dataset.samples]
        dataset.imgs = dataset.samples
        dataset.targets = [t for _, t in dataset.samples]
        dataset.class_to_idx = {c: int(c) for c in dataset.classes}
    elif len(dataset.classes) != family.num_classes:
        raise ValueError(f"{folder}: found {len(dataset.classes)} class folders, {family.name} needs "
                         f"{family.num_classes} (one per ImageNet synset), or folders named by class index "
                         f"0..{family.num_classes - 1} (e.g. {folder}/243/)")
    return dataset


def _cap(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    # A fixed permutation, so a capped run still sees every class.
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    logger.info("using %d of %d images", limit, len(dataset))
    return Subset(dataset, order.tolist())
