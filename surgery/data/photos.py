"""Natural photos that ship inside installed packages: ImageNet-class data without ImageNet.

An ImageNet classifier's compressed variants can be fitted to their FP32 model by distillation on
augmented crops of a handful of photos: Asano & Saeed, "The Augmented Image Prior: Distilling 1000
Classes by Extrapolating from a Single Image" (ICLR 2023), distil ImageNet classifiers from one
image. Here the photos are files inside scikit-image, scikit-learn and matplotlib (nothing is
downloaded), split once and for all into a FIT set, served as random augmented crops, and a
HELD-OUT set, served as a fixed, seeded set of crops for the figures that must not see the
fitting photos. Without labels, what the held-out crops measure is a variant's agreement with FP32.

The split (:data:`PHOTOS`, fixed; a test keeps the two sets apart):

- held-out: ``chelsea`` (a cat), ``coffee`` (an espresso), ``rocket`` (a launch), ``camera`` (a
  photographer with a tripod, gray) and matplotlib's ``grace_hopper``: photos whose FP32 answers
  are ImageNet classes (Egyptian cat, espresso, tripod, bow tie ...), so agreement on them is
  agreement about real objects;
- fit: the 17 other photos and textures: astronaut, Hubble deep field, the two stereo motorcycle
  views, immunohistochemistry, retina, China (a temple), a flower, a motion-blurred clock, coins,
  the moon, a scanned page, text, brick, grass, gravel, a cell, and the scikit-image logo.

Licences are in each :class:`Photo`'s ``licence``. A photo missing from its package (or the
package missing) is refused by name: a silently smaller set would change every figure.

Example:
    >>> fit = PhotoCrops(size=160, samples=1024)          # random crops, label UNLABELLED
    >>> image, label = fit[0]; image.shape, label
    (torch.Size([3, 160, 160]), -1)
    >>> held = HeldOutCrops(size=224)                      # the same pixels on every call
    >>> held.images.shape
    torch.Size([320, 3, 224, 224])
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from surgery.images import decode_image, to_tensor

logger = logging.getLogger(__name__)

FIT, HELD_OUT = "fit", "held-out"
UNLABELLED = -1  # the label photo crops carry: there is no ground truth, only the FP32 model's answer

# Augmentation of the fitting crops (the Augmented Image Prior's recipe, lighter): crops from 5% of
# a photo to all of it, flips, colour jitter. Small crops of a few photos are what stands in for
# ImageNet's variety of objects and scales.
FIT_SCALE = (0.05, 1.0)
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
# The held-out crops are natural views: the centre view torchvision evaluates (resize to 256/224
# of the size, centre crop), then random crops of 10% of the photo or more, flipped at random.
HELD_OUT_SCALE = (0.1, 1.0)
HELD_OUT_PER_PHOTO = 64
HELD_OUT_SEED = 0
FIT_SAMPLES = 10_240  # fitting crops an epoch, where the family sets no number (recipes truncate epochs)


@dataclass(frozen=True)
class Photo:
    """A photo file inside an installed package, its licence and which set it belongs to."""

    name: str
    package: str  # importable package holding the file
    file: str  # path inside the package
    licence: str
    split: str  # FIT or HELD_OUT

    @property
    def path(self) -> Path | None:
        """The file inside the installed package, or None where the package or the file is missing."""
        try:
            path = Path(str(resources.files(self.package) / self.file))
        except ModuleNotFoundError:
            return None
        return path if path.is_file() else None


_SKIMAGE, _SKLEARN, _MPL = "skimage.data", "sklearn.datasets.images", "matplotlib"
PHOTOS: tuple[Photo, ...] = (
    Photo("chelsea", _SKIMAGE, "chelsea.png", "CC0, Stefan van der Walt", HELD_OUT),
    Photo("coffee", _SKIMAGE, "coffee.png", "CC0, Rachel Michetti (Pikolo Espresso Bar)", HELD_OUT),
    Photo("rocket", _SKIMAGE, "rocket.jpg", "public domain, SpaceX", HELD_OUT),
    Photo("camera", _SKIMAGE, "camera.png", "CC0, Lav Varshney", HELD_OUT),
    Photo("grace_hopper", _MPL, "mpl-data/sample_data/grace_hopper.jpg",
          "matplotlib sample data (no licence stated; matplotlib's licence covers the package)", HELD_OUT),
    Photo("astronaut", _SKIMAGE, "astronaut.png", "public domain, NASA (Eileen Collins)", FIT),
    Photo("hubble_deep_field", _SKIMAGE, "hubble_deep_field.jpg", "public domain, NASA", FIT),
    Photo("motorcycle_left", _SKIMAGE, "motorcycle_left.png",
          "Middlebury 2014 stereo benchmark (Scharstein et al.), via scikit-image (BSD-3-Clause)", FIT),
    Photo("motorcycle_right", _SKIMAGE, "motorcycle_right.png",
          "Middlebury 2014 stereo benchmark (Scharstein et al.), via scikit-image (BSD-3-Clause)", FIT),
    Photo("immunohistochemistry", _SKIMAGE, "ihc.png", "no known copyright restrictions (CMMI)", FIT),
    Photo("retina", _SKIMAGE, "retina.jpg", "CC0, Mikael Haggstrom", FIT),
    Photo("china", _SKLEARN, "china.jpg", "CC BY 2.0, danielbuechele on Flickr", FIT),
    Photo("flower", _SKLEARN, "flower.jpg", "CC BY 2.0, vultilion on Flickr", FIT),
    Photo("clock", _SKIMAGE, "clock_motion.png", "public domain, Stefan van der Walt", FIT),
    Photo("coins", _SKIMAGE, "coins.png", "no known copyright restrictions (Brooklyn Museum)", FIT),
    Photo("moon", _SKIMAGE, "moon.png", "scikit-image sample data (BSD-3-Clause)", FIT),
    Photo("page", _SKIMAGE, "page.png", "scikit-image sample data (BSD-3-Clause)", FIT),
    Photo("text", _SKIMAGE, "text.png", "public domain (Wikipedia)", FIT),
    Photo("brick", _SKIMAGE, "brick.png", "CC0 (CC0Textures)", FIT),
    Photo("grass", _SKIMAGE, "grass.png", "CC0 (linolafett on DeviantArt)", FIT),
    Photo("gravel", _SKIMAGE, "gravel.png", "CC0 (CC0Textures)", FIT),
    Photo("cell", _SKIMAGE, "cell.png", "CC0, Paul Muller et al.", FIT),
    Photo("logo", _SKIMAGE, "logo.png", "scikit-image logo (BSD-3-Clause)", FIT),
)


def photos(split: str) -> tuple[Photo, ...]:
    """The photos of one set, FIT or HELD_OUT, in catalogue order."""
    if split not in (FIT, HELD_OUT):
        raise ValueError(f"split must be {FIT!r} or {HELD_OUT!r}, got {split!r}")
    return tuple(p for p in PHOTOS if p.split == split)


def available() -> bool:
    """Whether every photo of the catalogue is on this machine."""
    return all(p.path is not None for p in PHOTOS)


@functools.lru_cache(maxsize=None)
def load_photo(photo: Photo) -> Image.Image:
    """The decoded RGB photo (gray ones replicated, the logo over white); ``FileNotFoundError``
    naming the package to install when it is missing."""
    path = photo.path
    if path is None:
        raise FileNotFoundError(
            f"photo {photo.name!r} ({photo.file}) not found in the installed {photo.package.split('.')[0]}: "
            "the photo datasets need scikit-image, scikit-learn and matplotlib "
            "(pip install -r requirements.txt), or pass --data-root with an ImageNet folder")
    return decode_image(path, photo.name)


class PhotoCrops(Dataset):
    """Random augmented crops of the FIT photos, ``samples`` of them an epoch, each ``(image, UNLABELLED)``.

    Item ``i`` is a crop of photo ``i mod len(photos)`` (every photo equally often), drawn with
    torch's global random state like torchvision's own augmentations, so a seeded run repeats.
    """

    def __init__(self, size: int, samples: int, scale: tuple[float, float] = FIT_SCALE,
                 split: str = FIT) -> None:
        self.photos = [load_photo(p) for p in photos(split)]
        self.samples = samples
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=scale, antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(**JITTER),
        ])

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.samples:
            raise IndexError(index)
        return to_tensor(self.transform(self.photos[index % len(self.photos)])), UNLABELLED


class HeldOutCrops(Dataset):
    """A fixed set of crops of the HELD-OUT photos: for each photo its centre view, then
    ``per_photo - 1`` random crops (scale :data:`HELD_OUT_SCALE`, random flips), drawn from ``seed``.

    The pixels are a function of ``(size, per_photo, seed)`` alone: the random state of the caller
    is neither read nor changed. ``photo_index[i]`` says which photo crop ``i`` comes from (for
    statistics clustered by photo); labels are :data:`UNLABELLED`.
    """

    def __init__(self, size: int, per_photo: int = HELD_OUT_PER_PHOTO, seed: int = HELD_OUT_SEED) -> None:
        held_out = photos(HELD_OUT)
        centre = transforms.Compose([transforms.Resize(round(size * 256 / 224), antialias=True),
                                     transforms.CenterCrop(size)])
        random_view = transforms.Compose([transforms.RandomResizedCrop(size, scale=HELD_OUT_SCALE, antialias=True),
                                          transforms.RandomHorizontalFlip()])
        crops, index = [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i, photo in enumerate(held_out):
                image = load_photo(photo)
                views = [centre(image)] + [random_view(image) for _ in range(per_photo - 1)]
                crops += [torch.from_numpy(np.asarray(v, dtype=np.uint8).copy()) for v in views]
                index += [i] * per_photo
        self.names = tuple(p.name for p in held_out)
        self.images = torch.stack(crops).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, S, S]
        self.photo_index = torch.tensor(index)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float() / 255, UNLABELLED

