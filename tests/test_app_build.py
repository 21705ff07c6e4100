"""``python app.py`` on a machine with no Hub and no zoo: it trains what the first page needs
(fp32), shows the progress in the page meanwhile, serves the Space on the same address, and
trains the rest (int8, sparse90, the fp32-seed1 control) in the background; the open page adds
each of them when it is ready, without a restart, and they equal a foreground build's.

A browser watches the whole time (screenshots of the progress page and of the page after the
background variants arrived are kept under ``artifacts/browser/``). The build is a smoke build
(``--build-steps 2``: every epoch cut to two steps), so the path a fresh machine takes runs end
to end in a few minutes. An epoch of two steps lasts about a second: the test holds the training
child still (SIGSTOP) while one is open in its output, checks that the page shows it, and lets it go on.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import space  # noqa: F401  (switches off analytics and telemetry before gradio is imported)
import pytest
from chromium import ARTIFACTS, launch
from ci import chromium_missing, playwright_missing, require
from gradio_client import Client, handle_file
from hub_servers import free_port

from space.examples import PHOTOS, photo_path
from space.preparing import serves_the_space
from space.trainer import LOG_FILE, Bar, parse_bars
from space.zoo_source import BUILD_MARKER, is_complete, zoo_variants
from surgery.checkpoint import read_config
from training.cli import main as training_main

REPO = Path(__file__).parents[1]
TIMEOUT = 600
FOREGROUND, BACKGROUND = ("fp32",), ("int8", "sparse90", "fp32-seed1")
EPOCH = re.compile(r"fp32 \d/\d")  # an epoch's bar, as tqdm names it
EPOCH_BAR = re.compile(r"<b>fp32 \d/\d</b> <progress")  # the same bar, as the page shows it


def test_the_trainers_bars_are_read_back_from_its_output(tmp_path):
    """tqdm's own output to a file, nested as the CLI nests its bars, with a log line in between,
    parsed back into the bars on screen."""
    from tqdm import tqdm

    path = tmp_path / "log"
    with open(path, "w") as log:
        with tqdm(total=2, desc="zoo resnet18-shapes", file=log, mininterval=0) as zoo:
            for _ in tqdm(range(7), desc="fp32 1/2", file=log, leave=False, mininterval=0):
                pass
            zoo.update()
            log.write("12:00:01 INFO training: fp32 epoch 1/2: last loss 0.71\n")
            with tqdm(total=5, desc="fp32 2/2", file=log, leave=False, mininterval=0) as epoch:
                epoch.update(3)
                epoch.set_postfix(loss="0.5", lr="3e-3")
                bars = parse_bars(path.read_text())
                epoch.update(2)
            zoo.update()
    assert [(b.desc, b.n, b.total) for b in bars] == [("zoo resnet18-shapes", 1, 2), ("fp32 2/2", 3, 5)]
    assert all(isinstance(b, Bar) and b.elapsed >= 0 for b in bars)
    assert parse_bars(path.read_text()) == [], "closed bars are cleared"
    assert parse_bars("no bar here\nloss 0.3: 45% done") == []


def _training_child(app: int) -> int | None:
    """The pid of app.py's training child (``python -m training zoo ...``), from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == app and b"training" in command:
            return int(stat.parent.name)
    return None


@contextmanager
def _held_at_an_epoch(log: Path, app: subprocess.Popen, timeout: float):
    """Wait until the training child's output has an epoch's bar open, and hold the child still
    (SIGSTOP) while the caller looks at the page; let it go on afterwards (SIGCONT)."""
    deadline = time.monotonic() + timeout
    while True:
        assert app.poll() is None, f"app.py exited with {app.returncode}"
        assert time.monotonic() < deadline, f"no epoch bar in {log} within {timeout} s"
        child = _training_child(app.pid)
        if child is not None and log.exists():
            os.kill(child, signal.SIGSTOP)
            if any(EPOCH.fullmatch(bar.desc) for bar in parse_bars(log.read_text(errors="replace"))):
                break
            os.kill(child, signal.SIGCONT)
        time.sleep(0.02)  # the child runs 20 ms between looks: a bar open for a second is not missed
    try:
        yield child
    finally:
        os.kill(child, signal.SIGCONT)


@contextmanager
def _holding_later_children(app: subprocess.Popen, earlier: int):
    """Hold still (SIGSTOP) every training child of app.py other than ``earlier`` as soon as it
    appears (the background build; it is still importing torch then), until the block ends."""
    held: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            child = _training_child(app.pid)
            if child is not None and child != earlier and child not in held:
                os.kill(child, signal.SIGSTOP)
                held.append(child)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        for child in held:
            os.kill(child, signal.SIGCONT)


def _status(client: Client | None, url: str) -> tuple[Client | None, str | None]:
    """The preparing page's status HTML (what its timer shows), or None when it is not answering."""
    try:
        client = client or Client(url, verbose=False)
        return client, client.predict(api_name="/status")
    except Exception:  # not up yet, or gone: the real page is taking over
        return None, None


@pytest.mark.e2e  # python app.py building a zoo from scratch
def test_a_fresh_machine_builds_the_zoo_with_progress_in_the_page(tmp_path):
    require(playwright_missing() or chromium_missing())  # CI installs both: there this fails, never skips
    from playwright.sync_api import expect, sync_playwright

    zoo, port = tmp_path / "zoo", free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "app.log"
    command = [sys.executable, "app.py", "--zoo", str(zoo), "--families", "resnet18-shapes",
               "--cache-dir", str(tmp_path / "cache"), "--port", str(port), "--build-steps", "2",
               "--feature-steps", "8"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "2"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    statuses: list[str] = []
    try:
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            client, deadline = None, time.monotonic() + TIMEOUT
            while not statuses:  # the progress page answers before any training starts
                assert process.poll() is None, f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no progress page after {TIMEOUT} s:\n{log.read_text()[-3000:]}"
                client, status = _status(client, url)
                if status:
                    statuses.append(status)
                    page.goto(url)
                else:
                    time.sleep(0.2)
            with _held_at_an_epoch(zoo / "resnet18-shapes" / LOG_FILE, process, TIMEOUT) as foreground:
                client, status = _status(client, url)  # read from the child's output at each request
                statuses.append(status)
                assert status and EPOCH_BAR.search(status), status
                page.locator("#preparing-status li", has_text=EPOCH).first.wait_for(timeout=30_000)
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "preparing.png"))
            # The background build is held until the page has been seen without its variants.
            with _holding_later_children(process, foreground):
                while not serves_the_space(url):
                    assert process.poll() is None, f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}"
                    assert time.monotonic() < deadline, f"no Space after {TIMEOUT} s:\n{log.read_text()[-3000:]}"
                    client, status = _status(client, url)
                    if status:
                        statuses.append(status)
                    time.sleep(0.5)

                # What the page showed: the zoo's stages and the epochs' steps, live.
                assert any("zoo resnet18-shapes" in s and "<progress" in s for s in statuses), statuses[-1:]
                assert any("training them now into" in s for s in statuses)
                # The open page turns into the Space by itself, with the foreground variants only...
                page.wait_for_selector("#explain-image", timeout=60_000)
                picker = page.locator("#explain-variants")
                status = page.locator("#training-status")
                status.get_by_text("still training", exact=False).wait_for(timeout=30_000)
                assert "sparse90, fp32-seed1" in status.inner_text()
                assert picker.get_by_label("FP32", exact=True).is_checked()
                # The first render offers every variant (the API accepts any); the page's load
                # narrows the choices to the ready ones, which may come after the status line.
                expect(picker.get_by_label("90% sparse", exact=True)).to_have_count(0, timeout=30_000)
            # ... and the background ones join it, without a reload, the default columns with them.
            for title in ("INT8 (W8A8)", "90% sparse", "FP32, seed 1"):
                picker.get_by_label(title, exact=True).wait_for(timeout=TIMEOUT * 1000)
            status.wait_for(state="hidden", timeout=30_000)
            assert all(picker.get_by_label(t, exact=True).is_checked() for t in ("INT8 (W8A8)", "90% sparse"))
            page.screenshot(path=str(ARTIFACTS / "background_ready.png"), full_page=True)
            browser.close()

        # The same address serves the Space, on the zoo it built, every variant included.
        built = zoo / "resnet18-shapes"
        assert is_complete(built) and zoo_variants(built) == ["fp32", "int8", "sparse90", "fp32-seed1"]
        assert (built / BUILD_MARKER).exists()
        assert read_config(built / "fp32")["recipe"]["steps_per_epoch"] == 2
        outputs = Client(url, verbose=False).predict(handle_file(str(photo_path(PHOTOS[0]))), "resnet18-shapes",
                                                     "gradient", [*FOREGROUND, *BACKGROUND], api_name="/explain")
        assert [outputs[4 * i] for i in range(4)] == ["### FP32", "### INT8 (W8A8)", "### 90% sparse",
                                                      "### FP32, seed 1"]
        assert "built here in" in log.read_text() and "trained in the background: now in the page" in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=60)

    # The variants derived in the background equal a foreground build's, from the same FP32 model
    # (linked, not trained again) with the same settings.
    foreground = tmp_path / "foreground"
    foreground.mkdir()
    (foreground / "fp32").symlink_to(built / "fp32", target_is_directory=True)
    derived = [v for v in BACKGROUND if not v.startswith("fp32")]
    assert training_main(["zoo", "--family", "resnet18-shapes", "--out", str(foreground),
                          "--variants", ",".join(derived), "--max-steps", "2"]) == 0
    for variant in derived:
        here, there = (read_config(d / variant)["metrics"] for d in (built, foreground))
        assert abs(here["top1"] - there["top1"]) <= 0.005, (variant, here["top1"], there["top1"])
        assert abs(here["agreement_with_fp32"] - there["agreement_with_fp32"]) <= 0.005, variant
