"""Block-sparse vs dense kernels on sparsified models: batch-1 latency and artifact size.

    TVM_NUM_THREADS=2 python benchmarks/bench_sparse.py [--models mlp_1024,encoder] [--levels 0,0.5,0.7,0.9,2:4]

Models: ``mlp_1024`` (Linear 1024-4096, ReLU, Linear 4096-1024; one input row, so each linear
is a matrix-vector product bound by its weight's bytes), ``ffn`` (the transformer's
feed-forward block 256-2048-256, one row) and ``encoder`` (graphopt.models' transformer,
2 layers of d_model 256 with 2048-wide FFNs, over a 128-token sequence: 128-row products).
Each level is the ``sparsify`` pass on every linear: ``block`` at that sparsity with 1x16
blocks (the default block: one AVX-512 vector of one output's inputs) or ``2:4``. For each:

* ours dense: the masked model built with every linear on the dense kernel;
* ours sparse: every linear on the block-sparse kernel, or at 2:4 the N:M kernel (whatever
  the cost rule would choose);
  ``ours default`` is the build as a user gets it, the cost rule choosing per layer;
* ORT: ONNX Runtime (ORT_ENABLE_ALL) on the same masked model, which it runs dense;
* torch BSR: the masked linears as ``torch.sparse`` BSR matmuls (CPU BSR needs square blocks,
  so 1x1: CSR), the rest of the model eager.

Latency is the best of ``--rounds`` medians with the runtimes taking turns
(benchmarks/common.py); size is the saved artifact folder.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from contextlib import contextmanager

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import graphopt  # noqa: E402
from common import host_banner, interleaved_medians, set_threads, table  # noqa: E402
from graphopt.models import transformer  # noqa: E402
from graphopt.targets.cpu.schedules import sparse_format  # noqa: E402

LEVELS = ("0", "0.5", "0.7", "0.9", "2:4")
HEADERS = ["model", "sparsity", "ours dense ms", "ours sparse ms", "sparse speedup", "ORT ms", "torch BSR ms",
           "dense MiB", "sparse MiB", "default: sparse/zero-block linears"]


def mlp_1024() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).eval()


def ffn() -> nn.Module:
    layer = transformer().layers[0]
    return nn.Sequential(layer.linear1, nn.ReLU(), layer.linear2).eval()


MODELS = {"mlp_1024": (mlp_1024, (1, 1024)), "ffn": (ffn, (1, 256)), "encoder": (transformer, (1, 128, 256))}


def sparsify_options(level: str) -> str | None:
    if level == "0":
        return None
    if ":" in level:
        return f"sparsify{{pattern={level}}}"
    return f"sparsify{{sparsity={level},pattern=block,block=1x16}}"


def masked(model: nn.Module, x: torch.Tensor, level: str) -> nn.Module:
    """A copy of ``model`` whose weights are the sparsify pass's (exact zeros where it pruned)."""
    out = copy.deepcopy(model)
    options = sparsify_options(level)
    if options is None:
        return out
    graph = graphopt.optimize(model, (x,), options)
    constants = {n.target: graph.constant(n) for n in graph.nodes if n.op == "get_attr"}
    with torch.no_grad():
        for name, param in out.named_parameters():
            key = "p_" + name.replace(".", "_")
            if key in graph.annotations.get("sparsity", {}):
                param.copy_(constants[key])
    return out


@contextmanager
def sparse_kernels(mode: str):
    """Every linear on the sparse kernel (``"on"``), none (``"off"``) or as the cost rule says."""
    saved = sparse_format.MAX_KEPT_FOR_ONE_ROW, sparse_format.MAX_KEPT_FOR_ROWS, sparse_format.NM_MAX_ROWS
    forced = {"on": (1.0, 1 << 30), "off": (-1.0, 0)}.get(mode)
    if forced is not None:
        sparse_format.MAX_KEPT_FOR_ONE_ROW = sparse_format.MAX_KEPT_FOR_ROWS = forced[0]
        sparse_format.NM_MAX_ROWS = forced[1]
    try:
        yield
    finally:
        sparse_format.MAX_KEPT_FOR_ONE_ROW, sparse_format.MAX_KEPT_FOR_ROWS, sparse_format.NM_MAX_ROWS = saved


class BSRLinear(nn.Module):
    """``linear`` with its weight as a torch.sparse BSR tensor (1x1 blocks: CPU BSR needs square ones)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_bsr((1, 1))
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        y = (self.weight @ rows.T).T
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def with_bsr_linears(model: nn.Module) -> nn.Module:
    """``model`` with its ``nn.Linear`` children as BSRLinear (attention's packed in-projection
    is not a child module and stays dense)."""
    out = copy.deepcopy(model)
    for child in list(out.modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.Linear:
                setattr(child, attr, BSRLinear(sub))
    return out


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def bench(name: str, level: str, runs: int, rounds: int, tmp: str) -> list[object]:
    import logging

    from peers import onnx_runtime

    build, shape = MODELS[name]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    model = masked(build(), x, level)
    builds = {}
    for mode in ("off", "on", "default"):
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("graphopt.sparse").addHandler(handler)
        logging.getLogger("graphopt.sparse").setLevel(logging.INFO)
        try:
            with sparse_kernels(mode):
                builds[mode] = graphopt.compile(model, "x86", (x,))
        finally:
            logging.getLogger("graphopt.sparse").removeHandler(handler)
        if mode == "default":  # the linears the cost rule put on a sparse kernel, of those with zero blocks or N:M
            sparse = sum(k in r.getMessage() for r in records for k in ("block-sparse kernel", "N:M-sparse kernel"))
            chosen = f"{sparse}/{len(records)}"
    bsr = with_bsr_linears(model)
    # the encoder layer's fused fast path reads linear1/linear2's weights itself: off, so it calls them
    torch.backends.mha.set_fastpath_enabled(False)
    runners = {"dense": lambda: builds["off"](x), "sparse": lambda: builds["on"](x),
               "torch BSR": lambda: bsr(x)}
    folder = os.path.join(tmp, f"{name}-{level}-onnx".replace(":", "_"))
    os.makedirs(folder)
    ort = onnx_runtime(model, x, folder)
    if ort is not None:
        runners["ORT"] = ort
    with torch.no_grad():
        ms = interleaved_medians(runners, rounds=rounds, runs=runs)
    torch.backends.mha.set_fastpath_enabled(True)
    sizes = {m: dir_size(builds[m].save(os.path.join(tmp, f"{name}-{level}-{m}".replace(":", "_"))))
             for m in ("off", "on")}
    return [name, level, ms["dense"], ms["sparse"], ms["dense"] / ms["sparse"], ms.get("ORT", "-"),
            ms["torch BSR"], f"{sizes['off'] / 2**20:.2f}", f"{sizes['on'] / 2**20:.2f}", chosen]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp_1024,ffn,encoder")
    ap.add_argument("--levels", default=",".join(LEVELS))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    set_threads()
    commit = os.popen(f"git -C {os.path.dirname(os.path.abspath(__file__))} rev-parse --short HEAD").read().strip()
    print(host_banner("x86"), f"; {os.environ['TVM_NUM_THREADS']} threads; commit {commit}; "
          f"load {os.getloadavg()[0]:.1f} at start\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for level in args.levels.split(","):
                rows.append(bench(name, level, args.runs, args.rounds, tmp))
                print(table(HEADERS, rows[-1:]), flush=True)
    print(f"\nload {os.getloadavg()[0]:.1f} at end\n")
    print(table(HEADERS, rows))


if __name__ == "__main__":
    main()
