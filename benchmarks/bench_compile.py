"""Default (untuned) graphopt builds vs PyTorch eager, torch.compile and ONNX Runtime, x86.

    python benchmarks/bench_compile.py [--models mlp,cnn,...] [--batches 1,8] [--pipeline default]

For each reference model and batch size, in one run with every runtime on the same
threads (TVM_NUM_THREADS, default 2): graphopt's compile time, latencies (best of three
medians, the runtimes taking turns: ``common.interleaved_medians``), ratios
against each peer, and achieved GFLOP/s next to two peaks: the nominal one (cores x
flop/cycle x clock, see ``nominal_peak_gflops``) and torch's own fp32 GEMM on this machine.
Every graphopt output is checked against eager first (fp32 rung, docs/TOLERANCES.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import graphopt  # noqa: E402
import peers  # noqa: E402
from common import THREADS, host_banner, interleaved_medians, set_threads, table  # noqa: E402
from graphopt.models import REFERENCE_MODELS  # noqa: E402
from graphopt.testing import assert_matches_eager  # noqa: E402


def nominal_peak_gflops() -> tuple[float, str]:
    """cores x fp32 flop/cycle x clock. AVX-512 FMA: 2 ports x 16 lanes x 2 flop = 64 flop/cycle on
    Intel server cores and AMD Zen 5 (family 26); Zen 4 (family 25) runs 512-bit FMAs on two 256-bit
    pipes: 32 flop/cycle. The clock is /proc/cpuinfo's, the base clock on most VMs: cores that boost
    beat this "peak", which is why the table also gives torch's own GEMM as the practical one."""
    info = open("/proc/cpuinfo").read()
    lines = info.splitlines()
    mhz = max(float(line.split(":")[1]) for line in lines if line.startswith("cpu MHz"))
    family = next((int(line.split(":")[1]) for line in lines if line.startswith("cpu family")), 0)
    half_width = "AuthenticAMD" in info and family < 26
    flop_per_cycle = 64 if "avx512f" in info and not half_width else 32
    return THREADS * flop_per_cycle * mhz / 1e3, f"{THREADS} x {flop_per_cycle} flop/cycle x {mhz / 1e3:.2f} GHz"


def bench(name: str, batch: int, pipeline: str, folder: str, target: str) -> list[object]:
    ref = REFERENCE_MODELS[name]
    model = ref.build().eval()
    example = ref.example_input()
    x = example.expand(batch, *example.shape[1:]).contiguous() if batch != example.shape[0] else example
    x = x + 0.01 * torch.randn_like(x)
    t = time.perf_counter()
    module = graphopt.compile(model, target, (x,), pipeline)
    compile_s = time.perf_counter() - t
    assert_matches_eager(module(x), model, (x,))
    runners = {"graphopt": lambda: module(x), "eager": peers.eager(model, x)}
    compiled_run, _mode = peers.torch_compile(model, x)
    if compiled_run is not None:
        runners["torch.compile"] = compiled_run
    ort_run = peers.onnx_runtime(model, x, folder)
    if ort_run is not None:
        runners["ORT"] = ort_run
    ms = interleaved_medians(runners)
    ours, eager, compiled, ort = ms["graphopt"], ms["eager"], ms.get("torch.compile"), ms.get("ORT")
    gflop = module.graph.summary().flops / 1e9

    def ratio(peer: float | None) -> str:
        return f"{peer / ours:.2f}x" if peer else "n/a"

    best_peer = min(v for v in (eager, compiled, ort) if v)
    return [name, batch, f"{compile_s:.1f}", ours, eager, compiled if compiled else "n/a", ort if ort else "n/a",
            ratio(eager), ratio(compiled), ratio(ort), ratio(best_peer), f"{gflop / (ours / 1e3):.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn,resnet18,mobilenet_v2,transformer")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--pipeline", default="default")
    ap.add_argument("--target", default="x86", help="an x86 preset, e.g. x86-avx2 to measure the AVX2 tier here")
    args = ap.parse_args()
    set_threads()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                rows.append(bench(name, batch, args.pipeline, folder, args.target))
                print(f"{name} batch {batch}: done", file=sys.stderr, flush=True)
    peak, how = nominal_peak_gflops()
    gemm = peers.gemm_gflops()
    print(f"\n{host_banner(args.target)}")
    print(f"graphopt {graphopt.__version__}, pipeline '{args.pipeline}', target {args.target} (untuned), "
          f"{THREADS} threads; "
          f"latencies in ms, best of 3 interleaved medians; ratios > 1 mean graphopt is faster\n")
    print(table(["model", "batch", "compile s", "graphopt", "eager", "torch.compile", "ORT",
                 "vs eager", "vs torch.compile", "vs ORT", "vs best peer", "GFLOP/s"], rows))
    print(f"\nfp32 peak: nominal {peak:.0f} GFLOP/s at the reported clock ({how}); "
          f"torch GEMM 1024^3 reaches {gemm:.0f} GFLOP/s here.")


if __name__ == "__main__":
    main()
