"""The page served while the Space prepares its models: live progress instead of a dead port.

Pulling the models takes seconds; building what the first page serves on a fresh machine takes
minutes (the rest trains in the background once the Space is up).
Meanwhile this page shows the progress bars of whatever runs (the training child's stages and
epochs, read from its output; tqdm's live bars in this process: the training code needs no hook)
and the last log lines, refreshed every second. It reloads itself
into the real page as soon as that answers at the same address.

Example:
    >>> log = StartupLog.attach()
    >>> page = preparing_page(log)
    >>> page.launch(prevent_thread_lock=True)   # ... prepare the models ..., then page.close()
"""

from __future__ import annotations

import collections
import html
import json
import logging
import threading
import time
import urllib.request

import gradio as gr
from tqdm.std import tqdm

from space.trainer import Bar, running_bars

TITLE = "Compressed CNN surgery: preparing the models"
LOG_LINES = 6
LOGGERS = {"space", "training", "surgery", "nncf"}  # the start-up's own story, not the web server's
# Polls the address every second: once it serves another app (the real page), show that one. A plain
# browser interval, not a gr.Timer event: the page's own status events reach the real app once it
# has taken the port, fail there, and the timer's events may stop with them (CI saw a page that
# never reloaded).
RELOAD_WHEN_READY = f"""() => {{
  setInterval(() => fetch("config", {{cache: "no-store"}}).then(r => r.json())
    .then(c => {{ if (c.title && c.title !== {TITLE!r}) window.location.reload(); }}).catch(() => {{}}), 1000);
}}"""


class StartupLog(logging.Handler):
    """The last log lines of the start-up, for the page (thread-safe, bounded)."""

    def __init__(self, lines: int = LOG_LINES) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        self.records: collections.deque[str] = collections.deque(maxlen=lines)
        self.started = time.monotonic()
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.partition(".")[0] not in LOGGERS:
            return
        with self._guard:
            self.records.append(self.format(record))

    def lines(self) -> list[str]:
        with self._guard:
            return list(self.records)

    @classmethod
    def attach(cls) -> "StartupLog":
        handler = cls()
        logging.getLogger().addHandler(handler)
        return handler

    def detach(self) -> None:
        logging.getLogger().removeHandler(self)


def live_bars() -> list[Bar]:
    """The bars open now: the foreground training child's, then this process's tqdm bars, outermost first."""
    # tqdm's own registry of open bars (it positions nested bars by it); its lock guards it.
    with tqdm.get_lock():
        bars = sorted(tqdm._instances, key=lambda b: abs(getattr(b, "pos", 0)))
    return running_bars() + [Bar(str(b.desc or "working"), int(b.n), b.total,
                                 float(b.format_dict.get("elapsed", 0.0))) for b in bars if not b.disable]


def status_html(log: StartupLog) -> str:
    """The page's status block: elapsed time, one ``<progress>`` per live bar, the log tail."""
    rows = []
    for bar in live_bars():
        meter = (f'<progress value="{bar.n}" max="{bar.total}"></progress> {bar.n}/{bar.total}'
                 if bar.total else f"{bar.n}")
        rows.append(f"<li><b>{html.escape(bar.desc)}</b> {meter} ({bar.elapsed:.0f} s)</li>")
    elapsed = time.monotonic() - log.started
    log_tail = html.escape("\n".join(log.lines()))
    return (f'<div id="preparing-status"><p>Started {elapsed:.0f} s ago. This page opens the Space by '
            f"itself when the models are ready.</p><ul>{''.join(rows) or '<li>loading…</li>'}</ul>"
            f'<pre style="white-space: pre-wrap">{log_tail}</pre></div>')


def serves_the_space(url: str, timeout: float = 5) -> bool:
    """Whether ``url`` answers with the Space itself (not this page, not a closed port)."""
    try:
        with urllib.request.urlopen(f"{url}/config", timeout=timeout) as response:
            return json.load(response).get("title") not in (None, TITLE)
    except (OSError, ValueError):
        return False


def preparing_page(log: StartupLog) -> gr.Blocks:
    """A page with the live status; ``/status`` returns the same HTML to API clients."""
    with gr.Blocks(title=TITLE) as page:
        gr.Markdown("# Compressed CNN surgery\nThe models are being prepared: pulled from the Hub, "
                    "loaded from a local zoo, or, on a machine with neither, trained here: first "
                    "what the first page needs (a few minutes on 2 CPU cores), the rest in the "
                    "background once the Space is up.")
        status = gr.HTML(status_html(log))
        timer = gr.Timer(1.0)
        timer.tick(lambda: status_html(log), None, status, api_name="status", show_progress="hidden")
        page.load(None, js=RELOAD_WHEN_READY, api_visibility="private")
    return page
