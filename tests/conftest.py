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


def _zoo(tmp_path_factory: pytest.TempPathFactory, env: str, name: str, extra: list[str]) -> Path:
    given = os.environ.get(env)
    if given and (Path(given) / "fp32" / "config.json").exists():
        return Path(given)
    out = tmp_path_factory.mktemp(name)
    assert training_main(["zoo", "--family", "resnet18-shapes", "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """fp32/int8/sparse90 and the fp32-seed1 control of resnet18-shapes after a few steps:
    real formats, untrained accuracy."""
    return _zoo(tmp_path_factory, "SURGERY_TEST_TINY_ZOO", "tiny_zoo",
                ["--train-samples", "256", "--eval-samples", "64", "--max-steps", "2", "--seed-control"])


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
