"""MetaSchedule autotuning into a persistent database (targets/tuning/).

Specification:
* a tuned compile measures graphopt's rule schedule of each task once, then searches; the
  result matches eager, and every measurement is a record in the database folder (in TVM's
  own JSONDatabase format);
* compiling the same model again measures nothing and applies the stored records;
* a tuning run killed mid-way keeps what it measured and the next run measures only what is
  missing; every batch is on disk before the next is measured; Ctrl-C stops the search after
  the batch in flight and raises KeyboardInterrupt (no crash);
* two processes writing one database lose no record and never mix up workloads; a torn last
  line (a writer killed mid-append) is dropped, not fatal.
Tiny models and a few trials keep this fast (the search itself is MetaSchedule's).
"""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import graphopt
from graphopt.errors import TuningError
from graphopt.testing import assert_close, assert_matches_eager
from graphopt.targets.tuning.tuner import RPC, Tune

SMALL = dict(population=16, trials_per_iter=2, progress=False)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU()).eval()


def three_task_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48),
                               torch.nn.Tanh(), torch.nn.Linear(48, 8)).eval()


def record_lines(db: str) -> list[list]:
    (path,) = glob.glob(os.path.join(db, "*", "database_tuning_record.json"))
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def records_on_disk(db: str) -> int:
    """How many records the database folder holds (0 before its first record)."""
    return len(record_lines(db)) if glob.glob(os.path.join(db, "*", "database_tuning_record.json")) else 0


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    db = str(tmp_path_factory.mktemp("tuning") / "db")
    model, x = tiny_model(), torch.randn(1, 32)
    tune = Tune(trials=4, db=db, **SMALL)
    module = graphopt.compile(model, "x86", (x,), tune=tune)
    return model, x, db, tune.log, module


def test_tuned_module_matches_eager(tuned):
    model, x, _, _, module = tuned
    assert_matches_eager(module(x), model, (x,))


def test_every_measurement_is_a_record_on_disk(tuned):
    _, _, db, log, _ = tuned
    assert log.tasks == 1 and log.tasks_done_before == 0
    assert log.baselines_measured == 1  # the rule schedule, measured first
    assert log.trials_measured >= 1
    assert len(record_lines(db)) == log.measured
    assert log.best_ms is not None and log.best_ms > 0


def test_database_is_tvm_json_format(tuned):
    from tvm.s_tir import meta_schedule as ms

    _, _, db, log, _ = tuned
    (folder,) = glob.glob(os.path.join(db, "*"))
    tvm_db = ms.database.JSONDatabase(os.path.join(folder, "database_workload.json"),
                                      os.path.join(folder, "database_tuning_record.json"))
    assert len(tvm_db) == log.measured


def test_second_compile_measures_nothing(tuned):
    model, x, db, _, first = tuned
    before = record_lines(db)
    tune = Tune(trials=4, db=db, **SMALL)
    module = graphopt.compile(model, "x86", (x,), tune=tune)
    assert tune.log.measured == 0
    assert tune.log.tasks_done_before == tune.log.tasks == 1
    # nothing to tune: only the best record of each task is read (the one that is applied)
    assert len(before) > 1 and tune.log.records_loaded == tune.log.tasks
    assert record_lines(db) == before
    assert_close(module(x), first(x), "exact")


def test_records_are_kept_per_target(tuned):
    from graphopt.targets.registry import resolve_target
    from graphopt.targets.tuning.store import target_key

    _, _, db, _, _ = tuned
    folders = [os.path.basename(p) for p in glob.glob(os.path.join(db, "*"))]
    assert folders == [target_key(resolve_target("x86").to_json())]
    assert target_key(resolve_target("x86-avx2").to_json()) != folders[0]


def test_bad_settings_are_tuning_errors(tmp_path):
    with pytest.raises(TuningError, match="trials"):
        Tune(trials=-1)
    with pytest.raises(TuningError, match="KEY@HOST:PORT"):
        Tune(rpc="no-tracker")
    assert Tune(rpc="rpi4@127.0.0.1:9190").rpc == RPC("rpi4", "127.0.0.1:9190")
    (tmp_path / "file").write_text("")
    with pytest.raises(TuningError, match="is a file"):
        graphopt.compile(tiny_model(), "x86", (torch.randn(1, 32),), tune=Tune(db=str(tmp_path / "file")))


def test_aarch64_target_without_rpc_says_how_to_measure(tmp_path):
    with pytest.raises(TuningError, match="over RPC"):
        graphopt.compile(tiny_model(), "arm64", (torch.randn(1, 32),), tune=Tune(db=str(tmp_path / "db"), **SMALL))


_TUNE_SCRIPT = textwrap.dedent("""
    import signal, sys, torch, graphopt
    # as in a terminal (a background job, e.g. under CI, would start with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    import test_tuning
    graphopt.compile(test_tuning.{model}(), "x86", (torch.randn({batch}, 32),),
                     tune=graphopt.Tune(trials={trials}, db={db!r}, **test_tuning.SMALL))
""")


def _tune_in_a_process(db: str, model: str, batch: int, trials: int, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    script = _TUNE_SCRIPT.format(tests=os.path.dirname(__file__), model=model, batch=batch, trials=trials, db=db)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def _signal_once_recorded(proc: subprocess.Popen, db: str, records: int, sig: int) -> None:
    """Send ``sig`` to the tuning process once the database holds ``records`` records."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if records_on_disk(db) >= records:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the tuning run finished before it could be interrupted"
    proc.send_signal(sig)


def test_each_batch_is_on_disk_before_the_next_is_measured(tmp_path, monkeypatch):
    """Also while the search is still on its first pass over the tasks (MetaSchedule's
    gradient scheduler kept every result of that pass in memory until its end)."""
    from graphopt.targets.tuning import remote

    db = str(tmp_path / "db")
    on_disk, measured = [], []
    measure = remote.MeasureInTurn._cls.run  # the Python class behind TVM's object

    def run(self, inputs):
        on_disk.append(records_on_disk(db))
        measured.append(len(inputs))
        return measure(self, inputs)

    monkeypatch.setattr(remote.MeasureInTurn._cls, "run", run)
    tune = Tune(trials=12, db=db, **SMALL)
    graphopt.compile(three_task_model(), "x86", (torch.randn(2, 32),), tune=tune)
    assert tune.log.tasks == 3
    assert measured[0] == 3  # the rule baselines, one batch
    searched = [i for i, n in enumerate(measured) if n]
    assert len(searched) >= 4  # the baselines and at least one batch per task
    for i in searched:
        assert on_disk[i] >= sum(measured[:i]), (on_disk, measured)


@pytest.mark.slow
def test_killed_run_resumes_without_remeasuring(tmp_path):
    db, trials = str(tmp_path / "db"), 8
    proc = _tune_in_a_process(db, "tiny_model", 1, trials)
    try:
        _signal_once_recorded(proc, db, 3, signal.SIGKILL)  # a crash: no cleanup code runs
    finally:
        proc.wait()
    measured_before = record_lines(db)
    assert 3 <= len(measured_before) < trials

    tune = Tune(trials=trials, db=db, **SMALL)
    graphopt.compile(tiny_model(), "x86", (torch.randn(1, 32),), tune=tune)
    after = record_lines(db)
    assert after[:len(measured_before)] == measured_before  # nothing lost
    assert tune.log.records_loaded == len(measured_before)
    assert tune.log.baselines_measured == 0  # the rule baseline was measured before the kill
    # only what was missing was measured (MetaSchedule may round up to a whole batch)
    todo = trials - len(measured_before)
    assert todo <= tune.log.measured <= todo + SMALL["trials_per_iter"]


@pytest.mark.slow
def test_ctrl_c_stops_after_the_batch_in_flight_and_keeps_every_record(tmp_path):
    db, trials = str(tmp_path / "db"), 12
    proc = _tune_in_a_process(db, "three_task_model", 2, trials, stderr=subprocess.PIPE)
    try:
        # the 3 rule baselines and the first searched batch are on disk: the search is under way
        _signal_once_recorded(proc, db, 5, signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode in (130, -signal.SIGINT), err[-2000:]  # KeyboardInterrupt, not a crash
    assert "KeyboardInterrupt" in err and "Segfault" not in err
    measured_before = record_lines(db)
    assert 5 <= len(measured_before) < trials

    tune = Tune(trials=trials, db=db, **SMALL)
    graphopt.compile(three_task_model(), "x86", (torch.randn(2, 32),), tune=tune)
    assert record_lines(db)[:len(measured_before)] == measured_before
    assert tune.log.records_loaded == len(measured_before) and tune.log.baselines_measured == 0
    assert tune.log.trials_measured >= 1 and not tune.log.interrupted


_WRITER_SCRIPT = textwrap.dedent("""
    import sys, time
    import tvm
    from tvm import te, s_tir
    from tvm.s_tir import meta_schedule as ms
    from graphopt.targets.tuning.store import TuningStore

    writer, db = int(sys.argv[1]), sys.argv[2]
    target = tvm.target.Target("llvm")

    def workload(n):
        a = te.placeholder((n,), name="a")
        return tvm.IRModule({"main": te.create_prim_func([a, te.compute((n,), lambda i: a[i] * 2.0, name="b")])})

    store = TuningStore(db, {"tvm": {"kind": "llvm"}})
    mem = ms.database.MemoryDatabase()
    # workload 8 is shared by both writers; 16 + writer is this writer's own
    mods = {8: workload(8), 16 + writer: workload(16 + writer)}
    for k in range(12):
        for n, mod in mods.items():
            wl = mem.commit_workload(mod)
            args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
            # the latency encodes (writer, workload size, k): the reader checks every record's workload
            secs = [writer + n * 1e-3 + k * 1e-6]
            store.append([ms.database.TuningRecord(s_tir.Schedule(mod).trace, wl, secs, target, args)])
        time.sleep(0.01)
""")


def test_two_writers_lose_no_record(tmp_path):
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.tuning.store import TuningStore

    db = str(tmp_path / "db")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER_SCRIPT, str(w), db]) for w in (1, 2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    mem = ms.database.MemoryDatabase()
    assert TuningStore(db, {"tvm": {"kind": "llvm"}}).load(mem) == 2 * 2 * 12
    seen = set()
    for rec in mem.get_all_tuning_records():
        secs = float(rec.run_secs[0])
        writer, size = int(secs), round((secs % 1) * 1e3)
        assert f"({size},)" in rec.workload.mod.script()  # the record points at its own workload
        seen.add((writer, size, round((secs - writer - size * 1e-3) * 1e6)))
    assert len(seen) == 48


def test_torn_last_line_is_dropped(tuned, tmp_path):
    import shutil

    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.registry import resolve_target
    from graphopt.targets.tuning.store import TuningStore

    _, _, db, _, _ = tuned
    copy = str(tmp_path / "db")
    shutil.copytree(db, copy)
    (path,) = glob.glob(os.path.join(copy, "*", "database_tuning_record.json"))
    good = record_lines(copy)
    with open(path, "a") as f:
        f.write('[0, [[["GetSBlock", [], ["ro')  # a writer died here
    store = TuningStore(copy, resolve_target("x86").to_json())
    assert store.load(ms.database.MemoryDatabase()) == len(good)
    assert record_lines(copy) == good


# Two real tuning runs into one database, started together: model "a" is tiny_model(), model "b" is the
# same Linear(32, 16)+ReLU followed by its own Linear(16, 8), so the first layer's task is shared (both may
# measure it at the same time) and b's second layer is b's alone. Each process writes what its TuningLog
# says it measured, and each record's (task hash, run seconds) so the parent can find every one of them.
_CONCURRENT_TUNE_SCRIPT = textwrap.dedent("""
    import json, os, sys, time, torch, graphopt
    sys.path.insert(0, {tests!r})
    from test_tuning import tiny_model, SMALL
    from graphopt.testing import compare, float64_run

    which, db, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model = tiny_model()
    if which == "b":
        torch.manual_seed(1)
        model = torch.nn.Sequential(*model, torch.nn.Linear(16, 8)).eval()
    x = torch.randn(1, 32)
    # a barrier, so the two runs tune at the same time rather than one after the other
    open(os.path.join(os.path.dirname(out), "ready-" + which), "w").close()
    deadline = time.monotonic() + 120  # the other process may have died before reaching it
    while len([f for f in os.listdir(os.path.dirname(out)) if f.startswith("ready-")]) < 2:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    tune = graphopt.Tune(trials={trials}, db=db, **SMALL)
    module = graphopt.compile(model, "x86", (x,), tune=tune)
    with torch.no_grad():
        result = compare(model(x), module(x), "algebraic", truth=float64_run(model, (x,)))
    log = tune.log
    json.dump({{"measured": log.measured, "tasks": log.tasks, "mismatch": result.message}}, open(out, "w"))
""")


@pytest.mark.slow
def test_two_tuning_processes_share_one_database(tmp_path):
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.registry import resolve_target
    from graphopt.targets.tuning.store import TuningStore

    db, trials = str(tmp_path / "db"), 2
    script = _CONCURRENT_TUNE_SCRIPT.format(tests=os.path.dirname(__file__), trials=trials)
    procs = {which: subprocess.Popen([sys.executable, "-c", script, which, db, str(tmp_path / f"{which}.json")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for which in ("a", "b")}
    try:
        for which, proc in procs.items():
            # generous: each process imports torch and TVM (and TVM's tensor intrinsics) on a busy machine
            _, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, f"tuning process {which} failed:\n{err[-3000:]}"
    finally:
        for proc in procs.values():  # never leave a tuning process behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    runs = {which: json.loads((tmp_path / f"{which}.json").read_text()) for which in procs}

    assert runs["a"]["tasks"] == 1 and runs["b"]["tasks"] == 2
    assert all(run["measured"] >= 1 for run in runs.values())
    assert [run["mismatch"] for run in runs.values()] == ["", ""]  # both tuned modules still compute the model
    # every record either process measured is on disk, once: nothing overwritten, nothing torn
    lines = record_lines(db)
    assert len(lines) == runs["a"]["measured"] + runs["b"]["measured"]
    # ... and loads: each record points at a workload line that exists, in TVM's own reader too
    (folder,) = glob.glob(os.path.join(db, "*"))
    mem = ms.database.MemoryDatabase()
    assert TuningStore(db, resolve_target("x86").to_json()).load(mem) == len(lines)
    tvm_db = ms.database.JSONDatabase(os.path.join(folder, "database_workload.json"),
                                      os.path.join(folder, "database_tuning_record.json"))
    assert len(tvm_db) == len(lines)
    workloads = {str(r.workload.mod.script()) for r in mem.get_all_tuning_records()}
    assert len(workloads) == 2  # a's layer (tuned by both) and b's second layer

    # a third run finds everything it needs and measures nothing
    tune = Tune(trials=trials, db=db, **SMALL)
    graphopt.compile(tiny_model(), "x86", (torch.randn(1, 32),), tune=tune)
    assert tune.log.measured == 0 and tune.log.tasks_done_before == tune.log.tasks == 1


def test_records_of_schedules_that_relayout_buffers_persist(tmp_path):
    """Regression: our conv rules call transform_layout, whose trace holds an IndexMap; MetaSchedule's
    Python as_json cannot write it, and tuning resnet18 died on the first rule baseline. The store
    writes it the way TVM's JSONDatabase does, so both readers load it and the schedule replays."""
    import tvm
    import tvm_ffi
    from tvm import s_tir, te
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.tuning.store import TuningStore

    a = te.placeholder((4, 8), name="a")
    mod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((4, 8), lambda i, j: a[i, j] * 2.0, name="b")])})
    sch = s_tir.Schedule(mod)
    sch.transform_layout(sch.get_sblock("b"), ("write", 0), lambda i, j: (j, i))
    mem = ms.database.MemoryDatabase()
    record = ms.database.TuningRecord(sch.trace, mem.commit_workload(mod), [1e-3], tvm.target.Target("llvm"),
                                      ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
    TuningStore(str(tmp_path), {"tvm": {"kind": "llvm"}}).append([record])

    loaded = ms.database.MemoryDatabase()
    assert TuningStore(str(tmp_path), {"tvm": {"kind": "llvm"}}).load(loaded) == 1
    replay = s_tir.Schedule(mod)
    loaded.get_all_tuning_records()[0].trace.apply_to_schedule(replay, remove_postproc=False)
    assert tvm_ffi.structural_equal(replay.mod, sch.mod)
    (folder,) = glob.glob(os.path.join(str(tmp_path), "*", ""))
    tvm_db = ms.database.JSONDatabase(os.path.join(folder, "database_workload.json"),
                                      os.path.join(folder, "database_tuning_record.json"))
    assert len(tvm_db.get_all_tuning_records()) == 1


def test_rule_baseline_of_a_prepacked_conv_is_measured(tmp_path):
    """Regression: the conv rule reads its weight pre-packed ([F/32, C, 3, 3, 32], a layout-rewrite
    block the builder strips), but its baseline was run with the workload's HWIO argument shapes,
    failed, and any MetaSchedule candidate beat it: tuned resnet18 ran 5x slower than untuned."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 16, 8, 8)
    tune = Tune(trials=1, db=str(tmp_path / "db"), **SMALL)  # one trial per task: the baseline alone
    module = graphopt.compile(model, "x86", (x,), tune=tune)
    assert tune.log.baselines_measured == tune.log.tasks == 1
    assert tune.log.best_ms is not None  # None when a task's only record is a failed measurement
    assert_matches_eager(module(x), model, (x,))


def test_rule_baselines_are_kept_and_a_tuned_kernel_must_beat_them_by_a_margin(tuned):
    """The rule schedule's time of each task is stored apart (rule_baselines.json); a tuned
    record replaces the rule's schedule only when it is RULE_MARGIN faster."""
    from tvm import te
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir import Schedule

    from graphopt.targets.tuning import tuner as tuning
    from graphopt.targets.registry import resolve_target
    from graphopt.targets.tuning.store import TuningStore

    _model, _x, db, _log, _module = tuned
    spec = resolve_target("x86")
    assert TuningStore(db, spec.to_json()).rule_baselines()  # written by the tuned compile

    a = te.placeholder((8, 8), name="a")
    func = te.create_prim_func([a, te.compute((8, 8), lambda i, j: a[i, j] * 2, name="b")])
    workload_mod = tvm_module(func)
    tuner = tuning._Tuner(spec, Tune(db=db))
    target = spec.tvm_target()
    workload = tuner.database.commit_workload(workload_mod)
    trace = Schedule(workload_mod).trace
    key = tuning._hash_mod(workload_mod)
    for baseline_secs, kept in ((1.05e-6, False), (1.2e-6, True)):
        tuner.database.commit_tuning_record(ms.database.TuningRecord(trace, workload, [1.0e-6], target, None))
        tuner.rule_baselines = {key: baseline_secs}
        applied = tuner.database_to_apply().get_all_tuning_records()
        assert (len(applied) == 1) == kept, (baseline_secs, applied)


def tvm_module(func):
    import tvm

    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
