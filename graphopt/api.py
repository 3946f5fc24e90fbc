"""The public entry points: ``optimize`` (passes only) and ``compile`` (passes + backend)."""

from __future__ import annotations

import time
from typing import Any

import torch

from graphopt.capture import capture
from graphopt.errors import CompilationError
from graphopt.graph import Graph
from graphopt.instruments import IRDumpInstrument, TimingInstrument, VerifyInstrument
from graphopt.pipeline import Instrument, Pipeline
from graphopt.signature import spec_to_json

__all__ = ["optimize", "compile"]


def _as_graph(model: "torch.nn.Module | Graph", example_inputs: Any, dynamic_shapes: Any,
              example_kwargs: Any = None) -> Graph:
    if isinstance(model, Graph):
        return model
    if example_inputs is None and example_kwargs:
        example_inputs = ()
    if example_inputs is None:
        from graphopt.errors import CaptureError

        raise CaptureError("example_inputs are needed to capture a torch.nn.Module")
    return capture(model, example_inputs, dynamic_shapes=dynamic_shapes, example_kwargs=example_kwargs)


def optimize(model: "torch.nn.Module | Graph", example_inputs: Any = None, pipeline: "str | Pipeline" = "default",
             *, dynamic_shapes: Any = None, verify: bool = False, dump_ir: str | None = None,
             instruments: list[Instrument] | None = None, calibration_data: Any = None,
             example_kwargs: dict[str, Any] | None = None, target: Any = None) -> Graph:
    """Capture ``model`` (unless it is a Graph already) and run ``pipeline`` over it.

    ``verify=True`` runs the graph after every pass and fails with the pass's name when it
    leaves its tolerance; ``dump_ir=DIR`` writes numbered IR files before/after each pass.
    ``calibration_data`` (an iterable of input batches) is what the quantize pass calibrates
    on. ``target`` (what ``compile`` takes) is the build target passes may specialize for: the
    quantize pass keeps layers in float where the target has no integer kernel that beats float.
    The per-pass timing table is left in ``graph.annotations["timing"]``.
    ``example_kwargs`` are keyword inputs of the example call; ``graph.forward(...)`` is then
    called like the model (same keywords) and returns the model's output structure.
    """
    graph = _as_graph(model, example_inputs, dynamic_shapes, example_kwargs)
    if calibration_data is not None or target is not None:
        graph = graph.copy()
    if calibration_data is not None:
        graph.annotations["calibration_data"] = calibration_data
    if target is not None:
        from graphopt.targets.registry import resolve_target

        graph.annotations["target"] = resolve_target(target)
    pipe = Pipeline.parse(pipeline)
    timing = TimingInstrument()
    ins: list[Instrument] = [timing, *(instruments or [])]
    verifier = VerifyInstrument() if verify else None
    if verifier:
        ins.append(verifier)
    if dump_ir:
        ins.append(IRDumpInstrument(dump_ir))
    out = pipe.run(graph, ins)
    out.annotations["timing"] = timing.table()
    if verifier:
        out.annotations["verify"] = verifier.table()
    return out


def compile(model: "torch.nn.Module | Graph", target: Any = "x86", example_inputs: Any = None,  # noqa: A001
            pipeline: "str | Pipeline" = "default", *, dynamic_shapes: Any = None, verify: bool = False,
            dump_ir: str | None = None, fusion: str | None = None, schedules: bool = True,
            tune: Any = None, calibration_data: Any = None, example_kwargs: dict[str, Any] | None = None):
    """Optimize ``model`` with ``pipeline`` and build it for ``target``; returns a CompiledModule.

    ``target`` is a preset name (``graphopt targets`` lists them), ``cuda:sm_XX`` or a TVM
    target dict. ``fusion`` overrides the backend's fusion policy: by default the graph's
    own fusion groups decide ("graph", one kernel per group of the ``fuse`` pass), and a
    pipeline without ``fuse`` builds unfused ("none"); "tvm" asks for TVM's automatic fusion.
    ``tune`` (a graphopt.targets.tuning.tuner.Tune) autotunes with MetaSchedule into its database
    first; ``calibration_data`` feeds static quantization. The module is called like the
    model, with ``example_kwargs``' keywords too, and returns the model's output structure;
    ``dynamic_shapes`` (torch.export's spec) sizes outside the captured range are InputErrors.
    """
    from graphopt import __version__
    from graphopt.artifact import CompiledModule, configure_tvm_threads
    from graphopt.cpu_features import required_cpu_features
    from graphopt.targets.registry import resolve_target

    configure_tvm_threads()  # before tuning starts measurement workers, which inherit it

    spec = resolve_target(target)
    pipe = Pipeline.parse(pipeline)
    t0 = time.perf_counter()
    graph = _as_graph(model, example_inputs, dynamic_shapes, example_kwargs)
    t1 = time.perf_counter()
    optimized = optimize(graph, pipeline=pipe, verify=verify, dump_ir=dump_ir, calibration_data=calibration_data,
                         target=spec)
    t2 = time.perf_counter()

    import tvm

    from graphopt.targets.build import build, fusion_mode
    from graphopt.targets.frontend.lower import lower_to_relax

    fusion = fusion_mode(optimized, fusion)
    mod = lower_to_relax(optimized)
    extra_passes = []
    if tune is not None:
        from graphopt.targets.tuning.tuner import tuning_passes

        extra_passes = tuning_passes(mod, spec, tune, fusion=fusion)
    try:
        executable = build(mod, spec, fusion=fusion, schedules=schedules, extra_passes=extra_passes)
    except CompilationError:
        if tune is not None and tune.log.interrupted:
            # Ctrl-C while tuning (targets/tuning/progress.py): every measured record is saved
            raise KeyboardInterrupt from None
        raise
    t3 = time.perf_counter()
    manifest = {
        "format": "graphopt-artifact",
        "format_version": 1,
        "name": optimized.name,
        "graphopt_version": __version__,
        "tvm_version": tvm.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "target": spec.to_json(),
        # the instruction-set extensions the code may use: load refuses a machine without them
        "cpu_features": required_cpu_features(spec.to_json()),
        "pipeline": str(pipe),
        "fusion": fusion,
        "entry": "main",
        "inputs": [s.to_json() for s in optimized.input_specs],
        "outputs": [s.to_json() for s in optimized.output_specs],
        "input_spec": spec_to_json(optimized.in_spec),
        "output_spec": spec_to_json(optimized.out_spec),
        "dim_ranges": {k: list(v) for k, v in sorted(optimized.dim_ranges.items())},
    }
    if "quantize" in optimized.annotations:  # which layers run in int8, which in float and why
        manifest["quantize"] = optimized.annotations["quantize"]
    device_code = getattr(executable, "graphopt_device_code", None)
    if device_code is not None:  # GPU targets: what form the kernels ship in (targets/cuda/device_code.py)
        manifest["device_code"] = device_code.to_json()
    module = CompiledModule(executable, manifest)
    module.graph = optimized
    module.stats = {"capture_s": t1 - t0, "passes_s": t2 - t1, "build_s": t3 - t2, "total_s": t3 - t0,
                    "timing": optimized.annotations.get("timing", "")}
    return module
