"""Autotuning with MetaSchedule into a persistent, shareable database.

    graphopt.compile(model, "x86", (x,), tune=Tune(trials=200, db="tuning-db"))

``graphopt.compile`` calls :func:`tuning_passes` and runs the two passes it returns after
legalization and fusion, before graphopt's own CPU schedule rules:

1. **tune** — extract one MetaSchedule task per fused PrimFunc, load the database, and
   measure what is still missing (below);
2. **apply** — ``MetaScheduleApplyDatabase``: every PrimFunc with a record gets the best
   measured schedule and the ``is_scheduled`` attribute, so the schedule rules leave it
   alone; PrimFuncs without records fall through to the rules.

Budget and reuse. ``trials`` is the number of measurements for the whole model; each task's
share is ``ceil(trials / tasks)``. A task is *done* when the database holds that many records
for its workload, or when an earlier run that finished normally tuned it with at least that
share (the search may exhaust a small kernel's space early). Only unfinished tasks are tuned,
for what they still lack, so compiling the same model again — or another model that shares
layers — measures nothing and costs about an untuned build; a run interrupted by Ctrl-C or a
crash resumes where its last persisted batch ended, re-measuring nothing.

Seeding with graphopt's rules. Before searching, each task that has no record yet
gets one measurement of the schedule graphopt's own rule (targets/cpu/schedules) gives it. The
rule's traced schedule is committed as an ordinary record, so (a) the evolutionary search
starts from it (MetaSchedule seeds its population with the database's best records), and (b)
``apply`` never picks a tuned kernel slower than the untuned build's: where the search found
nothing better, the rule's schedule wins.  Its time is also kept apart (``rule_baselines.json``):
a tuned kernel must beat it by ``RULE_MARGIN`` to be applied, since MetaSchedule times kernels
alone and warm, and the rules' schedules are made for kernels whose weights come from memory.

Measurements run locally, or on a device reached over TVM RPC (``Tune(rpc=RPC(key, tracker))``,
see targets/tuning/remote.py). Records land in the store (targets/tuning/store.py) after every batch.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from typing import Any

from graphopt.errors import TuningError
from graphopt.targets.registry import TargetSpec
from graphopt.targets.tuning.options import RPC, Tune, TuningLog
from graphopt.targets.tuning.store import TuningStore, mean_seconds

# TVM is imported inside the functions: ``graphopt.Tune`` must not cost TVM's import.

__all__ = ["RPC", "Tune", "TuningLog", "tuning_passes"]

# A tuned kernel replaces graphopt's rule schedule only when measured this much faster (see
# _Tuner.database_to_apply).
RULE_MARGIN = 0.10

def tuning_passes(mod: Any, spec: TargetSpec, tune: Tune, fusion: str = "tvm") -> list:
    """The passes ``graphopt.compile`` runs after fusion: tune into ``tune.db``, then apply it.

    ``mod`` (the lowered model) is not needed: the tasks are extracted from the fused module
    the passes see, which is exactly what gets built.
    """
    if not isinstance(tune, Tune):
        raise TuningError(f"tune= takes a graphopt.Tune, got {type(tune).__name__}")
    import tvm
    from tvm import relax

    # what can be checked before the build starts fails here as a TuningError (inside the
    # pipeline it would surface as a CompilationError)
    TuningStore(tune.db, spec.to_json())
    if tune.trials:
        from graphopt.targets.tuning import remote

        remote.check_measurable(spec, tune.rpc)
    tuner = _Tuner(spec, tune)

    @tvm.transform.module_pass(opt_level=0, name="graphopt.MetaScheduleTune")
    def _tune(m, _ctx):
        tuner.run(m)
        return m

    @tvm.transform.module_pass(opt_level=0, name="graphopt.MetaScheduleApply")
    def _apply(m, _ctx):
        with tuner.database_to_apply():
            return relax.transform.MetaScheduleApplyDatabase()(m)

    return [_tune, _apply]


# ------------------------------------------------------------------------------ the tuner
class _Tuner:
    def __init__(self, spec: TargetSpec, tune: Tune):
        self.spec, self.tune, self.log = spec, tune, tune.log
        from tvm.s_tir import meta_schedule as ms

        self.database = ms.database.MemoryDatabase(module_equality="structural")
        self.rule_baselines: dict[int, float] = {}

    def database_to_apply(self):
        """The best record of each workload, except where it beats graphopt's rule schedule by
        less than ``RULE_MARGIN``: those kernels are left to the rules.

        MetaSchedule measures each candidate alone, warm, and built without graphopt's TIR
        passes; the rule schedules are designed for the kernel as it runs in the model, where
        its weights come from memory (streamed reductions, software prefetch: prefetch.py).
        A candidate a few percent faster alone was slower in the model: mobilenet_v2 tuned
        with 8 trials per task ran 2.03 ms against 1.93 untuned."""
        from tvm.s_tir import meta_schedule as ms

        chosen = ms.database.MemoryDatabase(module_equality="structural")
        best: dict[int, Any] = {}
        for rec in self.database.get_all_tuning_records():
            if not rec.run_secs:
                continue
            h = _hash_mod(rec.workload.mod)
            if h not in best or mean_seconds(rec.run_secs) < mean_seconds(best[h].run_secs):
                best[h] = rec
        for h, rec in best.items():
            baseline = self.rule_baselines.get(h)
            if baseline is not None and mean_seconds(rec.run_secs) * (1 + RULE_MARGIN) > baseline:
                continue
            workload = chosen.commit_workload(rec.workload.mod)
            chosen.commit_tuning_record(ms.database.TuningRecord(rec.trace, workload, rec.run_secs,
                                                                 rec.target, rec.args_info))
        return chosen

    def run(self, mod: Any) -> None:
        from tvm.s_tir import meta_schedule as ms

        from graphopt.targets.tuning import remote
        from graphopt.targets.tuning.progress import Progress, estimate_ms

        started = time.perf_counter()
        target = self.spec.tvm_target()
        tasks = [t for t in ms.relax_integration.extract_tasks(mod, target)
                 if not t.mod.attrs.get("tirx.is_scheduled", False)]
        store = TuningStore(self.tune.db, self.spec.to_json())
        log = self.log
        log.__init__(database=store.path, tasks=len(tasks))  # reset: one Tune may serve several compiles
        if not tasks:
            log.records_loaded = store.load(self.database)
            return
        share = math.ceil(self.tune.trials / len(tasks)) if self.tune.trials else 0
        done = store.done_tasks()
        hashes = [_shash(t) for t in tasks]
        # Nothing to tune (every task finished with this budget or more): the best record of
        # each task is all that will be applied, so only those are read.
        reuse_only = all(done.get(h, -1) >= share for h in hashes) or share == 0
        log.records_loaded = store.load(self.database, workloads=set(hashes), best_only=reuse_only)
        counts = self._record_counts(tasks)
        todo = [i for i, h in enumerate(hashes) if counts[i] < share and done.get(h, -1) < share]
        log.tasks_done_before = len(tasks) - len(todo)
        if todo:
            builder, runner = remote.builder_for(self.spec, self.tune.rpc), remote.runner_for(self.spec, self.tune.rpc)
            progress = Progress(self, tasks, store, total=sum(share - counts[i] for i in todo), started=started)
            # Ctrl-C: what was measured is on disk, nothing is marked done, and KeyboardInterrupt
            # is raised here, after the search has returned (targets/tuning/progress.py).
            with progress.deferred_interrupt():
                try:
                    if self.tune.seed_with_rules and self.spec.is_cpu:
                        fresh = [i for i in todo if counts[i] == 0]
                        baselines = self._measure_rule_baselines([tasks[i] for i in fresh], target, builder, runner)
                        progress.add(baselines)
                        store.add_rule_baselines({_hash_mod(r.workload.mod): mean_seconds(r.run_secs)
                                                  for r in baselines})
                        counts = self._record_counts(tasks)
                    remaining = {i: share - counts[i] for i in todo if counts[i] < share}
                    if remaining and not log.interrupted:
                        self._search([tasks[i] for i in remaining], remaining.values(), builder, runner, progress)
                finally:
                    progress.close()
            store.mark_done([hashes[i] for i in todo], share)
        self.rule_baselines = store.rule_baselines()
        log.best_ms = estimate_ms(self.database, tasks)
        log.tuning_s = time.perf_counter() - started

    def _record_counts(self, tasks: list) -> list[int]:
        """Records (failed measurements included: they were paid for) per task."""
        by_hash: dict[int, int] = {}
        for rec in self.database.get_all_tuning_records():
            h = _hash_mod(rec.workload.mod)
            by_hash[h] = by_hash.get(h, 0) + 1
        return [by_hash.get(_shash(t), 0) for t in tasks]

    def _measure_rule_baselines(self, tasks: list, target: Any, builder: Any, runner: Any) -> list:
        """One measured record per task: the schedule graphopt's rules give it (see module doc)."""
        from tvm.s_tir import meta_schedule as ms

        from graphopt.targets.tuning.progress import FAILED_SECS
        seeds = []
        for task in tasks:
            sch = _rule_schedule(task.dispatched[0], target)
            if sch is not None:
                seeds.append((task, sch))
        if not seeds:
            return []
        built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in seeds])
        records, to_run = [], []
        for (task, sch), result in zip(seeds, built):
            # The arguments of the kernel as built: a weight the rule reads pre-packed (its
            # layout-rewrite block, which the builder strips) has the packed shape.
            args = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
            if result.error_msg is None:
                to_run.append((task, sch, args, result.artifact_path))
        device = "cuda" if target.kind.name == "cuda" else "cpu"
        futures = runner.run([ms.runner.RunnerInput(path, device, args) for _, _, args, path in to_run])
        for (task, sch, args, path), future in zip(to_run, futures):
            res = future.result()
            secs = [float(s) for s in res.run_secs] if res.error_msg is None and res.run_secs else [FAILED_SECS]
            workload = self.database.commit_workload(task.dispatched[0])
            records.append(ms.database.TuningRecord(sch.trace, workload, secs, target, args))
            shutil.rmtree(_artifact_dir(path), ignore_errors=True)
        for rec in records:
            self.database.commit_tuning_record(rec)
        return records

    def _search(self, tasks: list, remaining, builder: Any, runner: Any, progress: Any) -> None:
        from tvm.s_tir import meta_schedule as ms

        remaining = list(remaining)
        work_dir = tempfile.mkdtemp(prefix="graphopt-tune-")
        _register_tensor_intrinsics(self.spec)
        try:
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                tasks, work_dir, seed=self.tune.seed,
                strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=self.tune.population,
                    init_min_unmeasured=min(50, self.tune.population // 2)))
            _quiet_loggers()
            # Round robin, not MetaSchedule's gradient scheduler: that one collects no result
            # until it has searched every task once, so the records of a run with a few trials
            # per task would all wait in memory until its end.  Round robin collects each batch at
            # its next step (the runner returns it measured: remote.MeasureInTurn); every task
            # gets its own share of trials either way (max_trials_per_task).
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=work_dir,
                max_trials_global=sum(remaining), max_trials_per_task=max(remaining),
                num_trials_per_iter=self.tune.trials_per_iter, builder=builder, runner=runner,
                database=self.database, task_scheduler="round-robin",
                measure_callbacks=[ms.measure_callback.AddToDatabase(), progress.callback(),
                                   ms.measure_callback.RemoveBuildArtifact(), ms.measure_callback.UpdateCostModel()])
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)


def _register_tensor_intrinsics(spec: TargetSpec) -> None:
    """Register the tensor intrinsics a CPU search can use, without TVM's CUDA ones.

    MetaSchedule's TuneContext runs ``import tvm.s_tir.tensor_intrin``, whose ``__init__``
    also parses ~250 CUDA intrinsics written in TVMScript: 60-100 s of CPU on this kind of
    machine, per tuning process, for nothing on a CPU target. For CPU targets we register
    the package without running its ``__init__`` and import the x86 and ARM intrinsics
    (VNNI, dot-product: what CPU tensorization rules look up) ourselves; a later
    ``from tvm.s_tir.tensor_intrin.cuda import ...`` still works, as the package path is real.
    """
    import importlib
    import os
    import sys
    import types

    import tvm.s_tir as s_tir

    name = "tvm.s_tir.tensor_intrin"
    if spec.kind == "cuda" or name in sys.modules:
        return
    package = types.ModuleType(name, "Intrinsics for tensorization (CPU subset, registered by graphopt).")
    package.__path__ = [os.path.join(os.path.dirname(s_tir.__file__), "tensor_intrin")]
    package.__package__ = name
    sys.modules[name] = package
    s_tir.tensor_intrin = package
    for sub in ("x86", "arm_cpu"):
        importlib.import_module(f"{name}.{sub}")


def _rule_schedule(workload: Any, target: Any):
    """The traced schedule graphopt's rules give ``workload`` (the builds' dispatch), or None."""
    from graphopt.targets.cpu.schedules import dispatch

    chosen = dispatch(workload["main"], target)
    return chosen.schedule if chosen is not None else None


def _hash_mod(mod: Any) -> int:
    import tvm_ffi

    return int(tvm_ffi.structural_hash(mod))


def _shash(task: Any) -> int:
    return _hash_mod(task.dispatched[0])


def _artifact_dir(path: str) -> str:
    import os

    return os.path.dirname(path)


def _quiet_loggers() -> None:
    # MetaSchedule prints a table per task per round to the console; the progress bar says it all.
    import logging

    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)

