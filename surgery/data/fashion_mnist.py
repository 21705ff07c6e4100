"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from the original ``*-idx*-ubyte.gz`` files, read in place.

Debian's ``dataset-fashion-mnist`` installs Zalando's four files under
``/usr/share/datasets/fashion-mnist/``; torchvision's ``FashionMNIST`` expects them uncompressed under
``ROOT/FashionMNIST/raw/``. :class:`FashionMNISTFiles` is torchvision's class reading the ``.gz``
files directly from a folder of its own (the Debian one by default), after checking each against
its MD5: nothing is copied or unpacked to disk. Debian recompressed Zalando's files (new gzip
headers), so their ``.gz`` MD5s differ from the ones torchvision records in
``FashionMNIST.resources``; a file passes when its ``.gz`` has torchvision's MD5 (as downloaded) or
its decompressed content has the MD5 of Zalando's uncompressed file (``PAYLOAD_MD5``).

Items are ``(image, label)`` with ``image`` a float tensor ``[3, 28, 28]`` in [0, 1]: the gray
image replicated to RGB, as every family takes RGB. Training items are augmented as in Zalando's
ResNet18 anchor (random 28x28 crop of the zero-padded image, horizontal flip), with 2 px of
padding instead of 4 (the CPU recipe trains two epochs only).

Example:
    >>> test = FashionMNISTFiles(train=False)          # the Debian files
    >>> image, label = test[0]
    >>> image.shape, test.classes[label], len(test)
    (torch.Size([3, 28, 28]), 'Ankle boot', 10000)
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

logger = logging.getLogger(__name__)

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = tuple(datasets.FashionMNIST.classes)
_PAD = 2  # random-crop padding: the anchor's 4 px costs accuracy in a 2-epoch schedule
_IDX_DTYPE = {0x08: np.uint8}  # the idx type code of both Fashion-MNIST tensors
# MD5s of Zalando's four files uncompressed (older torchvision releases and other loaders list the same).
PAYLOAD_MD5 = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}


def missing_message(root: Path) -> str:
    return (f"Fashion-MNIST not found under {root} (expected train-images-idx3-ubyte.gz and the three other "
            "original files): run `apt-get install dataset-fashion-mnist` (puts them under "
            f"{DEBIAN_ROOT}), pass --data-root pointing at a folder holding them, or pass --download "
            "where there is internet")


def find_files(root: str | Path | None = None) -> Path | None:
    """The folder holding the four ``.gz`` files: ``root`` itself or torchvision's ``root/FashionMNIST/raw``
    (``DEBIAN_ROOT`` when ``root`` is None); None when neither has them all."""
    root = Path(root) if root is not None else DEBIAN_ROOT
    for folder in (root, root / "FashionMNIST" / "raw"):
        if all((folder / name).is_file() for name, _ in datasets.FashionMNIST.resources):
            return folder
    return None


def verified_payload(path: Path, gz_md5: str) -> bytes:
    """The decompressed content of ``path`` after the integrity check (see the module docstring);
    raises ``ValueError`` naming the file when it fails."""
    raw = path.read_bytes()
    refused = (f"{path} fails the integrity check (neither its MD5 is torchvision's {gz_md5} nor its content "
               "Zalando's): the file is corrupt or not Fashion-MNIST; reinstall dataset-fashion-mnist or "
               "pass --download")
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error):
        raise ValueError(refused) from None
    if hashlib.md5(raw).hexdigest() != gz_md5 and hashlib.md5(data).hexdigest() != PAYLOAD_MD5[path.name]:
        raise ValueError(refused)
    return data


def parse_idx(data: bytes, path: Path) -> torch.Tensor:
    """An idx-format tensor (LeCun's MNIST format: big-endian magic, dims, then data)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPE:
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=_IDX_DTYPE[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {array.size} values for an idx tensor of shape {shape}")
    return torch.from_numpy(array.reshape(shape).copy())


class FashionMNISTFiles(datasets.FashionMNIST):
    """torchvision's ``FashionMNIST`` on the original ``.gz`` files of ``root`` (Debian's by default).

    ``download=True`` fetches them with torchvision into ``root/FashionMNIST/raw`` when they are not
    found. Raises ``FileNotFoundError`` naming the ways to get the data when they are missing, and
    ``ValueError`` naming the file whose MD5 differs from torchvision's.
    """

    def __init__(self, root: str | Path | None = None, train: bool = True, augment: bool = False,
                 download: bool = False) -> None:
        self.requested_root = Path(root) if root is not None else DEBIAN_ROOT
        self.files = find_files(self.requested_root)
        if self.files is None and download:
            self.files = self.requested_root / "FashionMNIST" / "raw"
        if self.files is None:
            raise FileNotFoundError(missing_message(self.requested_root))
        self.augment = augment
        # torchvision's constructor checks the files (our _check_exists) and loads them (our _load_data).
        super().__init__(str(self.requested_root), train=train, download=download)

    @property
    def raw_folder(self) -> str:
        return str(self.files)

    def _check_exists(self) -> bool:
        return all((self.files / name).is_file() for name, _ in self.resources)

    def _load_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = "train" if self.train else "t10k"
        data = {}
        for name, md5 in self.resources:
            if not name.startswith(prefix):
                continue
            path = self.files / name
            data["images" if "images" in name else "labels"] = parse_idx(verified_payload(path, md5), path)
        images, labels = data["images"], data["labels"].long()
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(f"{self.files}: {tuple(images.shape)} images for {len(labels)} labels")
        logger.info("Fashion-MNIST %s: %d images from %s", prefix, len(images), self.files)
        return images, labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.data[index]
        if self.augment:
            padded = torch.nn.functional.pad(image, (_PAD,) * 4)
            top, left = (int(v) for v in torch.randint(0, 2 * _PAD + 1, (2,)))
            image = padded[top:top + 28, left:left + 28]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image.float().div_(255).expand(3, -1, -1), int(self.targets[index])
