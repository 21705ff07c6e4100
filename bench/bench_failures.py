"""How fast the clear failures come: each Hub failure, and the missing-dataset message, against their promises.

The promises (issues 3 and 10): a Hub that is unreachable, or a repo, revision or file that is
missing, or a gated or private repo without a token, fails with one message within 5 s; a missing
Fashion-MNIST within 1 s. The tests check the messages and, on a loaded machine with clients side by
side, only a loose bound; this measures the times one call at a time, each Hub case in a fresh
process (``huggingface_hub`` reads ``HF_ENDPOINT`` at import) against the test suite's local Hub
servers (``tests/hub_servers.py``), the first request under the library's default 3 s deadline.
Medians of ``--repeats`` runs.

Usage:
    nice python bench/bench_failures.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from hub_servers import TOKEN, HubStandIn, Olah, closed_endpoint, run_client, silent_endpoint  # noqa: E402
from surgery.checkpoint import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402
from training.cli import main as training_main  # noqa: E402

HUB_PROMISE_S, DATASET_PROMISE_S = 5.0, 1.0


def _checkpoint(work: Path) -> Path:
    """An FP32 checkpoint after one training step: the files the Hub repos below serve."""
    out = work / "fp32"
    assert training_main(["fp32", "--family", "resnet18-shapes", "--out", str(out), "--train-samples", "32",
                          "--eval-samples", "16", "--epochs", "1", "--max-steps", "1"]) == 0
    return out


def _hub_cases(stand_in: HubStandIn, olah: Olah, fp32: Path, silent: str) -> dict[str, tuple[str, str, str | None]]:
    """name -> (Hub URL, repo, revision), the failure cases of tests/test_hub.py."""
    files = {name: (fp32 / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    stand_in.add_repo("bench/fp32", files)
    stand_in.add_repo("bench/pickled", {"pytorch_model.bin": b"\x80\x04pickle", CONFIG_FILE: b"{}"})
    stand_in.add_repo("bench/no-weights", {CONFIG_FILE: files[CONFIG_FILE]})
    stand_in.add_repo("bench/gated", files, gated=True)
    stand_in.add_repo("bench/private", {}, private=True)
    stand_in.repos.commit("bench/private", "dev", files, [], "dev only")
    return {
        "missing repo": (olah.url, "bench/does-not-exist", None),
        "missing revision": (olah.url, "bench/fp32", "no-such-branch"),
        "missing file": (olah.url, "bench/no-weights", None),
        "pickle only": (olah.url, "bench/pickled", None),
        "gated, no token": (stand_in.url, "bench/gated", None),
        "private, no token": (stand_in.url, "bench/private", "dev"),
        "unreachable (refused)": (closed_endpoint(), "bench/fp32", None),
        "no answer (silent)": (silent, "bench/fp32", None),
    }


def _time_hub_failure(url: str, repo: str, revision: str | None, home: Path) -> float:
    result, = run_client([{"op": "fail", "repo": repo, "revision": revision}], endpoint=url, home=home,
                         deadline="3")
    assert result["error"] == "HubError", result
    return result["seconds"]


def _time_missing_dataset(work: Path) -> float:
    started = time.perf_counter()
    code = training_main(["fp32", "--family", "resnet18-fashionmnist", "--out", str(work / "o"),
                          "--data-root", str(work / "nothing-here")])
    assert code == 2
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = _checkpoint(work)
        with HubStandIn(work / "mirrors", TOKEN) as stand_in, Olah(work / "mirrors", work) as olah, \
                silent_endpoint() as silent:
            for name, (url, repo, revision) in _hub_cases(stand_in, olah, fp32, silent).items():
                times = [_time_hub_failure(url, repo, revision, work / f"home-{i}") for i in range(args.repeats)]
                rows.append((f"Hub: {name}", times, HUB_PROMISE_S))
        _time_missing_dataset(work)  # warm-up: the first call imports the dataset code
        rows.append(("Fashion-MNIST missing (in-process call)",
                     [_time_missing_dataset(work) for _ in range(args.repeats)], DATASET_PROMISE_S))
    print(f"{args.repeats} runs each, one at a time; the Hub's first request under the default 3 s deadline")
    print("| failure | median (s) | max (s) | promise (s) | median / promise |")
    print("|---|---|---|---|---|")
    for name, times, promise in rows:
        median = statistics.median(times)
        print(f"| {name} | {median:.3f} | {max(times):.3f} | {promise:g} | {median / promise:.2f} |")


if __name__ == "__main__":
    main()
