"""The model zoo (graphopt.zoo) through ``graphopt.compile(model, TARGET)`` with the default pipeline.

For each model: compile time, the largest error against eager over every output (and whether
it is within the fp32 rung), eager and graphopt latency (batch 1, median ms) and the speed-up;
then the pass rate. Each model runs in a fresh process with a time limit, so a crash, a hang or
a memory blow-up is that model's result, not the end of the run; each result is appended to a
JSON-lines file as soon as it is known, and ``--resume`` skips the models it already holds.

    python benchmarks/zoo.py                                  # the whole zoo (hours on 2 cores)
    python benchmarks/zoo.py --fast                           # the subset CI compiles
    python benchmarks/zoo.py --no-timing --resume             # pass rate only, continuing a run
    python benchmarks/zoo.py --family hf --family timm
    python benchmarks/zoo.py --models timm/resnet18d,hf/bert --results out/zoo.jsonl
    python benchmarks/zoo.py --table out/zoo.jsonl            # the table of a finished or partial run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_ms, set_threads, table  # noqa: E402

DEFAULT_RESULTS = Path("out/zoo.jsonl")


def host_cpu() -> str:
    """'<model name> (<ISA tier>)' from /proc/cpuinfo: avx512+vnni, avx512, avx2+vnni, avx2, ..."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if "avx512f" in flags:
        tier = "avx512" + ("+vnni" if "avx512_vnni" in flags else "")
    elif "avx2" in flags:
        tier = "avx2" + ("+vnni" if "avx_vnni" in flags else "")
    elif "asimd" in flags:
        tier = "neon" + ("+dotprod" if "asimddp" in flags else "")
    else:
        tier = "scalar/sse"
    return f"{name} ({tier}, {len(os.sched_getaffinity(0))} cores)"


def run_one(name: str, target: str, timing: bool = True) -> dict:
    """Build, compile and time one zoo model in this process; the result as a JSON-able dict.
    Without ``timing`` the latencies are left out: compile and the comparison with eager only."""
    import torch

    import graphopt
    from graphopt.compare import compare, float64_run, leaves
    from graphopt.zoo import zoo_model

    set_threads()
    result: dict = {"model": name, "target": target}
    model, inputs = zoo_model(name).build()
    with torch.no_grad():
        expected = model(*inputs)
    if timing:
        result["eager_ms"] = median_ms(lambda: model(*inputs), runs=20, budget_s=10.0)
    start = time.perf_counter()
    module = graphopt.compile(model, target, example_inputs=inputs)
    result["compile_s"] = time.perf_counter() - start
    actual = module(*inputs)
    if isinstance(actual, torch.Tensor) and not isinstance(expected, torch.Tensor):
        actual = (actual,)
    if isinstance(expected, torch.Tensor) and isinstance(actual, tuple) and len(actual) == 1:
        actual = actual[0]
    errors = [(a.double() - e.double()).abs().max().item() for a, e in zip(leaves(actual), leaves(expected))
              if isinstance(a, torch.Tensor) and a.is_floating_point() and a.shape == e.shape and a.numel()]
    result["max_error"] = max(errors, default=0.0)
    verdict = compare(expected, actual, "algebraic", lambda: float64_run(model, inputs))
    if timing:
        result["graphopt_ms"] = median_ms(lambda: module(*inputs), runs=20, budget_s=10.0)
        result["speedup"] = result["eager_ms"] / result["graphopt_ms"]
    result["status"] = "ok" if verdict.ok else f"mismatch: {verdict.message}"
    return result


def run_isolated(name: str, target: str, timeout_s: float, timing: bool = True) -> dict:
    """``run_one`` in a fresh process: its result, or what stopped it."""
    cmd = [sys.executable, __file__, "--one", name, "--target", target] + ([] if timing else ["--no-timing"])
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"model": name, "target": target, "status": f"timeout after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = [ln for ln in (proc.stderr or "").splitlines() if ln.strip() and "Warning" not in ln]
    why = tail[-1].strip() if tail else f"exit status {proc.returncode}"
    return {"model": name, "target": target, "status": f"error: {why}"[:400],
            "wall_s": time.perf_counter() - start}


def _one_main(name: str, target: str, timing: bool) -> int:
    """Child process: print the result as one JSON line, the error class and message on failure."""
    try:
        result = run_one(name, target, timing)
    except Exception as e:  # the parent records it; one model's failure is not the run's
        msg = (str(e).strip().splitlines() or [""])[0]
        result = {"model": name, "target": target, "status": f"error: {type(e).__name__}: {msg}"[:400]}
    print(json.dumps(result), flush=True)
    return 0


def load_results(path: Path) -> dict[str, dict]:
    """The last result per model in a JSON-lines file (later lines win)."""
    results: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                results[rec["model"]] = rec
    return results


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        rows.append([r["model"], r.get("compile_s", "-"), r.get("max_error", "-"), r.get("eager_ms", "-"),
                     r.get("graphopt_ms", "-"), r.get("speedup", "-"), r["status"].replace("|", "/")[:120]])
    passed = sum(r["status"] == "ok" for r in results)
    text = table(["model", "compile s", "max error", "eager ms", "graphopt ms", "speed-up", "status"], rows)
    rate = f"{passed}/{len(results)} ({100.0 * passed / max(len(results), 1):.0f}%)"
    return f"{text}\n\npass rate (compiles and matches eager at the fp32 rung): {rate}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="append", choices=("torchvision", "timm", "hf"),
                    help="only this family (repeatable)")
    ap.add_argument("--models", help="comma-separated zoo names, e.g. timm/resnet18d,hf/bert")
    ap.add_argument("--fast", action="store_true", help="only the subset CI compiles")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per model")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON-lines file results go to")
    ap.add_argument("--no-timing", dest="timing", action="store_false",
                    help="compile and compare with eager only, no latencies (the pass rate in less time)")
    ap.add_argument("--resume", action="store_true", help="skip the models --results already holds")
    ap.add_argument("--table", type=Path, metavar="RESULTS", help="print the table of a results file and exit")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process of one model
    args = ap.parse_args(argv)
    if args.one:
        return _one_main(args.one, args.target, args.timing)
    if args.table:
        print(report(list(load_results(args.table).values())))
        return 0

    from graphopt.zoo import FAMILIES, zoo, zoo_model

    if args.models:
        entries = [zoo_model(n.strip()) for n in args.models.split(",") if n.strip()]
    else:
        entries = zoo(tuple(args.family or FAMILIES))
    if args.fast:
        entries = [e for e in entries if e.fast]
    done = load_results(args.results) if args.resume else {}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    print(f"host: {host_cpu()}; target {args.target}; {len(entries)} models; results -> {args.results}",
          flush=True)
    results = []
    for i, entry in enumerate(entries, 1):
        if entry.name in done:
            results.append(done[entry.name])
            continue
        start = time.perf_counter()
        print(f"[{i}/{len(entries)}] {entry.name} ...", end=" ", flush=True)
        rec = run_isolated(entry.name, args.target, args.timeout, args.timing)
        rec["wall_s"] = time.perf_counter() - start
        print(f"{rec['status'][:100]} ({rec['wall_s']:.0f} s)", flush=True)
        with args.results.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        results.append(rec)
    print(f"\nhost: {host_cpu()}; target {args.target}\n")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
