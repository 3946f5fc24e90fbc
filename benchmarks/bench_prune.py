"""graphopt's prune pass vs Torch-Pruning (DepGraph) at the same ratio.

For each reference model: params, FLOPs (both measured the same way: capture the pruned
model and ``summary()``), and x86 latency after ``graphopt.compile`` (untuned TVM,
TVM_NUM_THREADS=2). For the digits models: test accuracy after pruning half and fine-tuning
both with the same budget (``graphopt.finetune``, distillation from the unpruned model).
Torch-Pruning runs with its MetaPruner, L1 magnitude importance, local pruning, the
model's classifier ignored (its outputs must stay), as in its README.

    python benchmarks/bench_prune.py [--ratio 0.5] [--models resnet18,mobilenet_v2,transformer] [--no-latency]

``--zoo`` prints the pruning zoo table instead: torchvision classifiers (``graphopt.zoo``,
64x64 inputs, random weights) at each of ``--ratios``, graphopt's ``fold,prune`` next to
Torch-Pruning's DepGraph + MagnitudePruner at the same ratio (classifier ignored, whole
attention heads). Params and FLOPs are given as fractions of the unpruned model, each tool
measured by its own counter (graphopt: ``Graph.summary()``; Torch-Pruning:
``count_ops_and_params``) so that both ratios share their baseline's conventions. A row's
status says whether the pruned model ran; ``groups`` counts channel groups pruned / kept
whole (see ``graph.annotations["prune_report"]``). Latency: every graph (unpruned, ours, and
Torch-Pruning's pruned module, captured) is compiled by graphopt with ``fold,fuse`` for x86
and timed at batch 1, the three builds taking turns (best of three medians): ``ms`` is the
unpruned model's, ``ms x`` each pruned one's as a fraction of it. ``--no-latency`` leaves the
three latency columns out (no builds).

    python benchmarks/bench_prune.py --zoo [--zoo-models shufflenet_v2_x0_5,...|all] [--ratios 0.3,0.5]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import host_banner, median_ms, set_threads, table  # noqa: E402

import torch  # noqa: E402

import graphopt  # noqa: E402
import graphopt.models as models  # noqa: E402


def tp_prune(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    kwargs = {}
    mha = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    if mha:  # prune whole heads, as graphopt does
        kwargs = dict(num_heads={m: m.num_heads for m in mha}, prune_num_heads=True, prune_head_dims=False,
                      head_pruning_ratio=ratio)
        last = []  # the encoder's output is the residual stream, not a classifier
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=last, **kwargs)
    pruner.step()
    for m in mha:  # Torch-Pruning's documented fix-up after pruning MHA
        m.num_heads = pruner.num_heads[m]
        m.head_dim = m.embed_dim // m.num_heads
    return model.eval()


ZOO_SUBSET = "shufflenet_v2_x0_5,squeezenet1_0,mobilenet_v3_small,regnet_y_400mf,densenet121,vit_b_16"


def tp_zoo_prune(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> torch.nn.Module:
    """Torch-Pruning as its README prunes a classifier: DepGraph + L1 magnitude, the final
    linear layer ignored, whole heads of every ``nn.MultiheadAttention``."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    mha = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    kwargs = dict(num_heads={m: m.num_heads for m in mha}, prune_num_heads=True, prune_head_dims=False,
                  head_pruning_ratio=ratio) if mha else {}
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=last, **kwargs)
    pruner.step()
    for m in mha:
        m.num_heads = pruner.num_heads[m]
        m.head_dim = m.embed_dim // m.num_heads
    return model.eval()


def zoo_rows(names: list[str], ratios: list[float], latency: bool = True) -> list[list[object]]:
    import torch_pruning as tp

    from graphopt.zoo import zoo_model

    rows = []
    for name in names:
        model, inputs = zoo_model(f"torchvision/{name}").build()
        base = graphopt.capture(model, *inputs)
        b = base.summary()
        tp_macs, tp_params = tp.utils.count_ops_and_params(model, inputs[0])
        base_build = _zoo_build(base) if latency else None
        for ratio in ratios:
            row = [name, ratio, f"{b.params / 1e6:.2f}M", f"{b.flops / 1e6:.0f}M"]
            try:
                pruned = graphopt.optimize(base, pipeline=f"fold,prune{{ratio={ratio}}}")
                pruned(*inputs)
                s = pruned.summary()
                report = pruned.annotations["prune_report"]
                groups = f"{sum(r['status'] == 'pruned' for r in report)}/{sum(r['status'] == 'kept' for r in report)}"
                row += [f"{s.params / b.params:.3f}", f"{s.flops / b.flops:.3f}", "ok", groups]
            except Exception as e:  # a failure is a row of the table, not the end of the run
                pruned = None
                row += ["", "", f"failed: {type(e).__name__}: {str(e)[:60]}", ""]
            try:
                theirs = tp_zoo_prune(model, inputs[0], ratio)
                with torch.no_grad():
                    theirs(*inputs)
                macs, params = tp.utils.count_ops_and_params(theirs, inputs[0])
                row += [f"{params / tp_params:.3f}", f"{macs / tp_macs:.3f}", "ok"]
            except Exception as e:
                theirs = None
                row += ["", "", f"failed: {type(e).__name__}: {str(e)[:60]}"]
            if latency:
                row += _zoo_latencies(base_build, pruned, theirs, inputs)
            rows.append(row)
            print("  " + " | ".join(str(v) for v in row), file=sys.stderr, flush=True)
    return rows


def _zoo_build(graph: graphopt.Graph):
    return graphopt.compile(graph, "x86", pipeline="fold,fuse")


def _zoo_latencies(base_build, ours: graphopt.Graph | None, theirs: torch.nn.Module | None, inputs) -> list[str]:
    """[unpruned ms, ours ms x, Torch-Pruning ms x]: every model compiled by graphopt, batch 1,
    best of three interleaved medians; a pruned model that failed or does not build is blank."""
    builds = {"base": base_build}
    for label, pruned in (("ours", ours), ("theirs", theirs)):
        if pruned is None:
            continue
        try:
            graph = pruned if isinstance(pruned, graphopt.Graph) else graphopt.capture(pruned, *inputs)
            builds[label] = _zoo_build(graph)
        except Exception as e:  # a pruned model the backend rejects is a blank cell, not the end of the run
            print(f"  {label}: build failed: {type(e).__name__}: {str(e)[:80]}", file=sys.stderr)
    best = dict.fromkeys(builds, float("inf"))
    for _ in range(3):
        for label, c in builds.items():
            best[label] = min(best[label], median_ms(lambda c=c: c(*inputs), runs=10, warmup=2, budget_s=10.0))
    ms = best["base"]
    return [f"{ms:.2f}"] + [f"{best[k] / ms:.3f}" if k in best else "" for k in ("ours", "theirs")]


def latencies_ms(graphs: list[graphopt.Graph], x: torch.Tensor, rounds: int = 3) -> list[float]:
    """Best of ``rounds`` interleaved medians per graph: on a shared machine, other load
    only ever adds time, so the minimum is the least noisy estimate."""
    compiled = [graphopt.compile(g, "x86", pipeline="dce") for g in graphs]
    best = [float("inf")] * len(graphs)
    for _ in range(rounds):
        for i, c in enumerate(compiled):
            best[i] = min(best[i], median_ms(lambda c=c: c(x), runs=5, warmup=1, budget_s=10.0))
    return best


def model_rows(names: list[str], ratio: float, latency: bool) -> list[list[object]]:
    rows = []
    for name in names:
        ref = models.REFERENCE_MODELS[name]
        x = ref.example_input()
        model = ref.build()
        base = graphopt.capture(model, x)
        ours = graphopt.optimize(base, pipeline=f"prune{{ratio={ratio}}}")
        variants = [("unpruned", base), ("graphopt", ours)]
        try:
            variants.append(("torch-pruning", graphopt.capture(tp_prune(model, x, ratio), x)))
        except Exception as e:  # report the other tool's failure in the table instead of dying
            rows.append([name, "torch-pruning", f"failed: {type(e).__name__}: {str(e)[:80]}", "", "", "", ""])
        b = base.summary()
        times = latencies_ms([g for _, g in variants], x) if latency else [float("nan")] * len(variants)
        for (label, g), ms in zip(variants, times):
            s = g.summary()
            rows.append([name, label, f"{s.params / 1e6:.3f}M", f"{s.params / b.params:.3f}",
                         f"{s.flops / 1e9:.3f}G", f"{s.flops / b.flops:.3f}", ms])
    return rows


def digits_rows(ratio: float, epochs: int) -> list[list[object]]:
    rows = []
    torch.set_num_threads(1)  # tiny models: threads only add contention
    for name, image in (("digits_mlp", False), ("digits_cnn", True)):
        teacher, acc = models.train_digits(getattr(models, name)())
        xtr, ytr, xte, yte = models.load_digits_split(image=image)
        base = graphopt.capture(teacher, xte[:8], dynamic_shapes="batch")
        rows.append([name, "unpruned", base.summary().params, f"{acc:.4f}", "", ""])
        ours = graphopt.optimize(base, pipeline=f"prune{{ratio={ratio}}}")
        theirs = graphopt.capture(tp_prune(teacher, xte[:8], ratio), xte[:8], dynamic_shapes="batch")
        for label, g in (("graphopt", ours), ("torch-pruning", theirs)):
            before = models.accuracy(g, xte, yte)
            graphopt.finetune(g, (xtr, ytr), teacher=teacher, epochs=epochs, lr=2e-3, progress=False)
            after = models.accuracy(g, xte, yte)
            rows.append([name, label, g.summary().params, f"{after:.4f}", f"{before:.4f}",
                         f"{100 * (after - acc):+.2f}"])
    set_threads()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--models", default="resnet18,mobilenet_v2,transformer")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--no-digits", action="store_true")
    ap.add_argument("--zoo", action="store_true", help="print the torchvision pruning zoo table")
    ap.add_argument("--zoo-models", default=ZOO_SUBSET, help="comma-separated torchvision names, or 'all'")
    ap.add_argument("--ratios", default="0.3,0.5")
    args = ap.parse_args()
    set_threads()
    if args.zoo:
        from graphopt.zoo import torchvision_names

        names = torchvision_names() if args.zoo_models == "all" else args.zoo_models.split(",")
        print(host_banner())
        print("\n## pruning zoo: graphopt fold,prune vs Torch-Pruning (DepGraph + MagnitudePruner)\n")
        rows = zoo_rows(names, [float(r) for r in args.ratios.split(",")], latency=not args.no_latency)
        latency = [] if args.no_latency else ["ms", "ms x", "TP ms x"]
        print(table(["model", "ratio", "params", "FLOPs", "params x", "FLOPs x", "status", "groups pruned/kept",
                     "TP params x", "TP FLOPs x", "TP status", *latency], rows))
        return
    print(f"## prune ratio {args.ratio}: graphopt vs Torch-Pruning\n")
    rows = model_rows([m for m in args.models.split(",") if m], args.ratio, not args.no_latency)
    print(table(["model", "pruner", "params", "params ratio", "FLOPs", "FLOPs ratio", "x86 ms"], rows))
    if args.no_digits:
        return
    print(f"\n## digits accuracy after pruning {args.ratio:.0%} + {args.epochs} epochs of distillation\n")
    print(table(["model", "pruner", "params", "test acc", "acc before finetune", "vs unpruned (points)"],
                digits_rows(args.ratio, args.epochs)))


if __name__ == "__main__":
    main()
