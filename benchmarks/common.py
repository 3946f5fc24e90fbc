"""Shared benchmark helpers: median latency, thread settings, markdown tables."""

from __future__ import annotations

import os
from typing import Callable, Sequence

from graphopt import timing

THREADS = int(os.environ.setdefault("TVM_NUM_THREADS", "2"))


def set_threads() -> None:
    import torch

    torch.set_num_threads(THREADS)


def median_ms(fn: Callable[[], object], runs: int = 30, warmup: int = 3, budget_s: float = 20.0) -> float:
    """Median wall time of ``fn()`` in ms; stops early once ``budget_s`` is spent (slow baselines)."""
    return timing.median_ms(fn, runs, warmup, budget_s)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
