"""Shared fixtures: zoos are built once per test session through the real CLI.

``SURGERY_TEST_ZOO`` (and ``SURGERY_TEST_TINY_ZOO``) may point at a zoo built earlier with the
same command, to iterate on tests without rebuilding it; CI always builds afresh.
"""

from __future__ import annotations

import os
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
    """fp32/int8/sparse90 of resnet18-shapes after a few steps: real formats, untrained accuracy."""
    return _zoo(tmp_path_factory, "SURGERY_TEST_TINY_ZOO", "tiny_zoo",
                ["--train-samples", "256", "--eval-samples", "64", "--max-steps", "2"])


@pytest.fixture(scope="session")
def shapes_zoo(tmp_path_factory) -> Path:
    """The real resnet18-shapes zoo with its default recipe (a few minutes), plus the seed control."""
    return _zoo(tmp_path_factory, "SURGERY_TEST_ZOO", "shapes_zoo", ["--seed-control"])
