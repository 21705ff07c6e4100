"""The Features tab's first view is computed in the background: the page answers meanwhile, and the
first Features request gets the precomputed images instead of computing them a second time."""

from __future__ import annotations

import threading

import numpy as np
import torch
from PIL import Image

import space.session as session_module
from space.session import Session
from space.zoo_source import SourceConfig, resolve

FAMILY = "resnet18-shapes"


def test_first_features_request_gets_the_precomputed_images_and_explain_is_served_meanwhile(
        tiny_zoo, tmp_path, monkeypatch):
    session = Session(resolve(SourceConfig(families=(FAMILY,), zoo=tiny_zoo, source="local")), cache_dir=tmp_path)
    gate, rendered = threading.Event(), []
    real = session_module._render_features

    def gated(model, layer, channels, steps, paths, progress=None):
        gate.wait(timeout=120)  # hold the precompute mid-way: after it took its models, before it renders
        rendered.append((threading.current_thread().name, tuple(channels)))
        real(model, layer, channels, steps, paths, progress)

    monkeypatch.setattr(session_module, "_render_features", gated)
    thread = session.precompute(FAMILY, steps=8)
    # Explain takes every default column's shared model: the precompute holds none of them.
    answer = session.explain(FAMILY, torch.rand(3, 64, 64))
    assert thread.is_alive() and set(answer.variants) == set(session.default_columns(FAMILY))
    gate.set()
    layer, channels = session.default_layer(FAMILY), list(session_module.DEFAULT_CHANNELS)
    files = session.features(FAMILY, layer, channels, steps=8)  # waits for the precompute, renders nothing
    assert not thread.is_alive()
    assert rendered == [(f"features-{FAMILY}", tuple(channels))] * len(session.default_columns(FAMILY))
    pixels = {name: [np.asarray(Image.open(p)) for p in paths] for name, paths in files.items()}
    assert all(len(images) == len(channels) and images[0].shape[:2] == (64, 64) for images in pixels.values())
    # Each variant's own pictures: files keyed by its weights (an untrained zoo's dead channels may
    # look alike, so the files, not the pixels, are compared).
    assert len({p for paths in files.values() for p in paths}) == len(channels) * len(files)


def test_closing_the_session_stops_a_running_precompute_at_its_next_step(tiny_zoo, tmp_path, monkeypatch):
    session = Session(resolve(SourceConfig(families=(FAMILY,), zoo=tiny_zoo, source="local")), cache_dir=tmp_path)
    started, steps_seen = threading.Event(), []
    real = session_module._render_features

    def watched(model, layer, channels, steps, paths, progress=None):
        def step(done: int, total: int) -> None:
            steps_seen.append(done)
            started.set()
            progress(done, total)
        real(model, layer, channels, steps, paths, step)

    monkeypatch.setattr(session_module, "_render_features", watched)
    thread = session.precompute(FAMILY, steps=10_000)  # hours of work if nothing stopped it
    assert started.wait(timeout=120)
    session.close()  # returns once the thread has ended
    assert not thread.is_alive()
    assert len(steps_seen) < 10_000
    assert not list((tmp_path / "actmax").glob("*.png")), "a stopped precompute writes no picture"
