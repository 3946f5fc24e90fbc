"""The ``graphopt`` command line.

    graphopt compile MODEL --target x86 --pipeline "fold" -o OUT
    graphopt run OUT --input x.npy [--reference MODEL]
    graphopt bench OUT
    graphopt inspect MODEL [--pipeline ...] [--picture graph.svg] [--target x86] [--support]
    graphopt passes | graphopt targets

Errors graphopt raises on purpose print as one ``error:`` line (exit 2); anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

from graphopt.errors import GraphoptError, InputError


def _add_model_args(p: argparse.ArgumentParser, pipeline: bool = True) -> None:
    p.add_argument("model", help="FILE.py:FACTORY, torchvision:NAME, or a reference model name (mlp, cnn, ...)")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224 (repeat for several inputs)")
    if pipeline:
        p.add_argument("--pipeline", default="default", help='pass pipeline, e.g. "fold,fuse" (default: %(default)s)')


def cmd_compile(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.model_spec import load_model

    model, inputs, name = load_model(args.model, args.input_shape)
    module = graphopt.compile(model, args.target, inputs, args.pipeline, verify=args.verify,
                              dump_ir=args.dump_ir, dynamic_shapes="batch" if args.dynamic_batch else None)
    module.save(args.output)
    s = module.stats
    print(f"compiled {name} for {module.target_name} with pipeline '{module.pipeline}' -> {args.output}")
    print(f"  capture {s['capture_s']:.2f} s, passes {s['passes_s']:.2f} s, build {s['build_s']:.2f} s")
    for spec in module.inputs:
        print(f"  input  {spec.name}: {spec.dtype}{list(spec.shape)}")
    for spec in module.outputs:
        print(f"  output {spec.name}: {spec.dtype}{list(spec.shape)}")
    if args.save_input:
        np.save(args.save_input, inputs[0].numpy())
        print(f"  example input saved to {args.save_input}")
    return 0


def _load_inputs(paths: list[str]) -> list[np.ndarray]:
    arrays = []
    for p in paths:
        try:
            arrays.append(np.load(p, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read input {p}: {e}") from None
    return arrays


def cmd_run(args: argparse.Namespace) -> int:
    import graphopt

    module = graphopt.load(args.artifact)
    inputs = _load_inputs(args.input)
    outs = module(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for i, o in enumerate(outs):
        flat = o.reshape(-1)
        print(f"output{i}: {o.dtype}{list(o.shape)}  first values {np.array2string(flat[:5], precision=5)}"
              + (f"  argmax {int(o.reshape(o.shape[0], -1).argmax(-1)[0])}" if o.ndim >= 2 else ""))
        if args.output:
            path = args.output if len(outs) == 1 else f"{os.path.splitext(args.output)[0]}_{i}.npy"
            np.save(path, o)
    if args.reference:
        import torch

        from graphopt.model_spec import load_model

        model, _, _ = load_model(args.reference)
        with torch.no_grad():
            ref = model(*[torch.from_numpy(a) for a in inputs])
        ref = ref if isinstance(ref, tuple) else (ref,)
        worst = max(float(np.abs(o - r.numpy()).max()) for o, r in zip(outs, ref))
        scale = max(float(np.abs(r.numpy()).max()) for r in ref) or 1.0
        ok = worst <= 1e-5 + 1e-4 * scale
        print(f"vs eager PyTorch ({args.reference}): max abs error {worst:.3g} "
              f"(relative to max |output| {worst / scale:.2g}) -> {'MATCH' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import graphopt

    module = graphopt.load(args.artifact)
    rng = np.random.default_rng(0)
    inputs = []
    for spec in module.inputs:
        shape = [d if isinstance(d, int) else args.batch for d in spec.shape]
        inputs.append(rng.standard_normal(shape).astype(spec.dtype))
    from graphopt.timing import time_calls

    times = time_calls(lambda: module(*inputs), runs=args.runs, warmup=args.warmup)
    med = statistics.median(times) * 1e3
    print(f"{args.artifact}: median {med:.3f} ms over {args.runs} runs (min {min(times) * 1e3:.3f} ms, "
          f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.model_spec import load_model

    model, inputs, name = load_model(args.model, args.input_shape)
    graph = graphopt.optimize(model, inputs, args.pipeline)
    graph.name = name
    print(graph.summary())
    if "prune_report" in graph.annotations:
        from graphopt.passes.prune.prune_pass import format_report

        print("\nchannel groups (prune):\n" + format_report(graph.annotations["prune_report"]))
    if graph.annotations.get("sparsity"):
        from graphopt.passes.sparsify.sparsify_pass import format_report as sparsity_report

        print("\nsparse weights (sparsify):\n" + sparsity_report(graph.annotations["sparsity"],
                                                                graph.annotations.get("sparsity_skipped", [])))
    if args.ir:
        print()
        print(graph)
    if args.target:
        from graphopt.targets.build import fusion_mode, kernel_rules
        from graphopt.targets.frontend.lower import lower_to_relax
        from graphopt.targets.registry import resolve_target

        spec = resolve_target(args.target)
        print(f"\nkernels for {spec.name} and the schedule rule of each:")
        for kernel, rule in kernel_rules(lower_to_relax(graph), spec, fusion_mode(graph, None)):
            print(f"  {kernel}: {rule or '-'}")
    unsupported = False
    if args.support:
        from graphopt.targets.frontend.support import format_support, graph_support

        rows = graph_support(graph)
        unsupported = any(r.status == "unsupported" for r in rows)
        print()
        print(format_support(rows))
    picture = args.picture or f"{name}.svg"
    graph.draw(picture)
    print(f"\npicture: {picture}")
    return 1 if unsupported else 0


def _parse_drop(text: str) -> float:
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InputError(f"--max-drop {text!r}: expected a fraction (0.01) or a percentage (1%)") from None


def _explore_data(spec: str, example):
    """(evaluation (x, y), training batches or None) from --data: 'digits' or FILE.npz."""
    import torch

    if spec == "digits":
        from graphopt.models import load_digits_split

        xtr, ytr, xte, yte = load_digits_split(image=example.dim() == 4)
    else:
        try:
            data = np.load(spec, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"--data {spec}: {e}") from None
        if "x" not in data or "y" not in data:
            raise InputError(f"--data {spec}: expected arrays 'x' and 'y' (and optionally 'x_train', 'y_train')")
        xte, yte = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
        xtr = torch.from_numpy(data["x_train"]) if "x_train" in data else None
        ytr = torch.from_numpy(data["y_train"]) if "y_train" in data else None
    train = None if xtr is None else [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, len(xtr), 64)]
    return (xte, yte), train, (xtr if xtr is not None else xte)


def cmd_explore(args: argparse.Namespace) -> int:
    from graphopt.exploration import explore
    from graphopt.targets.tuning.options import RPC
    from graphopt.model_spec import load_model

    if bool(args.rpc_key) != bool(args.tracker):
        raise InputError("--rpc-key and --tracker go together (the device's key and the tracker's HOST:PORT)")
    model, inputs, name = load_model(args.model, args.input_shape)
    evaluation, train, pool = _explore_data(args.data, inputs[0])
    batch = inputs[0].shape[0]
    calib = [pool[i:i + batch] for i in range(0, min(len(pool), 64 * batch), batch)]
    result = explore(model, (evaluation[0][:batch],), args.target, evaluate=evaluation,
                     max_accuracy_drop=_parse_drop(args.max_drop), budget=args.budget,
                     train_data=train if args.finetune else None, calibration_data=calib,
                     cache_dir=args.cache, report_dir=args.report,
                     rpc=RPC(args.rpc_key, args.tracker) if args.rpc_key else None)
    print(result)
    if result.report:
        print(f"\nreport: {result.report}")
    return 0 if result.chosen is not None else 1


def cmd_passes(args: argparse.Namespace) -> int:
    from graphopt.passes_base import registered_passes

    for name, cls in registered_passes().items():
        print(f"{name}  [{cls.tolerance}]  {cls.summary()}")
        for opt in cls.options():
            print(f"    {opt.describe()}")
    from graphopt.pipeline import DEFAULT_PIPELINE

    print(f"\ndefault pipeline: {DEFAULT_PIPELINE}")
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from graphopt.targets.registry import list_targets

    for name, spec in list_targets().items():
        print(f"{name:15s} {spec.description}")
        print(f"{'':15s} {json.dumps(spec.tvm)}" + (f" host={json.dumps(spec.host)}" if spec.host else ""))
    print("\nalso: cuda:sm_XX for any CUDA architecture, or a TVM target dict as JSON")
    return 0


def cmd_bisect(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.model_spec import load_model

    model, inputs, _ = load_model(args.model, args.input_shape)
    result = graphopt.bisect(model, inputs, args.pipeline, target=args.target)
    print(result)
    return 1 if result.found else 0


def cmd_fuzz(args: argparse.Namespace) -> int:
    from graphopt.fuzz.__main__ import run

    return run(args)


def cmd_tune(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.model_spec import load_model
    from graphopt.targets.tuning.tuner import RPC, Tune

    if bool(args.rpc_key) != bool(args.tracker):
        raise InputError("--rpc-key and --tracker go together (the device's key and the tracker's HOST:PORT)")
    model, inputs, name = load_model(args.model, args.input_shape)
    tune = Tune(trials=args.trials, time_budget=args.time_budget, db=args.db,
                rpc=RPC(args.rpc_key, args.tracker) if args.rpc_key else None)
    module = graphopt.compile(model, args.target, inputs, args.pipeline, tune=tune)
    log = tune.log
    print(f"tuned {name} for {module.target_name}: {log.tasks} tasks ({log.tasks_done_before} already in the "
          f"database), {log.measured} measurements ({log.baselines_measured} rule baselines) in {log.tuning_s:.1f} s")
    if log.best_ms is not None:
        print(f"  estimated kernel time {log.best_ms:.3f} ms" + (" (stopped by --time-budget)"
                                                                 if log.stopped_by_time_budget else ""))
    print(f"  records: {log.database}")
    if args.output:
        module.save(args.output)
        print(f"  artifact: {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description="Optimize and compile PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="optimize a model and build a deployable artifact")
    _add_model_args(p)
    p.add_argument("--target", default="x86", help="target name (see `graphopt targets`) or a TVM target dict as JSON")
    p.add_argument("-o", "--output", required=True, help="artifact folder to write")
    p.add_argument("--verify", action="store_true", help="check numerics after every pass")
    p.add_argument("--dump-ir", metavar="DIR", help="write numbered IR files before/after each pass")
    p.add_argument("--dynamic-batch", action="store_true", help="make dimension 0 of every input symbolic")
    p.add_argument("--save-input", metavar="X.npy", help="also save the example input used")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("run", help="run an artifact on inputs saved with numpy.save")
    p.add_argument("artifact")
    p.add_argument("--input", action="append", required=True, metavar="X.npy")
    p.add_argument("--output", metavar="Y.npy", help="save the output(s)")
    p.add_argument("--reference", metavar="MODEL", help="also run MODEL in eager PyTorch and compare")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("bench", help="measure an artifact's latency")
    p.add_argument("artifact")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=1, help="value for symbolic batch dimensions")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("inspect", help="summary (ops, params, FLOPs) and a picture of a model's graph")
    _add_model_args(p)
    p.add_argument("--picture", metavar="FILE", help="graph picture: .svg, .png or .dot (default MODEL.svg)")
    p.add_argument("--ir", action="store_true", help="also print the graph's IR text")
    p.add_argument("--target", help="also list the kernels of a build for this target, with their schedule rules")
    p.add_argument("--support", action="store_true",
                   help="list every op with whether the TVM backend lowers it (exit status 1 if one is unsupported)")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("bisect", help="find the first pass (and node) where a model's numbers leave tolerance")
    _add_model_args(p)
    p.add_argument("--target", help="also build for this target and check the backend")
    p.set_defaults(fn=cmd_bisect)

    p = sub.add_parser("fuzz", help="differential fuzzing with random models against eager PyTorch")
    from graphopt.fuzz.__main__ import add_arguments as add_fuzz_arguments

    add_fuzz_arguments(p)
    p.set_defaults(fn=cmd_fuzz)

    p = sub.add_parser("tune", help="autotune a model with MetaSchedule into a tuning database")
    _add_model_args(p)
    p.add_argument("--target", default="x86", help="target name (see `graphopt targets`) or a TVM target dict as JSON")
    p.add_argument("--trials", type=int, default=64, help="measurements for the whole model (default: %(default)s)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop searching after this long")
    p.add_argument("--db", default="graphopt-tuning", help="tuning database folder (default: %(default)s)")
    p.add_argument("--rpc-key", metavar="KEY", help="measure on the RPC device registered under KEY")
    p.add_argument("--tracker", metavar="HOST:PORT", help="the RPC tracker that knows --rpc-key")
    p.add_argument("-o", "--output", help="also write the tuned artifact here")
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("explore", help="search pipelines for the best accuracy/latency/size trade-off")
    _add_model_args(p, pipeline=False)  # explore chooses the pipeline
    p.add_argument("--target", default="x86")
    p.add_argument("--data", required=True, help="'digits' (scikit-learn's bundled digits) or FILE.npz with "
                   "arrays x, y (evaluation) and optionally x_train, y_train (pruning + distillation)")
    p.add_argument("--max-drop", default="1%", help="allowed accuracy drop: 1%% or 0.01 (default %(default)s)")
    p.add_argument("--budget", type=float, help="stop starting candidates after this many seconds")
    p.add_argument("--no-finetune", dest="finetune", action="store_false",
                   help="skip the pruning candidates (they need training data for distillation)")
    p.add_argument("--cache", default=".graphopt-explore", help="candidate cache folder (resume)")
    p.add_argument("--report", default="explore_report", help="folder for report.md and plots")
    p.add_argument("--rpc-key", metavar="KEY", help="measure the candidates on the RPC device registered under KEY")
    p.add_argument("--tracker", metavar="HOST:PORT", help="the RPC tracker that knows --rpc-key")
    p.set_defaults(fn=cmd_explore)

    p = sub.add_parser("passes", help="list the passes and their options")
    p.set_defaults(fn=cmd_passes)
    p = sub.add_parser("targets", help="list the target presets")
    p.set_defaults(fn=cmd_targets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "target", None) and args.target.lstrip().startswith("{"):
        try:
            args.target = json.loads(args.target)
        except json.JSONDecodeError as e:
            print(f"error: --target is not valid JSON: {e}", file=sys.stderr)
            return 2
    try:
        return args.fn(args)
    except GraphoptError as e:
        notes = "".join(f"\n  {n}" for n in getattr(e, "__notes__", []))
        print(f"error: {type(e).__name__}: {e}{notes}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `graphopt targets | head`: the reader left, nothing went wrong
        return 0


if __name__ == "__main__":
    sys.exit(main())
