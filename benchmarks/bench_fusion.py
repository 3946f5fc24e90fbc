"""Fusion A/B on the five reference models: no fusion vs TVM's FuseOps vs graphopt's ``fuse``.

For each model the graph is captured and optimized once with ``fold,fuse`` and lowered
once; the three builds differ only in the backend fusion mode (targets/build.py):

* ``none``  — every op its own kernel (``fold`` alone builds this way);
* ``tvm``   — TVM's automatic FuseOps + FuseTIR;
* ``graph`` — one kernel per group the ``fuse`` pass recorded on the graph.

Columns: kernels launched by ``main`` (no-copy reshapes excluded), intermediate bytes
written by kernels (every kernel output except the model's outputs), and x86 latency
(VM time_evaluator, median of ``--repeat`` rounds; the three builds are timed round-robin,
so the load of a shared machine drifts over all of them alike). Ratios are against TVM's
fusion, from this one run. Usage::

    TVM_NUM_THREADS=2 python benchmarks/bench_fusion.py [--models mlp,cnn] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import host_banner  # noqa: E402

MODES = ("none", "tvm", "graph")
MODELS = ("mlp", "cnn", "resnet18", "mobilenet_v2", "transformer")


def measure(name: str, repeat: int, target: str) -> dict[str, dict[str, float]]:
    import tvm
    from tvm import relax

    import graphopt
    from graphopt.models import REFERENCE_MODELS
    from graphopt.passes.fuse import expected_kernels
    from graphopt.targets.build import build, kernel_launches
    from graphopt.targets.frontend.lower import lower_to_relax
    from graphopt.targets.registry import resolve_target

    ref = REFERENCE_MODELS[name]
    model, x = ref.build(), ref.example_input()
    graph = graphopt.optimize(model, (x,), "fold,fuse")
    mod = lower_to_relax(graph)
    spec = resolve_target(target)
    out_bytes = sum(int(np.prod(s.shape)) * torch.empty(0, dtype=getattr(torch, s.dtype)).element_size()
                    for s in graph.output_specs)
    expected = torch.as_tensor(model(x)).detach().numpy()
    rows, vms = {}, {}
    for mode in MODES:
        launches = kernel_launches(mod, spec, mode)
        if mode == "graph" and len(launches) != expected_kernels(graph):
            raise SystemExit(f"{name}: {len(launches)} kernels built, graph says {expected_kernels(graph)}")
        vm = relax.VirtualMachine(build(mod, spec, fusion=mode), tvm.cpu())
        inp = tvm.runtime.tensor(x.numpy())
        got = vm["main"](inp)[0].numpy()
        err = float(np.abs(got - expected).max() / max(1.0, np.abs(expected).max()))
        vm.set_input("main", inp)
        # ~0.1 s per measurement whatever the model's speed
        probe = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=1, repeat=1)("main").mean
        vms[mode] = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=max(1, int(0.1 / max(probe, 1e-6))),
                                      repeat=1)
        rows[mode] = {"kernels": len(launches), "bytes": sum(b for _, b in launches) - out_bytes, "err": err}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeat):
        for mode in MODES:
            times[mode].append(vms[mode]("main").mean * 1e3)
    for mode in MODES:
        rows[mode]["ms"] = statistics.median(times[mode])
        print(f"  {name:13s} {mode:5s} {rows[mode]['kernels']:4d} kernels {rows[mode]['ms']:9.2f} ms "
              f"(max rel err {rows[mode]['err']:.1e})", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--target", default="x86", help="a CPU preset, e.g. x86-avx2")
    args = ap.parse_args()
    results = {name: measure(name, args.repeat, args.target) for name in args.models.split(",")}
    print(host_banner(args.target))
    print(f"fusion A/B, {args.target}, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, median of {args.repeat}; "
          "ratios vs TVM's fusion (kernels, bytes: lower is better; speedup: higher is better)\n")
    print("| model | kernels none / tvm / fuse | intermediate MiB none / tvm / fuse "
          "| latency ms none / tvm / fuse | fuse kernels vs tvm | fuse bytes vs tvm | fuse speedup vs tvm "
          "| fuse speedup vs none |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        n, t, g = r["none"], r["tvm"], r["graph"]
        mib = [f"{m['bytes'] / 2**20:.2f}" for m in (n, t, g)]
        print(f"| {name} | {n['kernels']} / {t['kernels']} / {g['kernels']} | {' / '.join(mib)} "
              f"| {n['ms']:.2f} / {t['ms']:.2f} / {g['ms']:.2f} | {g['kernels'] / t['kernels']:.2f}x "
              f"| {g['bytes'] / max(t['bytes'], 1):.2f}x | {t['ms'] / g['ms']:.2f}x | {n['ms'] / g['ms']:.2f}x |")


if __name__ == "__main__":
    main()
