"""The page in a real browser: Playwright drives Debian's chromium (/usr/bin/chromium).

Uploads an image, picks four variants, runs Explain and sees four columns fill with their maps;
the screenshot is kept under ``artifacts/browser/``. Every request the page makes is recorded:
none may leave the machine. On the first page (``mobilenetv2-imagenet``: torchvision's FP32 and its
INT8), a photo of a cat uploaded is a cat to FP32.
"""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from ci import chromium_missing, playwright_missing, require
from conftest import close_app
from chromium import ARTIFACTS, launch
from space.examples import PHOTOS, photo_path
from space.zoo_source import SERVE_AFTER_PRETRAINED
from surgery.variants import parse_variant

DEFAULT = ("fp32", "int8", "sparse90")  # the tiny zoo's default columns (it has no int4)
CHOSEN = (*DEFAULT, "fp32-seed1")  # the visitor adds the seed control: four columns

LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0"}
CATS = {"tiger cat", "Egyptian cat", "tabby"}  # ImageNet's classes for a cat like scikit-image's chelsea

@pytest.fixture(scope="module")
def browser():
    require(playwright_missing() or chromium_missing())  # CI installs both: there this fails, never skips
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:  # one per thread at a time: every test's pages share it
        browser = launch(p)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(space_app, browser):
    requests: list[str] = []
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.on("request", lambda request: requests.append(request.url))
    page.goto(space_app.local_url)
    page.wait_for_selector("#explain-image", timeout=60_000)
    page.requests = requests
    yield page
    context.close()


def _example(space_app, name: str) -> Path:
    for component in space_app.config["components"]:
        if component.get("type") == "dataset":
            for row in component["props"]["samples"]:
                if Path(row[0]["path"]).name == name:
                    return Path(row[0]["path"])
    raise AssertionError(f"example {name} is not offered")


def test_pick_four_variants_explain_and_see_four_columns_of_maps(page, space_app):
    picker = page.locator("#explain-variants")
    for variant in DEFAULT:  # checked by default
        assert picker.get_by_label(parse_variant(variant).title, exact=True).is_checked()
    assert not page.locator("#column-3").is_visible()  # the fourth slot waits, hidden
    picker.get_by_label("FP32, seed 1", exact=True).check()
    page.set_input_files("#explain-image input[type=file]", str(_example(space_app, "shapes-2-triangle.png")))
    page.wait_for_selector("#explain-image img", timeout=30_000)
    page.click("#explain-button")
    for i, variant in enumerate(CHOSEN):
        column = page.locator(f"#column-{i}")
        column.get_by_text(parse_variant(variant).title, exact=True).wait_for(timeout=120_000)
        maps = column.locator(".map img")
        maps.first.wait_for(timeout=120_000)
        assert maps.count() == 2
        for j in range(2):
            assert maps.nth(j).evaluate("img => img.complete && img.naturalWidth") == 128  # 2x the model's input
        # The top-5 label shows a class name of the shapes family.
        assert column.inner_text().count("%") >= 5
    page.get_by_text("How each model differs from FP32").wait_for()
    assert page.locator("#source").inner_text().count("local zoo") == 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explain.png"), full_page=True)
    assert (ARTIFACTS / "explain.png").stat().st_size > 10_000
    # Back to three: the fourth column hides again.
    picker.get_by_label("FP32, seed 1", exact=True).uncheck()
    page.click("#explain-button")
    page.locator("#column-3").wait_for(state="hidden", timeout=120_000)


def test_a_bad_upload_shows_a_message_not_a_traceback(page, tmp_path):
    dot = tmp_path / "dot.png"
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (255, 0, 0)).save(buffer, "PNG")
    dot.write_bytes(buffer.getvalue())
    before = page.locator("#explain-image img").get_attribute("src")
    page.set_input_files("#explain-image input[type=file]", str(dot))
    # The click must not race the upload: wait until the page shows the new image.
    page.wait_for_function("before => { const img = document.querySelector('#explain-image img');"
                           " return img && img.complete && img.getAttribute('src') !== before; }",
                           arg=before, timeout=30_000)
    page.click("#explain-button")
    message = page.get_by_text("1x1 pixels")
    message.first.wait_for(timeout=60_000)
    assert "Traceback" not in page.content()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "bad_upload.png"))


def test_the_page_requests_nothing_outside_the_machine(page):
    hosts = {urlsplit(url).hostname for url in page.requests if urlsplit(url).scheme in ("http", "https", "ws", "wss")}
    assert hosts and hosts <= LOCAL_HOSTS, hosts - LOCAL_HOSTS


@pytest.fixture(scope="module")
def first_page(mobilenet_imagenet_zoo, tmp_path_factory):
    """The Space's first family, mobilenetv2-imagenet, served in-process with what a fresh machine's
    first page has: FP32 and INT8's calibration (``SERVE_AFTER_PRETRAINED``)."""
    from space.app import create_app

    zoo = tmp_path_factory.mktemp("first-page-zoo")
    for name in SERVE_AFTER_PRETRAINED:
        (zoo / name).symlink_to((mobilenet_imagenet_zoo / name).resolve(), target_is_directory=True)
    demo, launch_options = create_app(["--zoo", str(zoo), "--source", "local",
                                       "--families", "mobilenetv2-imagenet", "--feature-steps", "8",
                                       "--cache-dir", str(tmp_path_factory.mktemp("first-page-cache"))])
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options)
    yield demo
    close_app(demo)


@pytest.mark.e2e  # the pretrained family's first page: FP32 and INT8 calibrated on photos
def test_a_photo_of_a_cat_is_a_cat_to_fp32_on_the_first_page(first_page, browser):
    cat = photo_path(next(p for p in PHOTOS if p.file == "chelsea.png"))
    assert cat.name in {Path(e[0]["path"]).name for c in first_page.config["components"]
                        if c.get("type") == "dataset" for e in c["props"]["samples"]}, "photos are its examples"
    with browser.new_context(viewport={"width": 1400, "height": 1000}) as context:
        page = context.new_page()
        page.goto(first_page.local_url)
        page.wait_for_selector("#explain-image", timeout=60_000)
        picker = page.locator("#explain-variants")
        titles = [parse_variant(v).title for v in SERVE_AFTER_PRETRAINED]
        assert titles == ["FP32", "INT8 (W8A8), post-training"]
        assert all(picker.get_by_label(t, exact=True).is_checked() for t in titles)
        page.set_input_files("#explain-image input[type=file]", str(cat))
        page.wait_for_selector("#explain-image img", timeout=30_000)
        page.click("#explain-button")
        fp32, int8 = page.locator("#column-0"), page.locator("#column-1")
        fp32.get_by_text("FP32", exact=True).wait_for(timeout=120_000)
        int8.get_by_text(titles[1], exact=True).wait_for(timeout=120_000)
        top1 = fp32.get_by_test_id("label-output-value")
        top1.wait_for(timeout=120_000)
        assert top1.inner_text().strip() in CATS, top1.inner_text()
        for column in (fp32, int8):
            maps = column.locator(".map img")
            maps.first.wait_for(timeout=120_000)
            assert maps.count() == 2
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "first_page_cat.png"), full_page=True)
