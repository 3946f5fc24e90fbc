"""Benchmark MetaSchedule tuning: untuned vs tuned latency, tuning cost, reuse from the database.

For each model, in one run (TVM_NUM_THREADS=2, torch 2 threads):

* untuned: ``graphopt.compile`` with graphopt's rule schedules (its build time too);
* tuned: ``graphopt.compile(..., tune=Tune(trials=N, db=DB))`` — tuning time, measurements;
* second compile of the same model from the database (no measurement; compare with the
  untuned build time);
* peers (benchmarks/peers.py): PyTorch eager, torch.compile (the faster of its default and
  frozen-weights modes, named in the table), ONNX Runtime (CPU, fp32).

Every compiled output is checked against eager (rtol 1e-4, atol 1e-5 x output scale).

    python benchmarks/bench_tuning.py [--models mlp,cnn,resnet18,mobilenet_v2,transformer]
                                      [--trials-per-task 32] [--db bench-tuning-db] [--runs 30]

Trials default to 32 per task (resnet18 has ~20 tasks: ~640 measurements, ~30 min here).
Keep the database to make a second run a pure reuse measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
from common import host_banner, interleaved_medians, set_threads, table  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import graphopt  # noqa: E402
from graphopt.models import REFERENCE_MODELS  # noqa: E402
from graphopt.testing import assert_matches_eager, max_abs  # noqa: E402
from graphopt.targets.tuning.tuner import Tune  # noqa: E402

MODELS = ("mlp", "cnn", "resnet18", "mobilenet_v2", "transformer")


def count_tasks(model, x, target: str) -> int:
    """Tasks MetaSchedule would tune (a zero-trial tune only extracts them)."""
    with tempfile.TemporaryDirectory() as db:
        tune = Tune(trials=0, db=db, progress=False)
        graphopt.compile(model, target, (x,), tune=tune)
        return tune.log.tasks


def check(module, model, x) -> float:
    """The build against eager on the fp32 rung (graphopt.testing); returns the max abs error."""
    with torch.no_grad():
        ref = model(x)
    out = module(x)
    assert_matches_eager(out, model, (x,))
    return max_abs(ref, out)


def bench(name: str, args) -> dict:
    ref = REFERENCE_MODELS[name]
    model, x = ref.build(), ref.example_input()
    row: dict = {"model": name}
    graphopt.compile(model, args.target, (x,))  # warm-up: first-use imports would count as build time
    t = time.perf_counter()
    untuned = graphopt.compile(model, args.target, (x,))
    row["untuned build s"] = time.perf_counter() - t
    check(untuned, model, x)
    tasks = count_tasks(model, x, args.target)
    tune = Tune(trials=args.trials_per_task * tasks, db=args.db)
    t = time.perf_counter()
    tuned = graphopt.compile(model, args.target, (x,), tune=tune)
    row["tuning s"] = time.perf_counter() - t
    row["tasks"], row["trials"], row["measured"] = tasks, args.trials_per_task * tasks, tune.log.measured
    check(tuned, model, x)
    again = Tune(trials=args.trials_per_task * tasks, db=args.db, progress=False)
    t = time.perf_counter()
    graphopt.compile(model, args.target, (x,), tune=again)
    row["2nd compile s"] = time.perf_counter() - t
    row["2nd measured"] = again.log.measured

    xn = x.numpy()
    runners = {"eager": peers.eager(model, x), "untuned": lambda: untuned(xn), "tuned": lambda: tuned(xn)}
    compiled_run, mode = peers.torch_compile(model, x, args.runs)
    if compiled_run is not None:
        runners["torch.compile"] = compiled_run
    row["torch.compile mode"] = mode
    with tempfile.TemporaryDirectory() as tmp:
        ort_run = peers.onnx_runtime(model, x, tmp)
        if ort_run is not None:
            runners["ORT"] = ort_run
        ms = interleaved_medians(runners, runs=args.runs)
    row["eager ms"], row["untuned ms"], row["tuned ms"] = ms["eager"], ms["untuned"], ms["tuned"]
    row["torch.compile ms"] = ms.get("torch.compile", float("nan"))
    row["ORT ms"] = ms.get("ORT", float("nan"))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--trials-per-task", type=int, default=32)
    p.add_argument("--db", default="bench-tuning-db")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--target", default="x86", help="an x86 preset, e.g. x86-avx2")
    args = p.parse_args(argv)
    set_threads()
    rows = [bench(name, args) for name in args.models.split(",")]
    headers = ["model", "tasks", "trials", "measured", "tuning s", "untuned build s", "2nd compile s",
               "2nd measured", "eager ms", "torch.compile ms", "torch.compile mode", "ORT ms", "untuned ms",
               "tuned ms"]
    print(host_banner(args.target))
    print(table(headers, [[r[h] for h in headers] for r in rows]))
    print()
    ratio_headers = ["model", "tuned vs untuned", "tuned vs eager", "tuned vs torch.compile", "tuned vs ORT",
                     "2nd compile / untuned build"]
    ratios = []
    for r in rows:
        best = r["tuned ms"]
        ratios.append([r["model"], f"{r['untuned ms'] / best:.2f}x", f"{r['eager ms'] / best:.2f}x",
                       f"{r['torch.compile ms'] / best:.2f}x" if not np.isnan(r["torch.compile ms"]) else "n/a",
                       f"{r['ORT ms'] / best:.2f}x" if not np.isnan(r["ORT ms"]) else "n/a",
                       f"{r['2nd compile s'] / r['untuned build s']:.2f}"])
    print(table(ratio_headers, ratios))
    print(f"\n(speedups >1x mean graphopt tuned is faster; TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, "
          f"{args.trials_per_task} trials per task, database {args.db})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
