"""Progress of a tuning run: persisting each measured batch, the progress bar, the time budget.

MetaSchedule calls a measure callback after every batch of measurements (16 by default).
``Progress.callback()`` is that callback: it writes the batch's records to the on-disk store
at once (so an interrupted run loses at most the batch in flight), advances the tqdm bar —
trials done / total, the estimated model latency from the best record of every task so far,
and tqdm's ETA — and, past ``Tune.time_budget`` or after Ctrl-C, terminates every task so the
search stops after the current batch.

Ctrl-C is deferred (``Progress.deferred_interrupt``): MetaSchedule's search runs in C++ and calls
back into Python for every build, measurement and callback, and a KeyboardInterrupt raised in one
of those callbacks crashed the process (std::terminate) instead of stopping it.  The handler only
notes the request; the callback stops the search after the batch in flight (whose records are
saved), and KeyboardInterrupt is raised once the search has returned.  A second Ctrl-C raises at
once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Any

from tvm.s_tir import meta_schedule as ms
from tvm.ir.utils import derived_object

FAILED_SECS = 1e10  # what MetaSchedule records as the latency of a failed measurement


def best_secs(database: Any, workload_mod: Any) -> float | None:
    """Mean latency of the best valid record of a workload, or None."""
    if not database.has_workload(workload_mod):
        return None
    top = database.get_top_k(database.commit_workload(workload_mod), 1)
    if not top:
        return None
    secs = [float(s) for s in top[0].run_secs]
    best = sum(secs) / len(secs)
    return None if best >= FAILED_SECS else best


def estimate_ms(database: Any, tasks: list) -> float | None:
    """Sum over tasks of weight x best measured latency, in ms (None until every task has one)."""
    total = 0.0
    for task in tasks:
        best = best_secs(database, task.dispatched[0])
        if best is None:
            return None
        total += task.weight * best
    return total * 1e3


class _Bar:
    """tqdm when it is installed, else one line per update on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.n, self.desc, self.enabled = total, 0, desc, enabled
        self._tqdm = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._tqdm = tqdm(total=total, desc=desc, unit="trial", file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int, postfix: str) -> None:
        self.n += n
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(postfix, refresh=False)
            self._tqdm.update(n)
        elif self.enabled:
            print(f"{self.desc}: {self.n}/{self.total} trials, {postfix}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


class Progress:
    def __init__(self, tuner: Any, tasks: list, store: Any, total: int, started: float):
        self.database, self.log, self.tune = tuner.database, tuner.log, tuner.tune
        self.tasks, self.store = tasks, store
        self.deadline = started + self.tune.time_budget if self.tune.time_budget else None
        self.bar = _Bar(total, f"tuning {len(tasks)} tasks", self.tune.progress)

    def _postfix(self) -> str:
        best = estimate_ms(self.database, self.tasks)
        if best is not None:
            return f"best {best:.3f} ms"
        measured = sum(best_secs(self.database, t.dispatched[0]) is not None for t in self.tasks)
        return f"best n/a ({measured}/{len(self.tasks)} tasks measured)"

    def add(self, records: list, *, baseline: bool = True) -> None:
        """Persist ``records`` (already in the in-memory database) and count them."""
        self.store.append(records)
        if baseline:
            self.log.baselines_measured += len(records)
        else:
            self.log.trials_measured += len(records)
        self.bar.update(len(records), self._postfix())

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    @contextlib.contextmanager
    def deferred_interrupt(self):
        """Ctrl-C inside the block sets ``log.interrupted`` (the search stops after its batch)
        and raises KeyboardInterrupt when the block ends (module doc)."""
        previous = signal.getsignal(signal.SIGINT)
        # Only the main thread may set handlers; an ignored SIGINT (a background job) stays ignored.
        if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
            yield
            return

        def note(signum, frame):
            if self.log.interrupted:  # the second Ctrl-C: now
                raise KeyboardInterrupt
            self.log.interrupted = True
            print("\ngraphopt: stopping after the batch being measured (Ctrl-C again to stop now)",
                  file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, note)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if self.log.interrupted:
            # Crossing TVM's pass infrastructure turns this into a RuntimeError; api.compile
            # raises KeyboardInterrupt again from the log's flag.
            raise KeyboardInterrupt

    def callback(self) -> Any:
        return _PersistRecords(self)

    def close(self) -> None:
        self.bar.close()


@derived_object
class _PersistRecords(ms.measure_callback.PyMeasureCallback):
    """Runs right after MetaSchedule's AddToDatabase: the same records, written to disk."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        ctx = task_scheduler.tasks_[task_id].ctx
        database = self.progress.database
        workload = database.commit_workload(ctx.mod)
        records = []
        for cand, res in zip(measure_candidates, runner_results):
            secs = [float(s) for s in res.run_secs] if res.error_msg is None and res.run_secs else [FAILED_SECS]
            records.append(ms.database.TuningRecord(cand.sch.trace, workload, secs, ctx.target, cand.args_info))
        self.progress.add(records, baseline=False)
        log = self.progress.log
        if self.progress.out_of_time() or log.interrupted:
            log.stopped_by_time_budget = not log.interrupted
            for i, task in enumerate(task_scheduler.tasks_):
                if not task.is_terminated:
                    task_scheduler.terminate_task(i)
