"""int4 weight-only linear vs fp32: batch-1 latency, artifact size and accuracy.

    TVM_NUM_THREADS=2 python benchmarks/bench_int4.py [--models mlp_1024,ffn] [--runs 20] [--rounds 3]

Models: ``mlp_1024`` (Linear 1024-4096, ReLU, Linear 4096-1024) and ``ffn`` (the feed-forward
block of graphopt.models' transformer: Linear 256-2048, ReLU, Linear 2048-256), at batch 1,
where a linear layer is bound by the memory traffic of its weight, and ``head_1x1`` (a
mobilenet-style head: 1x1 convs 960-1280-1000 over the pooled 1x1 image, int4 as linears). For each: PyTorch eager
fp32, our compiled fp32 (the default pipeline) and our compiled int4
(``fold,quantize{mode=int4,group=G},fuse``, G = 32 and 128). Latency is the best of
``--rounds`` medians with the runtimes taking turns (benchmarks/common.py); size is the
saved artifact folder; accuracy is cosine and SQNR of the output against eager fp32 on
held-out random inputs. ``--digits`` adds the digits MLP's test accuracy, fp32 vs int4
(no fine-tuning).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import graphopt  # noqa: E402
from common import host_banner, interleaved_medians, set_threads, table  # noqa: E402
from graphopt.compare import sqnr_db  # noqa: E402
from graphopt.models import accuracy, digits_mlp, load_digits_split, train_digits, transformer  # noqa: E402

GROUPS = (32, 128)


def mlp_1024() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).eval()


def ffn() -> nn.Module:
    layer = transformer().layers[0]
    return nn.Sequential(layer.linear1, nn.ReLU(), layer.linear2).eval()


def head_1x1() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(960, 1280, 1), nn.ReLU(), nn.Conv2d(1280, 1000, 1)).eval()


MODELS = {"mlp_1024": mlp_1024, "ffn": ffn, "head_1x1": head_1x1}


def example_shape(model: nn.Module) -> tuple[int, ...]:
    """Batch-1 input shape: (1, features) for a linear model, (1, channels, 1, 1) for a conv one."""
    weight = next(model.parameters())
    return (1, weight.shape[1]) if weight.dim() == 2 else (1, weight.shape[1], 1, 1)


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().ravel(), b.double().ravel()
    return float(a @ b / (a.norm() * b.norm()))


def _call(fn, x):
    return lambda: fn(x)


def bench_model(name: str, runs: int, rounds: int, tmp: str) -> list[list[object]]:
    model = MODELS[name]()
    shape = example_shape(model)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    held = [torch.randn(*shape, generator=torch.Generator().manual_seed(s)) for s in range(100, 108)]
    builds = {"ours fp32": graphopt.compile(model, "x86", (x,))}
    for group in GROUPS:
        builds[f"ours int4 g{group}"] = graphopt.compile(
            model, "x86", (x,), pipeline=f"fold,quantize{{mode=int4,group={group}}},fuse")
    runners = {"eager fp32": lambda: model(x)}
    runners.update({label: _call(compiled, x) for label, compiled in builds.items()})
    with torch.no_grad():
        ms = interleaved_medians(runners, rounds=rounds, runs=runs)
        refs = [model(h) for h in held]
    fp32_ms = ms["ours fp32"]
    rows = [[name, "eager fp32", ms["eager fp32"], fp32_ms / ms["eager fp32"], "-", "-", "-"]]
    fp32_size = None
    for label, compiled in builds.items():
        size = dir_size(compiled.save(os.path.join(tmp, f"{name}_{label.replace(' ', '_')}")))
        fp32_size = fp32_size or size
        outs = [torch.as_tensor(compiled(h)) for h in held]
        cos = min(cosine(o, r) for o, r in zip(outs, refs))
        sqnr = min(sqnr_db(r, o) for o, r in zip(outs, refs))
        rows.append([name, label, ms[label], fp32_ms / ms[label], f"{size / 2**20:.2f} MiB ({size / fp32_size:.2f}x)",
                     f"{cos:.5f}", f"{sqnr:.1f}"])
    return rows


def digits_rows() -> list[list[object]]:
    model, fp32_acc = train_digits(digits_mlp())
    _, _, xte, yte = load_digits_split()
    rows = [["digits_mlp", "fp32 (eager)", f"{100 * fp32_acc:.2f}%"]]
    for group in GROUPS:
        graph = graphopt.optimize(model, (xte,), f"fold,quantize{{mode=int4,group={group}}}")
        rows.append(["digits_mlp", f"int4 g{group} (eager int4 graph, no fine-tuning)",
                     f"{100 * accuracy(graph, xte, yte):.2f}%"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--digits", action="store_true")
    args = ap.parse_args()
    set_threads()
    print(host_banner("x86"), f"; {os.environ['TVM_NUM_THREADS']} threads\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, args.runs, args.rounds, tmp)
    print(table(["model", "runtime", "batch-1 ms", "speedup vs ours fp32", "artifact", "min cosine",
                 "min SQNR dB"], rows))
    if args.digits:
        print()
        print(table(["model", "build", "test accuracy"], digits_rows()))


if __name__ == "__main__":
    main()
