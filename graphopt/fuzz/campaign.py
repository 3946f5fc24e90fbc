"""A fuzzing campaign: generate models, check them, minimize and report each failure.

The checking itself is :mod:`graphopt.fuzz.harness`; this module drives it over many seeds,
optionally in a worker process (:mod:`graphopt.fuzz.isolate`) so a crashing kernel is a
finding rather than the end of the run, and shrinks failures with :mod:`graphopt.fuzz.minimize`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from graphopt.fuzz.generator import GraphSpec, generate
from graphopt.fuzz.harness import Failure, Stage, check_spec, default_stages
from graphopt.fuzz.isolate import IsolatedChecker
from graphopt.fuzz.minimize import minimize


def minimize_failure(failure, stages: Sequence, checker: Callable | None = None) -> GraphSpec:
    """Minimize ``failure.spec`` for the stage it failed in; ``checker`` defaults to check_spec."""
    checker = checker or check_spec
    stage = next((s for s in stages if s.name == failure.stage), None)
    needed = [stage] if stage is not None else []

    def still_fails(candidate: GraphSpec) -> bool:
        return any(f.stage == failure.stage and f.kind == failure.kind for f in checker(candidate, needed))

    return minimize(failure.spec, still_fails)


@dataclass
class Report:
    graphs: int = 0
    ops: int = 0
    seconds: float = 0.0
    stages: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"fuzzed {self.graphs} graphs ({self.ops} ops) through {len(self.stages)} stages "
                 f"in {self.seconds:.1f} s: {len(self.failures)} failure(s)"]
        by_stage: dict[str, int] = {}
        for f in self.failures:
            by_stage[f.stage] = by_stage.get(f.stage, 0) + 1
        for stage, n in sorted(by_stage.items()):
            lines.append(f"  {stage}: {n}")
        return "\n".join(lines)


def fuzz(graphs: int, seed: int = 0, stages: Sequence[Stage] | None = None, *, max_ops: int = 10,
         batch: int = 8, minimize: bool = True, isolate: bool = False,
         log: Callable[[str], None] | None = print) -> Report:
    """Generate ``graphs`` models (seeds ``seed``, ``seed+1``, ...) and check each in ``stages``,
    ``batch`` models per capture and build.

    Each failure is minimized (unless ``minimize=False``) and logged with its reproducer.
    ``isolate=True`` checks in a worker process (graphopt.fuzz.isolate), so a model whose
    compiled code kills the process is reported instead of ending the campaign.
    """
    checker: Callable[..., list[Failure]] = check_spec
    if isolate:
        checker = IsolatedChecker()

    stages = list(stages) if stages is not None else default_stages()
    report = Report(stages=[s.name for s in stages])
    start = time.perf_counter()
    for first in range(seed, seed + graphs, batch):
        specs = [generate(s, max_ops=max_ops) for s in range(first, min(first + batch, seed + graphs))]
        report.graphs += len(specs)
        report.ops += sum(len(spec.ops) for spec in specs)
        for failure in checker(specs, stages):
            if minimize:
                failure.minimized = minimize_failure(failure, stages, checker)
            report.failures.append(failure)
            if log:
                log(failure.reproducer())
        if log and report.graphs % 50 < batch:
            log(f"... {report.graphs} graphs, {len(report.failures)} failure(s), "
                f"{time.perf_counter() - start:.0f} s")
    report.seconds = time.perf_counter() - start
    if isolate:
        checker.close()
    return report
