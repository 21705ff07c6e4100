"""Example images that fit each family: held-out images of its own data, photos only for photo families.

- ``shapes``: images rendered from the ``test`` split of :mod:`surgery.data.shapes`, which the
  shapes zoo never trains on, labelled with their true class;
- ``fashion-mnist``: the first test image of each class (Zalando's, from Debian's files), at
  28x28 as the model reads them, labelled with their true class;
- families trained on natural photos (CIFAR-10, ImageNet): photos.

Nothing is downloaded. The photos are files inside scikit-image and scikit-learn; their licenses:

- scikit-image ``astronaut`` (Eileen Collins, NASA): public domain;
- scikit-image ``chelsea`` (the cat; Stefan van der Walt): CC0;
- scikit-image ``coffee`` (Rachel Michetti, courtesy of Pikolo Espresso Bar): CC0;
- scikit-image ``rocket`` (DSCOVR on Falcon 9, SpaceX): public domain;
- scikit-learn ``china.jpg`` and ``flower.jpg`` (danielbuechele, vultilion on Flickr): CC BY 2.0.

Example:
    >>> examples = write_examples(Path("/tmp/examples"), ["resnet18-fashionmnist", "resnet18-cifar10"])
    >>> [e.label for e in examples["resnet18-fashionmnist"]][:2]
    ['T-shirt/top', 'Trouser']
    >>> examples["resnet18-cifar10"][1].path.name
    'chelsea.png'
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from surgery.data.fashion_mnist import FashionMNISTFiles
from surgery.data.shapes import ShapesDataset, ShapesSpec
from surgery.images import decode_image, to_tensor
from surgery.registry import ModelFamily, get_family

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Photo:
    package: str  # where the file lies, as an importable package
    file: str
    credit: str


PHOTOS = (
    Photo("skimage.data", "astronaut.png", "Eileen Collins, NASA (public domain), via scikit-image"),
    Photo("skimage.data", "chelsea.png", "Stefan van der Walt (CC0), via scikit-image"),
    Photo("skimage.data", "coffee.png", "Rachel Michetti (CC0), via scikit-image"),
    Photo("skimage.data", "rocket.jpg", "SpaceX (public domain), via scikit-image"),
    Photo("sklearn.datasets.images", "china.jpg", "danielbuechele on Flickr (CC BY 2.0), via scikit-learn"),
    Photo("sklearn.datasets.images", "flower.jpg", "vultilion on Flickr (CC BY 2.0), via scikit-learn"),
)
SHAPES_EXAMPLES = 10  # one of each class; labels cycle through the classes
REFERENCE_SHAPES = 200
REFERENCE_FASHION = 200  # the first held-out Fashion-MNIST images (all classes, ~20 each)
PHOTO_DATASETS = ("cifar10", "imagenet")  # families trained on natural photos


@dataclass(frozen=True)
class Example:
    """One example image file and what the page calls it (its true class, or the photo's name)."""

    path: Path
    label: str
PHOTO_GRIDS = (1, 2, 3)  # crops per photo: the whole centre square, then 2x2 and 3x3 grids


def photo_path(photo: Photo) -> Path | None:
    """The photo's file inside its installed package, or None where the package lacks it."""
    try:
        path = Path(str(resources.files(photo.package) / photo.file))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


def shapes_images(n: int = SHAPES_EXAMPLES, size: int = 64) -> list[tuple[str, np.ndarray]]:
    """``(class name, HxWx3 uint8)`` for the first ``n`` held-out shapes images."""
    ds = ShapesDataset(ShapesSpec("test", n, size, seed=0))
    return [(ds.classes[int(ds.labels[i])], ds.images[i].permute(1, 2, 0).numpy()) for i in range(n)]


def _write_photos(directory: Path) -> list[Example]:
    """Copy the packaged photos; those missing from the installed packages are skipped with a
    warning, not an error: the Space still works without them."""
    examples = []
    for photo in PHOTOS:
        source = photo_path(photo)
        if source is None:
            logger.warning("example photo %s not found in %s: skipped", photo.file, photo.package)
            continue
        target = directory / photo.file
        if not target.exists():
            shutil.copyfile(source, target)
        examples.append(Example(target, target.stem))
    return examples


def _write_shapes(directory: Path, size: int) -> list[Example]:
    examples = []
    for i, (name, pixels) in enumerate(shapes_images(size=size)):
        target = directory / f"shapes-{i}-{name}.png"
        if not target.exists():
            Image.fromarray(pixels).save(target)
        examples.append(Example(target, name))
    return examples


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _write_fashion(directory: Path) -> list[Example]:
    """The first test image of each class, as 28x28 gray PNGs: what the model reads, pixel for pixel."""
    test = FashionMNISTFiles(train=False)
    examples = []
    for c, name in enumerate(test.classes):
        index = int((test.targets == c).nonzero()[0])
        target = directory / f"fashion-mnist-test{index:05d}-{_slug(name)}.png"
        if not target.exists():
            Image.fromarray(test.data[index].numpy(), mode="L").save(target)
        examples.append(Example(target, name))
    return examples


def family_examples(family: ModelFamily, directory: Path) -> list[Example]:
    """The examples that fit ``family``, written into ``directory`` (see the module docstring).

    Raises ``FileNotFoundError`` for Fashion-MNIST without its files (the family cannot be built
    or served without them either), ``ValueError`` for a dataset with no examples.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if family.dataset == "shapes":
        return _write_shapes(directory, family.input_size)
    if family.dataset == "fashion-mnist":
        return _write_fashion(directory)
    if family.dataset in PHOTO_DATASETS:
        return _write_photos(directory)
    raise ValueError(f"no example images for the {family.dataset} dataset of {family.name}")


def write_examples(directory: Path, families: Iterable[str]) -> dict[str, list[Example]]:
    """Each family's examples (:func:`family_examples`), by family name."""
    return {name: family_examples(get_family(name), directory) for name in families}


def _grid_crops(image: Image.Image, size: int) -> list[Image.Image]:
    """Overlapping square crops on k x k grids, each resized to ``size``: views at several scales."""
    w, h = image.size
    crops = []
    for k in PHOTO_GRIDS:
        side = min(w, h) if k == 1 else round(min(w, h) * 1.5 / k)
        for i in range(k):
            for j in range(k):
                left = round((w - side) * (j / (k - 1) if k > 1 else 0.5))
                top = round((h - side) * (i / (k - 1) if k > 1 else 0.5))
                crops.append(image.resize((size, size), Image.Resampling.BICUBIC,
                                          box=(left, top, left + side, top + side)))
    return crops


def reference_images(family: ModelFamily) -> torch.Tensor:
    """A fixed image set ``[n, 3, S, S]`` in [0, 1] on which the Representations tab compares models.

    Shapes and Fashion-MNIST: their first held-out images. Other families, whose data cannot be
    downloaded here: crops of the example photos at three scales (14 per photo).
    """
    size = family.input_size
    if family.dataset == "shapes":
        return ShapesDataset(ShapesSpec("test", REFERENCE_SHAPES, size, seed=0)).images.float() / 255
    if family.dataset == "fashion-mnist":
        test = FashionMNISTFiles(train=False)
        return torch.stack([test[i][0] for i in range(REFERENCE_FASHION)])
    crops = [to_tensor(crop) for photo in PHOTOS if (path := photo_path(photo)) is not None
             for crop in _grid_crops(decode_image(path, photo.file), size)]
    if not crops:
        raise ValueError(f"no reference images for {family.name}: the example photos are missing")
    return torch.stack(crops)
