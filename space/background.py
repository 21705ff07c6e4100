"""Training the rest of a zoo while the Space is served, and adding each variant when it is ready.

On a fresh machine the app trains first what the default page needs and serves it (see
:mod:`space.zoo_source`); :class:`BackgroundBuild` then runs the same training CLI in a child
process (``python -m training zoo ... --variants <pending>``: the same recipe and seeds as a
foreground build) at a lower CPU priority, so visitors' requests come first. A watcher thread
loads each variant as soon as its ``config.json`` appears and hands it to the shared
:class:`~space.session.Session` with :meth:`~space.session.Session.add_variant`; the page's
timer then adds it to the choices. The child's output goes to ``ZOO/<family>/.space-build.log``.

Example:
    >>> build = BackgroundBuild(session, "resnet18-shapes", Path("zoo/resnet18-shapes"), ["fp32-seed1"])
    >>> build.start(); build.status_text()
    'resnet18-shapes: training fp32-seed1 ...'
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from space.zoo_source import load_member, zoo_argv
from surgery.checkpoint import CONFIG_FILE, CheckpointError

logger = logging.getLogger(__name__)

LOG_FILE = ".space-build.log"
NICENESS = 10  # below the web server: a request never waits for a training step
REPO = Path(__file__).resolve().parents[1]


def _child_setup() -> None:
    """In the child, before it runs: lower priority, and end with the app (Linux's parent-death
    signal), so a stopped Space leaves no trainer behind; a rerun resumes it."""
    os.nice(NICENESS)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the app's stop() still ends it
        pass


class BackgroundBuild:
    """The pending variants of one family, trained by a child process, watched by a thread."""

    def __init__(self, session, family: str, directory: Path, variants: list[str],
                 steps: int | None = None, poll_seconds: float = 2.0) -> None:
        self.session = session
        self.family = family
        self.directory = Path(directory)
        self.variants = list(variants)
        self.steps = steps
        self.poll_seconds = poll_seconds
        self.error: str | None = None
        self.log_path = self.directory / LOG_FILE
        self._process: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"build-{family}", daemon=True)

    @property
    def pending(self) -> list[str]:
        """Variants not yet in the session (the session drops each one it gets)."""
        return [v for v in self.variants if v not in self.session.zoo(self.family).variants]

    def start(self) -> "BackgroundBuild":
        command = [sys.executable, "-m", "training", *zoo_argv(self.family, self.directory, self.variants, self.steps)]
        logger.info("%s: training %s in the background (log: %s)", self.family, ", ".join(self.variants),
                    self.log_path)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                             preexec_fn=_child_setup)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the child process (the CLI resumes it on the next start) and the watcher."""
        self._stop.set()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=60)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._collect()
            if not self.pending:
                break
            if self._process.poll() is not None:
                self._collect()  # the last variant may have been written just before the exit
                if self.pending:
                    self.error = (f"the background training stopped (exit status {self._process.returncode}) "
                                  f"before {', '.join(self.pending)}; see {self.log_path}")
                    logger.error("%s: %s", self.family, self.error)
                    self.session.zoo(self.family).pending = ()  # requests now hear "no such variant"
                break
            self._stop.wait(self.poll_seconds)
        if self._process.poll() is None and not self.pending:
            self._process.wait()

    def _collect(self) -> None:
        for name in self.pending:
            path = self.directory / name
            if not (path / CONFIG_FILE).exists():
                continue
            try:
                variant = load_member(name, path, self.family)
            except (CheckpointError, OSError, ValueError) as exc:  # still being written: next time
                logger.debug("%s not ready yet: %s", path, exc)
                continue
            self.session.add_variant(self.family, variant)
            logger.info("%s/%s trained in the background: now in the page", self.family, name)

    def progress(self) -> str:
        """The child's last progress line (tqdm's bar), for the status line."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(log.seek(0, os.SEEK_END) - 4096, 0))
                tail = log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        parts = [p.strip() for p in tail.replace("\r", "\n").splitlines() if "|" in p and "%" in p]
        return parts[-1] if parts else ""

    def status_text(self) -> str:
        """One line for the page: what is still training, or why it stopped."""
        if self.error:
            return f"**{self.family}**: {self.error}"
        pending = self.pending
        if not pending:
            return ""
        now = self.progress()
        return (f"**{self.family}**: still training {', '.join(pending)} in the background; each appears "
                f"in the variant choices when ready." + (f" Now: `{now}`" if now else ""))
