"""The package photos: a fixed split kept apart, deterministic held-out crops, seeded fitting crops,
and what ``build_dataset`` serves an ImageNet family with and without ``--data-root``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from surgery.data import build_dataset, offline_available, photos
from surgery.data.photos import FIT, HELD_OUT, UNLABELLED, HeldOutCrops, PhotoCrops
from surgery.registry import get_family

IMAGENET = get_family("resnet50-imagenet")


def _pixels(photo: photos.Photo) -> bytes:
    return np.asarray(photos.load_photo(photo)).tobytes()


def test_the_split_keeps_fitting_and_held_out_photos_apart():
    fit, held = photos.photos(FIT), photos.photos(HELD_OUT)
    assert len(held) >= 4 and len(fit) >= 12
    assert {p.name for p in fit}.isdisjoint(p.name for p in held)
    assert {p.path for p in fit}.isdisjoint(p.path for p in held), "no file is in both sets"
    # Not the same picture under two names either (the stereo pair's two views are both fitting photos).
    assert {_pixels(p) for p in fit}.isdisjoint(_pixels(p) for p in held)
    assert all(p.licence for p in photos.PHOTOS)


def test_every_photo_ships_in_the_installed_packages_and_decodes_to_rgb():
    assert photos.available()
    for photo in photos.PHOTOS:
        image = photos.load_photo(photo)
        assert image.mode == "RGB" and min(image.size) >= 170, photo.name


def test_held_out_crops_are_the_same_pixels_whatever_the_random_state():
    torch.manual_seed(123)
    first = HeldOutCrops(64, per_photo=6)
    torch.manual_seed(456)
    torch.rand(10)
    second = HeldOutCrops(64, per_photo=6)
    assert torch.equal(first.images, second.images)
    assert first.images.dtype == torch.uint8 and first.images.shape == (6 * len(photos.photos(HELD_OUT)), 3, 64, 64)
    before = torch.get_rng_state()
    HeldOutCrops(32, per_photo=2)
    assert torch.equal(torch.get_rng_state(), before), "building the crops must not consume the caller's randomness"
    assert not torch.equal(HeldOutCrops(64, per_photo=6, seed=1).images, first.images), "the seed picks the crops"
    # Each photo contributes its block of crops, and the crops of one photo differ from each other.
    assert first.photo_index.tolist() == [i for i in range(len(first.names)) for _ in range(6)]
    block = first.images[:6].flatten(1).float()
    assert torch.cdist(block, block)[~torch.eye(6, dtype=torch.bool)].min() > 0


def test_held_out_crops_come_from_the_held_out_photos_only():
    crops = HeldOutCrops(48, per_photo=1)  # the centre view of each photo
    held = photos.photos(HELD_OUT)
    assert crops.names == tuple(p.name for p in held)
    views = []
    for photo in held:
        image = photos.load_photo(photo)
        side = round(min(image.size) * 224 / 256)  # torchvision's evaluation view: resize to 256/224, crop
        left, top = (image.width - side) // 2, (image.height - side) // 2
        views.append(np.asarray(image.crop((left, top, left + side, top + side)).resize((48, 48)), dtype=np.float32))
    got = crops.images.permute(0, 2, 3, 1).numpy().astype(np.float32)
    error = np.abs(got[:, None] - np.stack(views)[None]).mean(axis=(2, 3, 4))  # crop x photo
    assert (error.argmin(axis=1) == np.arange(len(held))).all(), "each centre view matches its own photo"
    off_diagonal = error[~np.eye(len(held), dtype=bool)]
    assert error.diagonal().max() < off_diagonal.min() / 4  # the same view up to resampling; the others far
    image, label = crops[0]
    assert label == UNLABELLED and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1


def test_fitting_crops_are_augmented_seeded_and_cover_every_fitting_photo():
    fit = photos.photos(FIT)
    crops = PhotoCrops(64, samples=2 * len(fit))
    torch.manual_seed(0)
    a = torch.stack([crops[i][0] for i in range(len(crops))])
    torch.manual_seed(0)
    b = torch.stack([crops[i][0] for i in range(len(crops))])
    torch.manual_seed(1)
    c = torch.stack([crops[i][0] for i in range(len(crops))])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2 * len(fit), 3, 64, 64) and crops[0][1] == UNLABELLED
    # The same photo gives a different crop each time it is drawn: augmentation, not a fixed set.
    assert not torch.equal(a[0], a[len(fit)])
    with pytest.raises(IndexError):
        crops[len(crops)]


def test_build_dataset_serves_photos_to_an_imagenet_family_without_a_data_root():
    assert offline_available(IMAGENET)
    small = dataclasses.replace(IMAGENET, input_size=32, train_samples=40)
    train, held = build_dataset(small, "train"), build_dataset(small, "eval", samples=12)
    assert isinstance(train, PhotoCrops) and len(train) == 40 and train[0][0].shape == (3, 32, 32)
    assert len(held) == 12 and held[0][1] == UNLABELLED


def test_an_imagenet_folder_with_class_index_folders_keeps_imagenet_indices(tmp_path):
    for index in (243, 7, 999):
        folder = tmp_path / "val" / str(index)
        folder.mkdir(parents=True)
        Image.new("RGB", (300, 260), (index % 256, 20, 40)).save(folder / "a.jpg")
    held = build_dataset(IMAGENET, "eval", tmp_path)
    assert sorted(label for _, label in held) == [7, 243, 999]
    (tmp_path / "val" / "tench").mkdir()
    Image.new("RGB", (300, 260)).save(tmp_path / "val" / "tench" / "b.jpg")
    with pytest.raises(ValueError, match="named by class index"):
        build_dataset(IMAGENET, "eval", tmp_path)


def test_a_missing_photo_is_refused_by_name():
    missing = photos.Photo("nowhere", "skimage.data", "no-such-photo.png", "none", FIT)
    with pytest.raises(FileNotFoundError, match="nowhere.*scikit-image"):
        photos.load_photo(missing)
    absent_package = photos.Photo("ghost", "no_such_package_xyz", "ghost.png", "none", FIT)
    assert absent_package.path is None
