"""Timing repeated calls: the one loop behind ``graphopt bench``, explore and the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_calls(fn: Callable[[], object], runs: int = 30, warmup: int = 3, budget_s: float | None = None,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds (by ``clock``) of each of up to ``runs`` calls of ``fn()`` after ``warmup`` calls.

    With ``budget_s``, stops early once that much wall time is spent (but after at least 3
    calls), so a slow baseline cannot stall a benchmark.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs and (budget_s is None or len(times) < 3 or time.perf_counter() - start < budget_s):
        t = clock()
        fn()
        times.append(clock() - t)
    return times


def median_ms(fn: Callable[[], object], runs: int = 30, warmup: int = 3, budget_s: float | None = None,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Median of :func:`time_calls` in milliseconds."""
    return statistics.median(time_calls(fn, runs, warmup, budget_s, clock)) * 1e3
