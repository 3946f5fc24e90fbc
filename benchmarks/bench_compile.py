"""Compile time and latency of graphopt's default x86 build vs eager PyTorch, five reference models.

    python benchmarks/bench_compile.py [--models mlp,cnn,...] [--pipeline default]

Prints a markdown table; every ratio comes from this one run (TVM_NUM_THREADS and torch
threads both 2). Latency is the median over up to 30 runs at batch 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import graphopt  # noqa: E402
from common import THREADS, median_ms, set_threads, table  # noqa: E402
from graphopt.models import REFERENCE_MODELS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,resnet18,mobilenet_v2,transformer")
    ap.add_argument("--pipeline", default="default")
    args = ap.parse_args()
    set_threads()
    rows = []
    for name in args.models.split(","):
        ref = REFERENCE_MODELS[name]
        model, x = ref.build(), ref.example_input()
        t = time.perf_counter()
        module = graphopt.compile(model, "x86", (x,), args.pipeline)
        compile_s = time.perf_counter() - t
        with torch.no_grad():
            err = (module(x) - model(x)).abs().max().item()
            eager = median_ms(lambda: model(x))
        ours = median_ms(lambda: module(x))
        gflop = module.graph.summary().flops / 1e9
        rows.append([name, f"{compile_s:.1f}", eager, ours, f"{eager / ours:.2f}x", f"{gflop / (ours / 1e3):.1f}",
                     f"{err:.1e}"])
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"\ngraphopt {graphopt.__version__}, pipeline '{args.pipeline}', target x86, batch 1, {THREADS} threads\n")
    print(table(["model", "compile s", "eager ms", "graphopt ms", "speed-up vs eager", "GFLOP/s", "max abs err"],
                rows))


if __name__ == "__main__":
    main()
