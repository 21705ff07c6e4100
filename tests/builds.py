"""The work a test session shares: zoos built through the real training CLI and the install test's venv.

Each :class:`Build` is the result of one session fixture. ``conftest.py`` starts the builds the
selected tests need once collection is done, before the first test, so ``--durations`` charges
them to no test; their own times are printed in a section of the summary. Background builds (a
zoo trained in a child process at lower priority, a venv made with pip) run while the other tests
do, filling the cores those leave idle; the tests that need them run last (``order``), and the
wait for an unfinished build happens outside any test's timing too.

A new family plugs in with one more :class:`Build` in :data:`BUILDS` (e.g. its untrained zoo,
``zoo_build(...)``) and a session fixture in ``conftest.py`` returning ``BUILDS[name].result()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ci

REPO_ROOT = Path(__file__).resolve().parents[1]
FAMILY = "resnet18-shapes"
# Nice value of background builds: they take the cycles the tests leave idle, not the tests' own
# (at 10 the three of them still slowed the app-build test beside them, 183 s against 129-154 s).
BACKGROUND_NICENESS = 19
CHILDREN: set[subprocess.Popen] = set()  # background builds' child processes, ended with the session

# Every stage of the untrained zoo trains one epoch of two steps on 128 images: real formats, bit
# widths and sparsity levels, untrained accuracy.
UNTRAINED_ZOO_ARGS = ["--ladder", "--seeds", "2", "--train-samples", "128", "--eval-samples", "32",
                      "--epochs", "1", "--max-steps", "2"]
# The trained zoo: the family's own recipes (fp32, int8, sparse90); the floors the tests assert on it
# were measured on models trained with and without bfloat16 autocast (README, "The test suite").
TRAINED_ZOO_ARGS: list[str] = []


@dataclass
class Build:
    """One shared result: ``run(workdir)`` makes it, in the foreground or in a background thread."""

    name: str
    run: Callable[[Path], Any]
    background: bool = False
    order: int = 0  # tests needing a background build run after all others, lowest order first
    needs: Callable[[], str | None] = lambda: None  # why it cannot be built here, or None
    started: float | None = None
    seconds: float | None = None
    waited: float = 0.0
    _value: Any = None
    _error: BaseException | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self, workdir: Path) -> None:
        """Start it (once): at once in a thread when ``background``, else here, to the end."""
        if self.started is not None:
            return
        self.started = time.perf_counter()
        if self.background:
            self._thread = threading.Thread(target=self._work, args=(workdir,), name=f"build-{self.name}",
                                            daemon=True)
            self._thread.start()
        else:
            self._work(workdir)

    def _work(self, workdir: Path) -> None:
        try:
            self._value = self.run(workdir)
        except BaseException as exc:  # handed to every test that needs it, by result()
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - self.started

    def wait(self) -> None:
        """Block until a started build is done, counting the time spent waiting."""
        if self._thread is not None and self._thread.is_alive():
            began = time.perf_counter()
            self._thread.join()
            self.waited += time.perf_counter() - began

    def result(self) -> Any:
        self.wait()
        if self._error is not None:
            raise RuntimeError(f"the session build {self.name!r} failed: {self._error}") from self._error
        return self._value


def zoo_in_process(family: str, args: list[str], on_saved: Callable[[str, Any], None] | None = None):
    """``python -m training zoo`` in this process; ``on_saved(variant, model)`` sees each model as it is
    saved (the training code's own object, before the file exists), without changing it."""

    def run(workdir: Path) -> Path:
        import training.variants
        from training.cli import main

        out, log = workdir / family, workdir / f"{family}.log"
        original = training.variants.save_variant

        def save_variant(model, directory, info):
            if on_saved is not None:
                on_saved(info.variant, model)
            return original(model, directory, info)

        training.variants.save_variant = save_variant
        workdir.mkdir(parents=True, exist_ok=True)
        try:  # the progress bars and the log go to a file, as a background build's do
            with open(log, "w") as output, contextlib.redirect_stderr(output), contextlib.redirect_stdout(output):
                code = main(["zoo", "--family", family, "--out", str(out), *args])
        finally:
            training.variants.save_variant = original
        if code != 0:
            raise RuntimeError(f"exit {code}; the end of {log}:\n{log.read_text()[-3000:]}")
        return out

    return run


def _child(argv: list[str], log: Path) -> None:
    """``python argv`` in a child process at lower priority on one thread, its output in ``log``.

    One thread: the shapes zoo trains as fast on one core as on two (209 s against 195 s alone, AMD
    EPYC), and two threads beside the tests' own cost 690 CPU-s instead of 210 (a fresh clone's run),
    their parallel regions stalled each time the tests take one of the cores."""
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as output:
        child = subprocess.Popen(["nice", "-n", str(BACKGROUND_NICENESS), sys.executable, *argv], cwd=REPO_ROOT,
                                 env=env, stdout=output, stderr=subprocess.STDOUT)
        CHILDREN.add(child)
        try:
            code = child.wait()
        finally:
            CHILDREN.discard(child)
    if code != 0:
        raise RuntimeError(f"exit {code}; the end of {log}:\n{log.read_text()[-3000:]}")


def zoo_in_background(family: str, args: list[str]):
    """``python -m training zoo`` in a child process at lower priority, its output in a log file."""

    def run(workdir: Path) -> Path:
        out = workdir / family
        workdir.mkdir(parents=True, exist_ok=True)
        _child(["-m", "training", "zoo", "--family", family, "--out", str(out), *args], workdir / f"{family}.log")
        return out

    return run


def json_in_background(module: str, function: str):
    """``module.function()`` (a module of ``tests/``, returning JSON-able data) in a child process at
    lower priority: a simulation that fills the cycles the tests leave idle."""

    def run(workdir: Path) -> Any:
        out = workdir / f"{function}.json"
        workdir.mkdir(parents=True, exist_ok=True)
        code = f"import json, sys, {module}; json.dump({module}.{function}(), open(sys.argv[1], 'w'))"
        _child(["-c", code, str(out)], workdir / f"{function}.log")
        return json.loads(out.read_text())

    return run


def stop_children() -> None:
    """End the background builds' child processes still running (the session is over)."""
    for child in list(CHILDREN):
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()


# What a clone would not hold, or what is this machine's own: left out of the copy that is installed.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", "build", "dist", "*.egg-info", "zoo",
                                    "runs", "artifacts", ".gradio", ".pytest_cache")


def clean_env(venv: Path, **extra: str) -> dict:
    """An environment that knows nothing of the checkout: no PYTHONPATH, the venv first on PATH.

    NNCF's compiled extension gets a directory of its own: torch keys the build by its compiler
    flags, which name the venv's include paths, so sharing the default one with another venv would
    recompile it (~30 s) at every switch between them, here and in every other process on the machine.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON", "VIRTUAL_ENV"))}
    env |= {"PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", "VIRTUAL_ENV": str(venv),
            "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "TORCH_EXTENSIONS_DIR": str(venv.parent / "torch-extensions")}
    return env | extra


def installed_package(workdir: Path) -> dict[str, Path]:
    """A fresh venv with ``pip install`` of a copy of the checkout (no extras); a directory outside both.

    Mostly I/O (torch's wheels come from the local cache), so it runs while the zoos train."""
    source, venv, outside = workdir / "checkout", workdir / "venv", workdir / "elsewhere"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCE)
    python = shutil.which("python3.11") or "python3.11"
    for command in ([python, "-m", "venv", str(venv)], [str(venv / "bin" / "pip"), "install", "-q", str(source)]):
        done = subprocess.run(command, cwd=workdir, env=clean_env(venv), capture_output=True, text=True,
                              timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}\n{done.stderr[-4000:]}")
    outside.mkdir()
    return {"venv": venv, "source": source, "outside": outside}


# Probe images every saved model of the untrained zoo is run on as it is saved (see conftest).
PROBE_SEED, PROBE_IMAGES = 0, 8
SAVED_OUTPUTS: dict[str, dict] = {}


def _record_saved(variant: str, model) -> None:
    """The model the training code saves, on the probe images, with its quantizers' widths and levels."""
    import torch

    from surgery import compression
    from surgery.data import ShapesDataset, ShapesSpec

    x = ShapesDataset(ShapesSpec("val", PROBE_IMAGES, seed=PROBE_SEED)).images.float() / 255
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), compression.forward_lock(model):
            logits = model(x)
    finally:
        model.train(training)
    SAVED_OUTPUTS[variant] = {
        "logits": logits.clone(), "training": training,
        "bit_widths": compression.bit_widths(model),
        "levels": {n: q.levels for n, q in compression.named_quantizers(model).items()},
    }


BUILDS: dict[str, Build] = {b.name: b for b in (
    Build("untrained_zoo", zoo_in_process(FAMILY, UNTRAINED_ZOO_ARGS, _record_saved)),
    Build("tiny_fashion_zoo", zoo_in_process("resnet18-fashionmnist", ["--train-samples", "256", "--eval-samples",
                                                                       "64", "--max-steps", "2"]),
          needs=ci.fashion_mnist_missing),
    Build("installed", installed_package, background=True, order=0),
    Build("shapes_zoo", zoo_in_background(FAMILY, TRAINED_ZOO_ARGS), background=True, order=1),
    Build("cca_replications", json_in_background("test_cca_bias", "replications"), background=True, order=0),
)}
