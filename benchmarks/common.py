"""Shared benchmark helpers: median latency, thread settings, markdown tables."""

from __future__ import annotations

import os
import time
from typing import Callable, Mapping, Sequence

from graphopt import timing

THREADS = int(os.environ.setdefault("TVM_NUM_THREADS", "2"))


def set_threads() -> None:
    import torch

    torch.set_num_threads(THREADS)


def median_ms(fn: Callable[[], object], runs: int = 30, warmup: int = 3, budget_s: float = 20.0) -> float:
    """Median wall time of ``fn()`` in ms; stops early once ``budget_s`` is spent (slow baselines)."""
    return timing.median_ms(fn, runs, warmup, budget_s)


def interleaved_medians(runners: Mapping[str, Callable[[], object]], rounds: int = 3, runs: int = 20,
                        budget_s: float = 20.0) -> dict[str, float]:
    """Best of ``rounds`` medians per runner (ms), the runners taking turns in blocks.

    On a shared machine other load only ever adds time, and it comes and goes: taking
    turns spreads it over every runner, and the best median is the least noisy estimate.
    Blocks rather than single calls, with a pause between them, because ORT's and
    OpenMP's worker threads spin for a while after a parallel region and would steal
    the cores of whoever runs next."""
    best = {name: float("inf") for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            time.sleep(0.05)
            best[name] = min(best[name], median_ms(run, runs=runs, warmup=2, budget_s=budget_s / rounds))
    return best


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
