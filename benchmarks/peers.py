"""What users would pick instead: PyTorch eager, torch.compile, ONNX Runtime, as callables.

Every peer gets the same thread count as graphopt (``TVM_NUM_THREADS``, default 2) and
the same input. torch.compile is measured in both of its CPU modes that matter — the
default and ``torch._inductor.config.freezing = True`` (weights frozen, oneDNN conv paths,
much faster on CNNs, see ../shared/notes/peers.md) — and the faster one is reported, so
"faster than torch.compile" always means faster than its best.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch

from common import THREADS, median_ms

Runner = Callable[[], object]


def eager(model: torch.nn.Module, x: torch.Tensor) -> Runner:
    def run():
        with torch.no_grad():
            return model(x)

    return run


def torch_compile(model: torch.nn.Module, x: torch.Tensor, runs: int = 30) -> tuple[Runner | None, str]:
    """The faster of torch.compile's default and frozen-weights modes, as a runner, and which.

    Both modes are compiled and timed; the winner is compiled again last, because
    ``torch._dynamo.reset()`` (needed to switch modes) drops the code of earlier ones."""
    import torch._dynamo
    import torch._inductor.config as inductor

    def build(freezing: bool) -> Runner:
        torch._dynamo.reset()
        inductor.freezing = freezing
        try:
            run = eager(torch.compile(model), x)
            run()  # compile outside the timing
            return run
        finally:
            inductor.freezing = False

    timed: dict[str, float] = {}
    for mode, freezing in (("default", False), ("freezing", True)):
        try:
            timed[mode] = median_ms(build(freezing), runs=runs)
        except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
            print(f"  torch.compile ({mode}) failed: {type(e).__name__}: {e}", file=sys.stderr)
    if not timed:
        torch._dynamo.reset()
        return None, "failed"
    mode = min(timed, key=timed.__getitem__)
    return build(mode == "freezing"), mode


def onnx_runtime(model: torch.nn.Module, x: torch.Tensor, folder: str) -> Runner | None:
    """ONNX Runtime CPU session (ORT_ENABLE_ALL) on the model exported with torch.onnx."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = os.path.join(folder, "model.onnx")
    try:
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], external_data=False,
                          dynamo=False)
    except Exception as e:  # noqa: BLE001 - an export failure is a missing peer, not a benchmark failure
        print(f"  ONNX export failed: {e}", file=sys.stderr)
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: sess.run(None, feed)


def gemm_gflops(n: int = 1024) -> float:
    """Practical fp32 peak of this machine with these threads: torch's (oneDNN/MKL) GEMM."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = median_ms(lambda: torch.mm(a, b), runs=20)
    return 2 * n**3 / (ms * 1e-3) / 1e9
