"""Example images: photos that ship inside installed packages, and held-out shapes images.

Nothing is downloaded. The photos are files inside scikit-image and scikit-learn; their licenses:

- scikit-image ``astronaut`` (Eileen Collins, NASA): public domain;
- scikit-image ``chelsea`` (the cat; Stefan van der Walt): CC0;
- scikit-image ``coffee`` (Rachel Michetti, courtesy of Pikolo Espresso Bar): CC0;
- scikit-image ``rocket`` (DSCOVR on Falcon 9, SpaceX): public domain;
- scikit-learn ``china.jpg`` and ``flower.jpg`` (danielbuechele, vultilion on Flickr): CC BY 2.0.

The shapes images are rendered from the ``test`` split of :mod:`surgery.data.shapes`, which
the shapes zoo never trains on.

Example:
    >>> paths = write_examples(Path("/tmp/examples"))
    >>> [p.name for p in paths][:2]
    ['astronaut.png', 'chelsea.png']
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from surgery.data.shapes import ShapesDataset, ShapesSpec
from surgery.images import decode_image, to_tensor
from surgery.registry import ModelFamily

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
SHAPES_EXAMPLES = 5  # one of each of the first classes; labels cycle through the classes
REFERENCE_SHAPES = 200
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


def write_examples(directory: Path) -> list[Path]:
    """Copy the photos and render the shapes examples into ``directory``; returns their paths.

    Photos missing from the installed packages are skipped with a warning, not an error: the
    Space still works without them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for photo in PHOTOS:
        source = photo_path(photo)
        if source is None:
            logger.warning("example photo %s not found in %s: skipped", photo.file, photo.package)
            continue
        target = directory / photo.file
        if not target.exists():
            shutil.copyfile(source, target)
        paths.append(target)
    for i, (name, pixels) in enumerate(shapes_images()):
        target = directory / f"shapes-{i}-{name}.png"
        if not target.exists():
            Image.fromarray(pixels).save(target)
        paths.append(target)
    return paths


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

    Shapes: the first held-out shapes images. Other families, whose data cannot be downloaded
    here: crops of the example photos at three scales (14 per photo).
    """
    size = family.input_size
    if family.dataset == "shapes":
        return ShapesDataset(ShapesSpec("test", REFERENCE_SHAPES, size, seed=0)).images.float() / 255
    crops = [to_tensor(crop) for photo in PHOTOS if (path := photo_path(photo)) is not None
             for crop in _grid_crops(decode_image(path, photo.file), size)]
    if not crops:
        raise ValueError(f"no reference images for {family.name}: the example photos are missing")
    return torch.stack(crops)
