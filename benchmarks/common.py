"""Shared benchmark helpers: median latency, thread settings, markdown tables."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Sequence

THREADS = int(os.environ.setdefault("TVM_NUM_THREADS", "2"))


def set_threads() -> None:
    import torch

    torch.set_num_threads(THREADS)


def median_ms(fn: Callable[[], object], runs: int = 30, warmup: int = 3, budget_s: float = 20.0) -> float:
    """Median wall time of ``fn()`` in ms; stops early once ``budget_s`` is spent (slow baselines)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
