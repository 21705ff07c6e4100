"""Load: 16 clients at once against ``python app.py``; no failure, and every answer equals the serial one.

The server is the real entry point in its own process, serving 4 requests at a time, so
requests on the same shared models really overlap; equality down to the last pixel shows that
no hook, gradient or intermediate result of one request leaks into another.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import space  # noqa: F401  (switches off analytics and telemetry before gradio is imported)
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from hub_servers import free_port
from space.examples import write_examples
from space.preparing import serves_the_space

pytestmark = pytest.mark.e2e  # python app.py in its own process, 16 clients
CLIENTS = 16
REPO = Path(__file__).parents[1]


def _wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"python app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if serves_the_space(url):
            return
        time.sleep(0.5)
    raise AssertionError(f"python app.py did not serve within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tiny_zoo, tmp_path_factory) -> str:
    """``python app.py`` on the tiny zoo, in its own process; yields its URL."""
    work = tmp_path_factory.mktemp("space-load")
    port = free_port()
    log = work / "app.log"
    command = [sys.executable, "app.py", "--zoo", str(tiny_zoo), "--source", "local", "--families",
               "resnet18-shapes", "--cache-dir", str(work / "cache"), "--port", str(port),
               "--concurrency", "4", "--feature-steps", "8"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "2"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(url, process, log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def _requests(tmp_path: Path) -> list[tuple[str, str]]:
    """16 different (image, saliency method) requests: photos and shapes, all three methods."""
    examples = write_examples(tmp_path / "examples", ["resnet18-cifar10", "resnet18-shapes"])
    images = [str(e.path) for family in examples.values() for e in family]
    methods = ["gradient"] * 14 + ["smoothgrad", "integrated_gradients"]
    return [(images[i % len(images)], method) for i, method in enumerate(methods)][:CLIENTS]


def _answer(client: Client, image: str, method: str) -> dict:
    out = client.predict(handle_file(image), "resnet18-shapes", method, api_name="/explain")
    # Four column slots of (title, top-5, GradCAM, saliency); the default three are filled.
    return {"labels": [out[4 * i + 1] for i in range(3)], "table": out[-1]["data"],
            "maps": [np.asarray(Image.open(out[4 * i + j]).convert("RGB")) for i in range(3) for j in (2, 3)]}


def _same(a: dict, b: dict) -> bool:
    return (a["labels"] == b["labels"] and a["table"] == b["table"]
            and all(np.array_equal(x, y) for x, y in zip(a["maps"], b["maps"])))


def test_sixteen_concurrent_clients_get_the_serial_answers(served, tmp_path):
    requests = _requests(tmp_path)
    serial_client = Client(served, verbose=False)
    serial = [_answer(serial_client, image, method) for image, method in requests]
    # Different images give different answers: equality below is not trivially true.
    assert len({str(s["labels"]) for s in serial}) > 4

    clients = [Client(served, verbose=False) for _ in requests]
    start = threading.Barrier(len(requests))
    results: list = [None] * len(requests)

    def visit(i: int) -> None:
        start.wait()
        try:
            results[i] = _answer(clients[i], *requests[i])
        except Exception as exc:  # recorded, so one failure does not hide the others
            results[i] = exc

    threads = [threading.Thread(target=visit, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    failures = [(i, r) for i, r in enumerate(results) if not isinstance(r, dict)]
    assert not failures, failures
    differing = [requests[i] for i in range(len(requests)) if not _same(results[i], serial[i])]
    assert not differing, f"answers under load differ from the serial ones for {differing}"
