"""What every benchmark here shares: the clocks, and medians of calls interleaved round-robin.

Calls alternate round-robin, so a change in machine load hits every function alike; the
medians are then comparable within one run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

# cpu: process CPU time, steadier than wall time on a machine shared with other jobs.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(functions: dict, repeats: int, clock: Callable[[], float] = time.perf_counter,
            warmup: int = 1, sync: Callable[[], None] | None = None) -> dict:
    """Median seconds per call of each function (same keys), after ``warmup`` unmeasured rounds.

    ``sync`` runs inside each timed call's end (``torch.cuda.synchronize`` for GPU work, which
    returns before the GPU has finished; see :func:`synchronizer`).
    """
    times: dict = {name: [] for name in functions}
    for i in range(warmup + repeats):
        for name, fn in functions.items():
            start = clock()
            fn()
            if sync is not None:
                sync()
            if i >= warmup:
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def synchronizer(device) -> Callable[[], None] | None:
    """What ``measure(sync=...)`` needs for work on ``device``: a CUDA synchronize, or None on the CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)
