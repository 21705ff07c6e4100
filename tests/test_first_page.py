"""Which family the Space opens on, and families built wholly in the background joining the page.

On a machine with no Hub and no zoo the first page is ``mobilenetv2-imagenet``: its FP32 is
torchvision's weights as they are, so the page waits for FP32 and INT8; a family whose FP32 trains
here waits for FP32 alone. A family built while another is already served has no model at first:
it trains in the background, after the served family's rest, and joins the family choices when
its FP32 model is ready (here: ``mobilenetv2-shapes`` in a smoke build beside the tiny ResNet zoo).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from gradio import Error
from PIL import Image

from conftest import close_app, handlers_of
from space.app import create_app
from space.zoo_source import DEFAULT_BUILD, DEFAULT_FAMILIES, BuildOptions
from surgery.data import offline_available

LATER = "mobilenetv2-shapes"
TIMEOUT = 900


def test_the_first_page_is_the_pretrained_mobilenet_with_fp32_and_int8s_calibration():
    assert DEFAULT_FAMILIES[0] == "mobilenetv2-imagenet"
    assert DEFAULT_BUILD == ("mobilenetv2-imagenet", "resnet18-shapes", "resnet18-fashionmnist")
    assert BuildOptions().first("mobilenetv2-imagenet") == ("fp32", "int8-ptq")
    assert BuildOptions().first("resnet18-shapes") == ("fp32",)
    assert BuildOptions(serve_after=("fp32",)).first("mobilenetv2-imagenet") == ("fp32",)
    assert offline_available("resnet18-shapes") and offline_available(LATER)


@pytest.mark.e2e  # a whole family trained by the Space in the background
def test_a_family_built_in_the_background_joins_the_page(tiny_zoo, tmp_path, monkeypatch, mobilenet_weights):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "resnet18-shapes").symlink_to(tiny_zoo.resolve(), target_is_directory=True)  # served as it is
    demo, _ = create_app(["--zoo", str(zoo), "--families", f"resnet18-shapes,{LATER}", "--build-steps", "2",
                          "--feature-steps", "8", "--cache-dir", str(tmp_path / "cache")])
    h = handlers_of(demo)
    session = h.session
    try:
        assert list(session.families) == ["resnet18-shapes"] and list(session.coming) == [LATER]
        assert session.builds[LATER].pending == ["fp32", "int8", "sparse90", "fp32-seed1"]
        with pytest.raises(Error, match=f"{LATER} is still being trained here"):
            h.models(LATER)
        assert "joins the family choices when its FP32 model is ready" in h.training_status()
        seen = {f: session.variant_names(f) for f in session.families}
        deadline = time.monotonic() + TIMEOUT
        first = {"fp32", "int8"}  # the rest (sparse90, fp32-seed1) would only add minutes of the same path
        while first & set(session.builds[LATER].pending) and time.monotonic() < deadline:
            time.sleep(1)
        assert not first & set(session.builds[LATER].pending), h.training_status()
        assert list(session.families) == ["resnet18-shapes", LATER] and not session.coming
        # The open page's next tick offers the new family in every tab.
        pickers = ["resnet18-shapes", ["fp32", "int8"]] * 3
        out = h.refresh(seen, "resnet18-shapes", *pickers)
        assert all(update.choices == [(f, f) for f in ("resnet18-shapes", LATER)] for update in out[2:6])
        image = tmp_path / "image.png"
        Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(image)
        answer = h.explain(str(image), LATER, "gradient", ["fp32", "int8"])
        assert [answer[4 + 4 * i] for i in range(2)] == ["### FP32", "### INT8 (W8A8)"]
        assert (session.zoo(LATER).directory / ".space-build.json").exists()
    finally:
        for build in session.builds.values():
            build.stop()
        close_app(demo)
