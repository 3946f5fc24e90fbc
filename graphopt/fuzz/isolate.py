"""Checking models in a child process, so a crash of the process itself is a finding too.

A miscompiled kernel can kill the process (SIGILL from an instruction the CPU lacks,
SIGSEGV from an out-of-bounds store) instead of raising. :class:`IsolatedChecker` runs
``check_spec`` in a worker process (one, reused while it lives); when the worker dies,
the batch is re-checked model by model and stage by stage in fresh workers, and a
model and stage that kill two workers in a row are reported as a ``crash`` failure naming its seed and
stage ("process killed").
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Sequence

from graphopt.fuzz.generator import GraphSpec
from graphopt.fuzz.harness import Failure, Stage, check_spec


class IsolatedChecker:
    """``checker(specs, stages) -> failures``, like check_spec, but in a worker process."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def _submit(self, specs: Sequence[GraphSpec], stages: Sequence[Stage]) -> list[Failure]:
        if self._pool is None:
            # spawn, not fork: TVM's and torch's thread pools do not survive a fork
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self._pool.submit(check_spec, list(specs), list(stages)).result()
        except BrokenProcessPool:
            self.close()
            raise

    def __call__(self, specs: "GraphSpec | Sequence[GraphSpec]", stages: Sequence[Stage]) -> list[Failure]:
        specs = [specs] if isinstance(specs, GraphSpec) else list(specs)
        try:
            return self._submit(specs, stages)
        except BrokenProcessPool:
            pass
        failures: list[Failure] = []
        for spec in specs:
            for stage in stages:
                try:
                    failures.extend(self._submit([spec], [stage]))
                    continue
                except BrokenProcessPool:
                    pass
                try:  # confirm: a worker can also die of something else (the OOM killer on a busy machine)
                    failures.extend(self._submit([spec], [stage]))
                except BrokenProcessPool:
                    failures.append(Failure(spec.seed, stage.name, "crash",
                                            "the process was killed (e.g. SIGILL/SIGSEGV in a compiled kernel) "
                                            "while checking this stage", spec))
        return failures

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
