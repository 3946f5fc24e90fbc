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


def cpu_model_name() -> str:
    """The host CPU's marketing name, from /proc/cpuinfo (``model name`` on x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def host_banner(target: str = "x86") -> str:
    """One line naming the host CPU, its vector ISA tier and the target the tables were built for;
    printed above every table, since numbers mean little without the machine they came from."""
    from graphopt.targets.registry import resolve_target, vector_isa

    host = vector_isa("x86" if os.uname().machine == "x86_64" else "arm64")
    spec = resolve_target(target)
    line = f"host: {cpu_model_name()}, {os.cpu_count()} cores, ISA tier {host}"
    if spec.is_cpu:
        line += f"; target {spec.name}: {vector_isa(spec)}"
    else:
        line += f"; target {spec.name}"
    return line
