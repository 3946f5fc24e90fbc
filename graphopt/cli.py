"""The ``graphopt`` command line.

    graphopt compile MODEL --target x86 --pipeline "fold" -o OUT
    graphopt run OUT --input x.npy [--reference MODEL]
    graphopt bench OUT
    graphopt inspect MODEL [--pipeline ...] [--picture graph.svg]
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
import time

import numpy as np

from graphopt.errors import GraphoptError, InputError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="FILE.py:FACTORY, torchvision:NAME, or a reference model name (mlp, cnn, ...)")
    p.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224 (repeat for several inputs)")
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
    for _ in range(args.warmup):
        module(*inputs)
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        module(*inputs)
        times.append(time.perf_counter() - t)
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
    if args.ir:
        print()
        print(graph)
    picture = args.picture or f"{name}.svg"
    graph.draw(picture)
    print(f"\npicture: {picture}")
    return 0


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
    p.set_defaults(fn=cmd_inspect)

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


if __name__ == "__main__":
    sys.exit(main())
