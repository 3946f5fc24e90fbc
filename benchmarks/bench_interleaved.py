"""A compiled model called the way PyTorch programs call it: between torch ops.

    python benchmarks/bench_interleaved.py [MODEL] [--rounds 3] [--runs 100]

Each call is a small inference pipeline: torch preprocessing (a 256x256 uint8 image resized to
224x224 and normalized, torch's intra-op threads), the model, torch postprocessing (softmax,
top-5). Runtimes: graphopt (TVM's thread pool), graphopt with its kernels on torch's OpenMP
threads (``GRAPHOPT_SHARE_TORCH_THREADS=1``, graphopt/threads.py), ONNX Runtime and eager
PyTorch, each alone in a fresh process, taking turns round by round. Every process first times
the model alone (no torch ops between calls), then the pipeline; the table gives per-call
medians in ms of the model alone, the model inside the pipeline and the whole pipeline.
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

RUNTIMES = {"graphopt": {}, "graphopt (torch's threads)": {"GRAPHOPT_SHARE_TORCH_THREADS": "1"}, "ORT": {},
            "eager": {}}


def pipeline_parts(size: int = 224):
    """(raw image, preprocess, postprocess): what surrounds a classifier in an application."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def preprocess(image):
        x = F.interpolate(image.float() / 255.0, size=(size, size), mode="bilinear", align_corners=False)
        return ((x - mean) / std).contiguous()

    def postprocess(logits):
        return torch.softmax(logits, dim=-1).topk(5)

    return raw, preprocess, postprocess


def runner(runtime: str, folder: str, model_name: str):
    """The model as ``run(torch tensor) -> torch tensor`` for ``runtime``."""
    import torch

    if runtime.startswith("graphopt"):
        import graphopt

        module = graphopt.load(os.path.join(folder, "graphopt"))
        return module
    if runtime == "ORT":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(os.path.join(folder, "model.onnx"), opts, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    from graphopt.models import REFERENCE_MODELS

    model = REFERENCE_MODELS[model_name].build().eval()
    torch.manual_seed(0)

    def eager(x):
        with torch.no_grad():
            return model(x)

    return eager


def measure(runtime: str, folder: str, model_name: str, runs: int) -> dict[str, float]:
    """Runs in the child process."""
    import torch

    torch.set_num_threads(THREADS)
    raw, preprocess, postprocess = pipeline_parts()
    run = runner(runtime, folder, model_name)
    x = preprocess(raw)
    # a second of model calls alone: torch's workers, woken by the preprocessing above, spin
    # for a while; the model-alone numbers are for a process that runs only the model
    deadline = time.perf_counter() + 1.0
    while time.perf_counter() < deadline:
        run(x)
    alone = []
    for _ in range(runs):
        t = time.perf_counter()
        run(x)
        alone.append(time.perf_counter() - t)
    model_ms, total_ms = [], []
    for i in range(runs + 10):
        t0 = time.perf_counter()
        x = preprocess(raw)
        t1 = time.perf_counter()
        y = run(x)
        t2 = time.perf_counter()
        postprocess(y)
        t3 = time.perf_counter()
        if i >= 10:
            model_ms.append(t2 - t1)
            total_ms.append(t3 - t0)
    med = lambda v: statistics.median(v) * 1e3  # noqa: E731
    return {"alone": med(alone), "model": med(model_ms), "total": med(total_ms)}


def prepare(folder: str, model_name: str) -> None:
    """The graphopt artifact and the ONNX file every child loads (built once, outside the timing)."""
    import torch

    import graphopt
    from graphopt.models import REFERENCE_MODELS

    ref = REFERENCE_MODELS[model_name]
    model, x = ref.build().eval(), ref.example_input(1)
    graphopt.compile(model, "x86", (x,)).save(os.path.join(folder, "graphopt"))
    torch.onnx.export(model, (x,), os.path.join(folder, "model.onnx"), input_names=["x"], output_names=["y"],
                      external_data=False, dynamo=False)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__),
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="mobilenet_v2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated subset of: " + ", ".join(RUNTIMES))
    ap.add_argument("--passive", action="store_true", help="every process with OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--child", choices=RUNTIMES, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help="where the artifact and ONNX file are (built there if missing)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.folder, args.model, args.runs)))
        return
    folder = args.folder or tempfile.mkdtemp(prefix="bench-interleaved-")
    if not os.path.exists(os.path.join(folder, "model.onnx")):
        prepare(folder, args.model)
    passive = {"OMP_WAIT_POLICY": "PASSIVE"} if args.passive else {}
    chosen = {name: RUNTIMES[name] for name in args.runtimes.split(",")}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    for r in range(1, args.rounds + 1):
        for name, env in chosen.items():
            out = subprocess.run([sys.executable, __file__, args.model, "--runs", str(args.runs), "--child", name,
                                  "--folder", folder], env={**os.environ, **env, **passive}, check=True,
                                 capture_output=True, text=True)
            rows[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r} {name}: {rows[name][-1]}", file=sys.stderr, flush=True)
    print(f"\n{host_banner('x86')}; commit {commit()}; load {os.getloadavg()[0]:.1f}")
    print(f"{args.model}, batch 1, {THREADS} threads, {args.runs} calls per process, {args.rounds} processes per "
          f"runtime{', OMP_WAIT_POLICY=PASSIVE' if args.passive else ''}; per-call medians in ms, best / worst "
          f"process\n")
    fmt = lambda v: f"{min(v):.2f} / {max(v):.2f}"  # noqa: E731
    print(table(["runtime", "model alone", "model between torch ops", "whole pipeline"],
                [[name, fmt([m["alone"] for m in ms]), fmt([m["model"] for m in ms]), fmt([m["total"] for m in ms])]
                 for name, ms in rows.items()]))


if __name__ == "__main__":
    main()
