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
            warmup: int = 1) -> dict:
    """Median seconds per call of each function (same keys), after ``warmup`` unmeasured rounds."""
    times: dict = {name: [] for name in functions}
    for i in range(warmup + repeats):
        for name, fn in functions.items():
            start = clock()
            fn()
            if i >= warmup:
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}
