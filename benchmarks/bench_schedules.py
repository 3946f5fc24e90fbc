"""Benchmark graphopt's default CPU schedules (targets/cpu/schedules) on the five reference models.

Builds each model twice with the lead's pipeline shape -- once plain (TVM 0.27's naive
default), once with ``cpu_layout_passes`` + ``cpu_schedule_pass`` -- checks the scheduled
build against PyTorch eager (rtol 1e-4, atol 1e-4) and prints a markdown table of
median latencies (ms, TVM_NUM_THREADS=2, torch 2 threads) measured in the same run.

    python benchmarks/bench_schedules.py [--models mlp,cnn,resnet18,mobilenet_v2,transformer]
                                         [--skip-baseline] [--runs 30] [--cpu-time]

``--cpu-time`` runs everything single-threaded and reports process CPU time: use it when
the machine is shared (other jobs make wall-clock medians meaningless).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# --cpu-time: 1 thread everywhere and process CPU time instead of wall time.  Wall-clock
# medians are meaningless on a shared, overloaded 2-core box; CPU time of a single-thread
# run is not (much) affected by other processes.  Must be decided before TVM's pool starts.
CPU_TIME = "--cpu-time" in sys.argv
if CPU_TIME:
    os.environ["TVM_NUM_THREADS"] = "1"
os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from graphopt import timing  # noqa: E402
from graphopt.compare import compare  # noqa: E402
from graphopt.targets.cpu.schedules import cpu_layout_passes, cpu_schedule_pass  # noqa: E402
from graphopt.targets.registry import resolve_target  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host_banner  # noqa: E402

MODELS = ["mlp", "cnn", "resnet18", "mobilenet_v2", "transformer"]
_PIPE = relax.backend.cpu_generic.pipeline
_TV_LIB = None


def _torchvision():
    """torchvision 0.28 is a CUDA build: define its custom ops before importing it."""
    global _TV_LIB
    if "torchvision" not in sys.modules and _TV_LIB is None:
        try:
            _TV_LIB = torch.library.Library("torchvision", "FRAGMENT")
            _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined by a real torchvision
            pass
    import torchvision

    return torchvision


def make_model(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)), torch.randn(1, 784)
    if name == "cnn":
        m = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(4096, 128), nn.ReLU(), nn.Dropout(), nn.Linear(128, 10))
        return m, torch.randn(1, 3, 32, 32)
    if name == "resnet18":
        return _torchvision().models.resnet18(), torch.randn(1, 3, 224, 224)
    if name == "mobilenet_v2":
        return _torchvision().models.mobilenet_v2(), torch.randn(1, 3, 224, 224)
    if name == "transformer":
        layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(1, 128, 256)
    raise ValueError(name)


def build(mod, target, scheduled: bool):
    seq = [*_PIPE.library_dispatch_passes(target)]
    if scheduled:
        seq += cpu_layout_passes(target)
    seq += [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()]
    if scheduled:
        seq.append(cpu_schedule_pass(target))
    seq += [*_PIPE.dataflow_lower_passes(target), *_PIPE.finalize_passes(target)]
    t0 = time.perf_counter()
    ex = tvm.compile(mod, target=target, relax_pipeline=tvm.transform.Sequential(seq))
    return relax.VirtualMachine(ex, tvm.cpu()), time.perf_counter() - t0


def median_ms(fn, runs: int, budget_s: float = 10.0) -> float:
    clock = time.process_time if CPU_TIME else time.perf_counter
    return timing.median_ms(fn, runs, warmup=2, budget_s=budget_s, clock=clock)


def _first(out):
    return out if hasattr(out, "numpy") else out[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--skip-baseline", action="store_true", help="do not build/time the unscheduled build")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--cpu-time", action="store_true", help="single thread, process CPU time (shared machines)")
    ap.add_argument("--target", default="x86", help="an x86 preset, e.g. x86-avx2 to measure the AVX2 tier here")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ["TVM_NUM_THREADS"]))
    target = resolve_target(args.target).tvm_target()
    # Phase 1: eager for every model, before any TVM kernel runs.  Timing both in one
    # loop makes them disturb each other: torch's OpenMP workers and TVM's thread pool
    # both spin-wait after a parallel region and steal the other's 2 cores.
    names = args.models.split(",")
    cases = {}
    for name in names:
        model, x = make_model(name)
        model.eval()
        with torch.no_grad():
            ref = model(x).numpy()
            eager = median_ms(lambda: model(x), args.runs)  # noqa: B023
        cases[name] = (model, x, ref, eager)
    time.sleep(0.5)
    rows = []
    ok_all = True
    for name in names:
        model, x, ref, eager = cases[name]
        ep = torch.export.export(model, (x,)).run_decompositions({})
        mod = from_exported_program(ep, run_ep_decomposition=False)
        xt = tvm.runtime.tensor(x.numpy())
        vm, build_s = build(mod, target, scheduled=True)
        got = _first(vm["main"](xt)).numpy()
        verdict = compare(torch.from_numpy(ref), torch.from_numpy(got), "algebraic")
        ok = verdict.ok
        ok_all &= ok
        err = float(np.abs(got - ref).max())
        sched = median_ms(lambda: vm["main"](xt), args.runs)  # noqa: B023
        base = base_build = None
        if not args.skip_baseline:
            bvm, base_build = build(mod, target, scheduled=False)
            base = median_ms(lambda: bvm["main"](xt), args.runs, budget_s=5.0)  # noqa: B023
        rows.append((name, eager, base, sched, build_s, base_build, err, ok))
        print(f"# {name}: done (max |err| {err:.1e})", file=sys.stderr, flush=True)

    clock = "process CPU time, 1 thread" if CPU_TIME else "wall clock"
    print(f"\n{host_banner(args.target)}")
    print(f"target: {target.attrs.get('mcpu') or 'generic'}, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, "
          f"torch {torch.__version__}, tvm {tvm.__version__}, median {clock}\n")
    print("| model | eager ms | TVM default ms | TVM + graphopt schedules ms | vs eager | speed-up vs default "
          "| build s | max abs err | matches eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, eager, base, sched, build_s, _bb, err, ok in rows:
        base_s = f"{base:.3f}" if base is not None else "-"
        speed = f"{base / sched:.1f}x" if base is not None else "-"
        print(f"| {name} | {eager:.3f} | {base_s} | {sched:.3f} | {sched / eager:.2f}x | {speed} | "
              f"{build_s:.1f} | {err:.1e} | {'yes' if ok else 'NO'} |")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
