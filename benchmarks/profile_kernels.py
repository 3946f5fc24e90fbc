"""Where does the time go? Time every kernel of a default graphopt build on its own.

The Relax VM of TVM 0.27 has no per-kernel profiler, so this script stops the build
after scheduling (targets/build.py ``scheduled_module``), compiles each PrimFunc that
``main`` launches as a module of its own and times it on random inputs with TVM's
time_evaluator. Kernels launched several times with the same PrimFunc are counted once
per launch. Prints a markdown table, slowest first, with each kernel's achieved GFLOP/s and
the sum against the end-to-end latency of the real artifact (the difference is VM overhead
and cache effects).

    TVM_NUM_THREADS=2 python benchmarks/profile_kernels.py mobilenet_v2 [--pipeline fold,fuse]
        [--fusion graph|tvm|none] [--batch 1] [--top 25]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from tvm.s_tir.analysis import estimate_tir_flops  # noqa: E402

import graphopt  # noqa: E402
from graphopt.models import REFERENCE_MODELS  # noqa: E402
from graphopt.targets.build import fusion_mode, scheduled_module, tir_calls  # noqa: E402
from graphopt.targets.cpu.schedules import rule_of  # noqa: E402
from graphopt.targets.frontend.lower import lower_to_relax  # noqa: E402
from graphopt.targets.registry import resolve_target  # noqa: E402
from graphopt.timing import time_calls  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import host_banner  # noqa: E402


def random_args(func: tvm.tirx.PrimFunc, dev) -> list:
    rng = np.random.default_rng(0)
    args = []
    for buf in func.params:  # TVM 0.27: a PrimFunc's parameters are its buffers
        shape = [int(d) for d in buf.shape]
        dtype = str(buf.dtype)
        data = rng.standard_normal(shape).astype(dtype) if "float" in dtype else np.zeros(shape, dtype)
        args.append(tvm.runtime.tensor(data, dev))
    return args


def signature(func: tvm.tirx.PrimFunc) -> str:
    """The kernel's buffers, e.g. ``1x16x112x112, 96x16x1x1 -> 1x96x112x112``."""
    shapes = ["x".join(str(int(d)) for d in buf.shape) for buf in func.params]
    return ", ".join(shapes[:-1]) + " -> " + shapes[-1]


def gflop(func: tvm.tirx.PrimFunc) -> float:
    """The kernel's arithmetic (TVM's own estimate: multiply-adds count 2)."""
    try:
        return estimate_tir_flops(tvm.IRModule({"main": func})) / 1e9
    except Exception:  # noqa: BLE001 - an estimate only: a kernel it cannot read shows 0
        return 0.0


def time_kernel(func: tvm.tirx.PrimFunc, target, dev) -> float:
    from graphopt.targets.cpu.tir_pipeline import TIR_PIPELINE

    # graphopt's TIR pipeline, as in an artifact: the prefetches and shuffle transposes the
    # schedule rules annotate are lowered by it
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target,
                      tir_pipeline=TIR_PIPELINE).jit()
    args = random_args(func, dev)
    evaluator = lib.time_evaluator("main", dev, number=20, repeat=5, min_repeat_ms=20)
    return statistics.median(evaluator(*args).results) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(REFERENCE_MODELS))
    parser.add_argument("--pipeline", default="fold,fuse")
    parser.add_argument("--fusion", default=None, help="graph, tvm or none (default: what the graph says)")
    parser.add_argument("--target", default="x86")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ["TVM_NUM_THREADS"]))
    ref = REFERENCE_MODELS[args.model]
    model, x = ref.build(), ref.example_input(args.batch)
    spec = resolve_target(args.target)
    graph = graphopt.optimize(model, (x,), args.pipeline)
    fusion = fusion_mode(graph, args.fusion)
    mod = scheduled_module(lower_to_relax(graph), spec, fusion=fusion)

    target, dev = spec.tvm_target(), tvm.cpu(0)
    order = [name for name, _ in tir_calls(mod)]
    counts = Counter(order)
    per_launch = {name: time_kernel(mod[name], target, dev) for name in counts}
    total = sum(per_launch[n] * c for n, c in counts.items())

    module = graphopt.compile(model, args.target, (x,), args.pipeline, fusion=fusion)
    end_to_end = statistics.median(time_calls(lambda: module(x), runs=50, warmup=5)) * 1e3

    print(host_banner(args.target))
    print(f"### {args.model}, batch {args.batch}, pipeline '{args.pipeline}', fusion {fusion}, "
          f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}\n")
    print(f"{len(order)} launches of {len(counts)} kernels; sum of kernels {total:.3f} ms, "
          f"end to end {end_to_end:.3f} ms\n")
    print("| kernel | rule | reads -> writes | launches | ms each | ms total | share | GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    ranked = sorted(counts, key=lambda n: -per_launch[n] * counts[n])
    for name in ranked[:args.top]:
        t = per_launch[name] * counts[name]
        print(f"| {name} | {rule_of(mod[name]) or '-'} | {signature(mod[name])} | {counts[name]} "
              f"| {per_launch[name]:.4f} | {t:.4f} | {100 * t / total:.1f}% "
              f"| {gflop(mod[name]) / per_launch[name] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
