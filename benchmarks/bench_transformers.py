"""Transformers at real sizes: BERT-base, ViT-B/16 and GPT-2 small against eager, torch.compile and ORT.

    python benchmarks/bench_transformers.py [--models bert-base vit-b16 gpt2] [--rounds 2] [--runs 20]

Each model is built from its library's default config (random weights, nothing downloaded) and
wrapped to return its last hidden state, so every runtime runs the same graph with one tensor
output. Each runtime runs alone in a fresh process (no thread pool or spinning worker of one
runtime can touch another's timing), rounds alternate the runtimes, and the table gives the best
per-process median in ms with graphopt's speed-up over each peer. graphopt uses the default
pipeline, untuned; its output is checked against eager (algebraic rung) before timing.
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
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))

from common import THREADS, host_banner, table  # noqa: E402

RUNTIMES = ("eager", "torch.compile", "ort", "graphopt")
SEQ = 128


class LastHiddenState:
    """``model(x).last_hidden_state`` as a module (a plain class factory keeps torch out of the parent)."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class _Wrapped(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module):
                super().__init__()
                self.inner = inner

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.inner(x).last_hidden_state

        return _Wrapped(model).eval()


def build(name: str) -> tuple[Any, Any]:
    """(model, example input) for one of the benchmark's models, at batch 1."""
    import torch

    from graphopt.models import import_torchvision

    import_torchvision()  # transformers imports it; the PyPI wheel needs graphopt's CPU shim
    import transformers as hf

    torch.manual_seed(0)
    if name == "bert-base":
        config = hf.BertConfig()
        model, x = hf.BertModel(config, add_pooling_layer=False), torch.randint(0, config.vocab_size, (1, SEQ))
    elif name == "gpt2":
        config = hf.GPT2Config(use_cache=False)  # no KV cache: one forward over the whole sequence
        model, x = hf.GPT2Model(config), torch.randint(0, config.vocab_size, (1, SEQ))
    elif name == "vit-b16":
        config = hf.ViTConfig()
        model, x = hf.ViTModel(config, add_pooling_layer=False), torch.randn(1, 3, 224, 224)
    else:
        raise SystemExit(f"unknown model {name!r}; choose from bert-base, vit-b16, gpt2")
    config._attn_implementation = "sdpa"
    return LastHiddenState.wrap(model.eval()), x


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(runtime: str, name: str, runs: int, target: str, clock: str = "wall") -> dict[str, float]:
    """Runs in the child process: build ``runtime``'s runner for ``name``, time ``runs`` calls."""
    import peers
    from common import set_threads
    from graphopt.timing import time_calls

    set_threads()
    model, x = build(name)
    if runtime == "eager":
        run = peers.eager(model, x)
    elif runtime == "torch.compile":
        run, _ = peers.torch_compile(model, x, runs=5)
        if run is None:
            return {}
    elif runtime == "ort":
        run = peers.onnx_runtime(model, x, tempfile.mkdtemp())
        if run is None:
            return {}
    else:
        import graphopt
        from graphopt.testing import assert_matches_eager

        module = graphopt.compile(model, target, (x,))
        assert_matches_eager(module(x), model, (x,))
        run = lambda: module(x)  # noqa: E731
    # A second of warm-up: building the runner ran torch ops whose OpenMP workers keep spinning.
    deadline = time.perf_counter() + 1.0
    while time.perf_counter() < deadline:
        run()
    times = time_calls(run, runs=runs, warmup=0, clock=CLOCKS[clock])
    return {"min": min(times) * 1e3, "median": statistics.median(times) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["bert-base", "vit-b16", "gpt2"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--target", default="x86", help="graphopt's target preset, e.g. x86-avx2")
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="cpu: the process's CPU seconds per call, which other processes' load does not "
                         "stretch; comparable across runtimes only with TVM_NUM_THREADS=1 (more threads add "
                         "what idle workers spin)")
    ap.add_argument("--child", nargs=2, metavar=("RUNTIME", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.runs, args.target, args.clock)))
        return
    best: dict[tuple[str, str], float] = {}
    for name in args.models:
        for r in range(1, args.rounds + 1):
            for runtime in args.runtimes:
                out = subprocess.run([sys.executable, __file__, "--runs", str(args.runs), "--target", args.target,
                                      "--clock", args.clock, "--child", runtime, name], capture_output=True, text=True)
                lines = out.stdout.strip().splitlines()
                if out.returncode != 0 or not lines:
                    print(f"{name} {runtime} failed:\n{out.stderr[-2000:]}", file=sys.stderr, flush=True)
                    continue
                ms = json.loads(lines[-1])
                print(f"{name} round {r} {runtime}: {ms}", file=sys.stderr, flush=True)
                if ms:
                    key = (name, runtime)
                    best[key] = min(best.get(key, float("inf")), ms["median"])
    rows = []
    for name in args.models:
        got = {rt: best.get((name, rt)) for rt in RUNTIMES}
        ours = got["graphopt"]
        row: list[object] = [name] + [got[rt] if got[rt] is not None else "-" for rt in RUNTIMES]
        for peer in ("eager", "torch.compile", "ort"):
            row.append(f"{got[peer] / ours:.2f}x" if ours and got[peer] else "-")
        rows.append(row)
    print(f"\n{host_banner(args.target)}")
    print(f"batch 1, sequence {SEQ} (ViT: 224x224), {THREADS} threads, best of {args.rounds} per-process medians "
          f"of {args.runs} calls ({args.clock} ms); speed-up = peer time / graphopt time, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print(table(["model", *RUNTIMES, "vs eager", "vs torch.compile", "vs ORT"], rows))


if __name__ == "__main__":
    main()
