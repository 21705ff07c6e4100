"""The training CLI as a child process of the Space, and the progress bars read from its output.

When the Space builds a zoo on a fresh machine, both what the first page needs (before it is
served, :func:`space.zoo_source.build_here`) and the rest (while it is served,
:mod:`space.background`) are trained by ``python -m training zoo ...`` in a child process
(:class:`Trainer`), its output appended to ``ZOO/<family>/.space-build.log``. The preparing page
shows the child's bars (:meth:`Trainer.bars`, parsed from tqdm's output by :func:`parse_bars`).

Why a child, and not the CLI called in this process: the build then runs as ``python -m
training`` does from a shell, the same recipe in the same kind of process as any other build of
the zoo, and the memory its training takes (2.4 GB at the peak of the whole shapes ladder) goes
back to the system when it ends instead of staying in the Space's heap. The Space's own process
is set up to serve: OpenMP's idle threads sleep at once there (``OMP_WAIT_POLICY=PASSIVE``, set
by :mod:`space` before torch loads, because visitors' requests run side by side). The foreground
child, with nothing else running, gets OpenMP's default (threads spin briefly before they sleep),
as a shell would give it; a background child keeps the Space's setting and a lower priority,
since it trains while requests are served.

Example:
    >>> trainer = Trainer(["zoo", "--family", "resnet18-shapes", "--out", "zoo/resnet18-shapes"],
    ...                   Path("zoo/resnet18-shapes/.space-build.log"))
    >>> trainer.bars()   # while it runs: [Bar(desc='zoo resnet18-shapes', n=0, total=2, ...), ...]
    >>> trainer.wait()
    0
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

LOG_FILE = ".space-build.log"
NICENESS = 10  # a background trainer's priority below the web server: a request never waits for a step
REPO = Path(__file__).resolve().parents[1]
WAIT_POLICY = "OMP_WAIT_POLICY"
_RUNNING: set["Trainer"] = set()  # foreground trainers this process waits on (the preparing page shows them)

# What tqdm writes to a file: text, carriage returns, newlines, and "cursor up" to redraw nested bars.
_TOKENS = re.compile(r"(\r|\n|\x1b\[A|\x1b\[[0-9;]*[A-Za-z])")
# tqdm's default format with a total: "DESC:  45%|████▌     | 144/320 [01:10<01:25, 2.04it/s, ...]"
_BAR = re.compile(r"(?P<desc>.+?):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+) \[(?P<elapsed>[\d:]+)")


@dataclass(frozen=True)
class Bar:
    """One live progress bar: what runs, how far, for how long."""

    desc: str
    n: int
    total: int | None
    elapsed: float


def _seconds(clock: str) -> float:
    return float(sum(int(part) * 60 ** i for i, part in enumerate(reversed(clock.split(":")))))


def parse_bars(text: str) -> list[Bar]:
    """The bars tqdm's output ``text`` leaves open, outermost first.

    tqdm draws the bar at nesting position ``k`` ``k`` lines below the cursor and moves back up
    (``k`` "cursor up" codes right after it), and clears a closed bar's line at its position; log
    lines in between only move the whole nest down. So each drawing, read with the moves after it,
    says which position it shows. Text after the last control code may be a write still under
    way: it is left for the next reading.
    """
    tokens = [t for t in _TOKENS.split(text) if t]
    shown: dict[int, Bar] = {}
    for i, token in enumerate(tokens[:-1]):
        if token in ("\r", "\n") or token.startswith("\x1b"):
            continue
        position = 0
        while i + 1 + position < len(tokens) and tokens[i + 1 + position] == "\x1b[A":
            position += 1
        if not token.strip():
            shown.pop(position, None)  # a closed bar's line, cleared
        elif match := _BAR.match(token.strip()):
            shown[position] = Bar(match["desc"].strip(), int(match["n"]), int(match["total"]),
                                  _seconds(match["elapsed"]))
    return [bar for _, bar in sorted(shown.items()) if bar.n < bar.total]


def running_bars() -> list[Bar]:
    """The open bars of the foreground trainers running now."""
    return [bar for trainer in list(_RUNNING) for bar in trainer.bars()]


def _child_setup(niceness: int) -> None:
    """In the child, before it runs: its priority, and an end with the Space (Linux's parent-death
    signal), so a stopped Space leaves no trainer behind; a rerun resumes it."""
    if niceness:
        os.nice(niceness)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: stop() still ends it
        pass


class Trainer:
    """``python -m training ARGV`` in a child process, its output appended to ``log_path``.

    ``background``: trained while the Space serves (lower priority, the Space's OpenMP setting);
    otherwise nothing else runs meanwhile and the child gets OpenMP's default (module docstring).
    """

    def __init__(self, argv: list[str], log_path: Path, background: bool = False) -> None:
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if not background:
            env.pop(WAIT_POLICY, None)
        with open(self.log_path, "ab") as log:
            self.offset = log.tell()  # this child's output starts here
            self.process = subprocess.Popen([sys.executable, "-m", "training", *argv], cwd=REPO, env=env,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=partial(_child_setup, NICENESS if background else 0))
        if not background:
            _RUNNING.add(self)

    def output(self, last_bytes: int | None = None) -> str:
        """What the child has written so far (only its last ``last_bytes`` when given)."""
        try:
            with open(self.log_path, "rb") as log:
                end = log.seek(0, os.SEEK_END)
                start = self.offset if last_bytes is None else max(self.offset, end - last_bytes)
                log.seek(start)
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        if start > self.offset:  # a tail: its first line is cut
            text = re.split(r"[\r\n]", text, maxsplit=1)[-1]
        return text

    def bars(self, last_bytes: int | None = None) -> list[Bar]:
        """The child's open progress bars (see :func:`parse_bars`)."""
        return parse_bars(self.output(last_bytes))

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self) -> int:
        """The child's exit status once it ends; ended with this process if that is interrupted."""
        try:
            return self.process.wait()
        except BaseException:
            self.stop()
            raise
        finally:
            _RUNNING.discard(self)

    def stop(self) -> None:
        """End the child (the CLI resumes the build when it is started again)."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
