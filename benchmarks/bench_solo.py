"""graphopt vs ONNX Runtime with each runtime alone in its own process, taking turns.

    python benchmarks/bench_solo.py MODEL [--batch 1] [--rounds 3] [--runs 60]

bench_compile.py times every runtime in one process (in blocks, with pauses). This is the
stricter check: a fresh process per runtime and round, so no thread pool, allocator or
spinning worker of one runtime can touch the other's timing. Rounds alternate graphopt and
ORT; each line is one process's min and median in ms, and the table gives the ratio of
medians per round (graphopt / ORT, < 1 means graphopt is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import THREADS, host_banner, table  # noqa: E402

RUNTIMES = ("graphopt", "ort")


def measure(runtime: str, model_name: str, batch: int, runs: int, target: str) -> dict[str, float]:
    """Runs in the child process: build ``runtime``'s runner, time ``runs`` calls."""
    import peers
    from common import set_threads
    from graphopt.models import REFERENCE_MODELS
    from graphopt.timing import time_calls

    set_threads()
    ref = REFERENCE_MODELS[model_name]
    model, x = ref.build().eval(), ref.example_input(batch)
    if runtime == "graphopt":
        import graphopt

        module = graphopt.compile(model, target, (x,))
        run = lambda: module(x)  # noqa: E731
    else:
        run = peers.onnx_runtime(model, x, tempfile.mkdtemp())
    # Warm up for a second, not a few calls: building the runner ran torch ops (export, the
    # eager check), and torch's OpenMP workers keep spinning on the cores for a while after
    # them. mobilenet_v2's 60 graphopt calls fit in that window and measured 3.3-3.5 ms
    # instead of the 2.2-2.3 ms of a process that only loads the artifact.
    deadline = time.perf_counter() + 1.0
    while time.perf_counter() < deadline:
        run()
    times = time_calls(run, runs=runs, warmup=0)
    return {"min": min(times) * 1e3, "median": statistics.median(times) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--target", default="x86", help="graphopt's target preset, e.g. x86-avx2")
    ap.add_argument("--child", choices=RUNTIMES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.batch, args.runs, args.target)))
        return
    rows = []
    for r in range(1, args.rounds + 1):
        ms = {}
        for runtime in RUNTIMES:
            out = subprocess.run([sys.executable, __file__, args.model, "--batch", str(args.batch), "--runs",
                                  str(args.runs), "--target", args.target, "--child", runtime],
                                 check=True, capture_output=True, text=True)
            ms[runtime] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {r} {runtime}: {ms[runtime]}", file=sys.stderr, flush=True)
        rows.append([r, ms["graphopt"]["min"], ms["graphopt"]["median"], ms["ort"]["min"], ms["ort"]["median"],
                     f"{ms['graphopt']['median'] / ms['ort']['median']:.2f}"])
    print(f"\n{host_banner(args.target)}")
    print(f"{args.model}, batch {args.batch}, graphopt target {args.target}, {THREADS} threads, "
          f"{args.runs} calls per process (ms)\n")
    print(table(["round", "graphopt min", "graphopt median", "ORT min", "ORT median", "graphopt / ORT (medians)"],
                rows))


if __name__ == "__main__":
    main()
