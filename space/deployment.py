"""The Models tab's deployed columns: each variant's OpenVINO size and speed on the Space's own machine.

The figures come from :func:`hub_export.openvino.deployed_figures` (export, measure, cache on disk
by weights hash). The first request for a family starts measuring in one background thread and
shows the cells empty ("measuring"); later requests show what is done, so the tab never waits
for a conversion. FP32 controls (seeds, another recipe) get no columns of their own: they deploy
exactly as FP32.

Example:
    >>> columns = DeploymentColumns(session)
    >>> cells, note = columns.cells("resnet18-shapes")   # {variant: [...]} and a sentence naming the machine
"""

from __future__ import annotations

import copy
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from hub_export import openvino
from space.session import Session
from surgery.variants import parse_variant

logger = logging.getLogger(__name__)

HEADERS = ["OpenVINO weights", "OpenVINO size (MB)", "OpenVINO latency, batch 1 (ms)",
           "OpenVINO throughput, batch 32 (images/s)", "OpenVINO agrees with PyTorch"]
DATATYPES = ["str", "number", "number", "number", "number"]


class DeploymentColumns:
    """Deployed figures per variant of the session's families, measured lazily in the background."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openvino-export")
        self._futures: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()

    def cells(self, family: str) -> tuple[dict[str, list], str]:
        """``{variant: [cells for HEADERS]}`` (None where not measured yet) and a note for the page."""
        zoo = self.session.zoo(family)
        cells, pending, failed, machine = {}, 0, 0, None
        for name in zoo.variants:
            cells[name] = [None] * len(HEADERS)
            if parse_variant(name).is_control:
                continue
            future = self._future(family, name)
            if not future.done():
                pending += 1
            elif future.exception() is not None:
                failed += 1
            else:
                figures = future.result()
                machine = figures["machine"]
                cells[name] = [figures["stored_weights"], round(figures["deployable_bytes"] / 1e6, 2),
                               _round(figures["latency_ms"], 2), _round(figures["throughput"], 1),
                               _round(figures["agreement_with_pytorch"], 4)]
        return cells, _note(machine, pending, failed)

    def _future(self, family: str, name: str) -> Future:
        with self._lock:
            if (family, name) not in self._futures:
                self._futures[family, name] = self._executor.submit(self._measure, family, name)
            return self._futures[family, name]

    def _measure(self, family: str, name: str) -> dict[str, Any]:
        config = self.session.zoo(family).variants[name].config
        report = openvino.cached_report(config, self.session.cache_dir)
        if report is None:
            with self.session.model(family, name) as model:  # a private copy: requests keep the shared one
                private = copy.deepcopy(model)
            try:
                report = openvino.deployed_figures(private, config, self.session.cache_dir)
            except Exception:
                logger.exception("OpenVINO export of %s/%s failed", family, name)
                raise
        return openvino.summary(report)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def _note(machine: str | None, pending: int, failed: int) -> str:
    parts = []
    if machine:
        parts.append(f"OpenVINO {openvino.OPENVINO_VERSION} columns measured on this Space's machine: {machine}. "
                     "Size: the IR's `model.bin`, zipped for sparse variants (the zeros compress).")
    if pending:
        parts.append(f"Measuring {pending} variant(s) with OpenVINO in the background; reload the tab to see them.")
    if failed:
        parts.append(f"OpenVINO export failed for {failed} variant(s); the details are in the server log.")
    return " ".join(parts)
