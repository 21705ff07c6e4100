"""Training the rest of a zoo while the Space is served, and adding each variant when it is ready.

On a fresh machine the app trains first what the first page needs and serves it (see
:mod:`space.zoo_source`); :class:`BackgroundBuild` then runs the same training CLI in a child
process (:class:`space.trainer.Trainer`: ``python -m training zoo ... --variants <pending>``, the
same recipe and seeds as a foreground build; the ladder in a run of its own after the seed
control) at a lower CPU priority, so visitors' requests come first. A watcher thread
loads each variant as soon as its ``config.json`` appears and hands it to the shared
:class:`~space.session.Session` with :meth:`~space.session.Session.add_variant`; the page's
timer then adds it to the choices (a family built wholly in the background joins the family
choices with its FP32 model). Builds of several families run one after another (``after``), the
served family's first, so they never share the two cores. The child's output goes to
``ZOO/<family>/.space-build.log``.

Example:
    >>> build = BackgroundBuild(session, "resnet18-shapes", Path("zoo/resnet18-shapes"), ["fp32-seed1"])
    >>> build.start(); build.status_text()
    'resnet18-shapes: training fp32-seed1 ...'
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from space.trainer import LOG_FILE, Trainer
from space.zoo_source import load_member, zoo_argv
from surgery.checkpoint import CONFIG_FILE, CheckpointError
from surgery.variants import DEFAULT_ZOO, parse_variant

logger = logging.getLogger(__name__)

def batches(variants: list[str]) -> list[list[str]]:
    """The default zoo's rest and the controls (seed, another recipe) first, then the ladder, as
    separate runs: a ladder rung this trainer cannot build must not hold back a control."""
    first = [v for v in variants if v in DEFAULT_ZOO or parse_variant(v).is_control]
    rest = [v for v in variants if v not in first]
    return [batch for batch in (first, rest) if batch]


class BackgroundBuild:
    """The pending variants of one family, trained by child processes, watched by a thread."""

    def __init__(self, session, family: str, directory: Path, variants: list[str],
                 steps: int | None = None, poll_seconds: float = 2.0, after: "BackgroundBuild | None" = None) -> None:
        self.session = session
        self.family = family
        self.directory = Path(directory)
        self.variants = list(variants)
        self.steps = steps
        self.poll_seconds = poll_seconds
        self.after = after  # a build that runs first: this one waits for it to end
        self.errors: list[str] = []
        self.log_path = self.directory / LOG_FILE
        self._process: Trainer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"build-{family}", daemon=True)

    @property
    def pending(self) -> list[str]:
        """Variants not yet in the session (the session drops each one it gets) nor failed."""
        return [v for v in self.session.pending(self.family) if v in self.variants]

    def start(self) -> "BackgroundBuild":
        logger.info("%s: training %s in the background (log: %s)", self.family, ", ".join(self.variants),
                    self.log_path)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the child process (the CLI resumes it on the next start) and the watcher."""
        self._stop.set()
        if self._process is not None:
            self._process.stop()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        if self.after is not None:
            self.after.join()
        for batch in batches(self.variants):
            if self._stop.is_set():
                return
            self._process = Trainer(zoo_argv(self.family, self.directory, batch, self.steps), self.log_path,
                                    background=True)
            while self._process.poll() is None and not self._stop.wait(self.poll_seconds):
                self._collect()
            self._collect()  # the last variant may have been written just before the exit
            missing = [v for v in batch if v in self.pending]
            if missing and not self._stop.is_set():
                error = (f"the background training of {', '.join(missing)} stopped (exit status "
                         f"{self._process.poll()}); see {self.log_path}")
                logger.error("%s: %s", self.family, error)
                self.errors.append(error)
                self.session.give_up(self.family, missing)  # requests now hear "no such variant"

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
        """The child's innermost open bar (the epoch's steps), for the status line."""
        bars = self._process.bars(last_bytes=8192) if self._process is not None else []
        return f"{bars[-1].desc}: {bars[-1].n}/{bars[-1].total}" if bars else ""

    def status_text(self) -> str:
        """Lines for the page: what is still training, and why anything stopped."""
        lines = [f"**{self.family}**: {error}" for error in self.errors]
        pending = self.pending
        if pending:
            now = self.progress() if self._process is not None and self._process.poll() is None else ""
            joins = ("the family joins the family choices when its FP32 model is ready"
                     if self.family in self.session.coming else "each appears in the variant choices when ready")
            queued = "" if now or self.after is None or not self.after.pending else ", after the builds above"
            lines.append(f"**{self.family}**: still training {', '.join(pending)} in the background{queued}; "
                         f"{joins}." + (f" Now: `{now}`" if now else ""))
        return "\n\n".join(lines)
