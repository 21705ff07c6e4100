"""Synthetic images from BatchNorm statistics (ZeroQ) on a small MobileNetV2: the optimisation
really brings the statistics towards the stored ones, is reproducible, and the cache returns what
was generated without generating again and regenerates over a damaged file."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

from surgery.registry import build_model, get_family
from training import synthetic
from training.loop import seed_everything
from training.synthetic import batchnorm_images, cached_batchnorm_images, statistics_loss

SIZE, STEPS = 32, 100


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """Random weights with BatchNorm statistics estimated on structured (smooth, bright) images, so
    that noise does not already match them."""
    family = dataclasses.replace(get_family("mobilenetv2-imagenet"), input_size=SIZE,
                                 arch_options={"width_mult": 0.25, "last_stage_stride": 2})
    seed_everything(0)
    net = build_model(family)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    net.train()
    with torch.no_grad():
        smooth = nn.functional.interpolate(torch.rand(64, 3, 4, 4), size=SIZE, mode="bilinear") * 0.5 + 0.5
        net(smooth)
    return net.eval()


def test_the_images_match_the_statistics_better_than_their_noise_start(model):
    images = batchnorm_images(model, 8, SIZE, steps=STEPS, seed=3, batch=4)
    start = torch.sigmoid(torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        before, after = statistics_loss(model, start), statistics_loss(model, images)
    assert images.shape == (8, 3, SIZE, SIZE) and 0 <= images.min() and images.max() <= 1
    assert after < 0.5 * before, (float(before), float(after))
    assert not model.training and all(p.requires_grad for p in model.parameters()), "the model is left as it was"


def test_a_seed_gives_the_same_images_and_another_seed_others(model):
    first, again = (batchnorm_images(model, 2, SIZE, steps=3, seed=0) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, batchnorm_images(model, 2, SIZE, steps=3, seed=1))


def test_the_cache_returns_the_generated_images_and_survives_a_damaged_file(model, tmp_path, monkeypatch, caplog):
    made = cached_batchnorm_images(model, 2, SIZE, tmp_path, steps=3, seed=0)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("generated again")
    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "batchnorm_images", refuse)
        assert torch.equal(cached_batchnorm_images(model, 2, SIZE, tmp_path, steps=3, seed=0), made)
    files[0].write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        again = cached_batchnorm_images(model, 2, SIZE, tmp_path, steps=3, seed=0)
    assert torch.equal(again, made) and "unreadable synthetic-image cache" in caplog.text
    cached_batchnorm_images(model, 2, SIZE, tmp_path, steps=3, seed=1)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2, "another seed is another file"


def test_a_network_without_batchnorm_is_refused():
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        batchnorm_images(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), 1, 8, steps=1)
