"""Build a lowered Relax module for a target: the Relax/TIR pass pipeline and tvm.compile.

The pipeline follows TVM's default one (dispatch, legalize, fuse, schedule, lower to the
VM) with the stages graphopt controls spelled out:

* fusion — ``"tvm"`` runs TVM's automatic FuseOps/FuseTIR; ``"none"`` turns it off, so
  every op is its own kernel (A/B comparisons against graphopt's own ``fuse`` are real);
* schedules — CPU PrimFuncs get graphopt's schedule rules (targets/schedules) unless a
  tuning record already scheduled them; GPU PrimFuncs get TVM's dlight GPU rules, which
  bind every loop nest to threads (an unscheduled kernel cannot run on a GPU at all).
"""

from __future__ import annotations

import os
from typing import Literal

import tvm
from tvm import relax

from graphopt.errors import CompilationError
from graphopt.targets.registry import TargetSpec

Fusion = Literal["tvm", "none"]


def _cpu_schedule_passes(target: tvm.target.Target) -> tuple[list, list]:
    """(layout passes before legalization, schedule passes after fusion) for CPU targets."""
    try:
        from graphopt.targets.schedules import cpu_layout_passes, cpu_schedule_pass
    except ImportError:  # the schedule rules are optional while they are being written
        return [], []
    return list(cpu_layout_passes(target)), [cpu_schedule_pass(target)]


def _gpu_schedule_passes() -> list:
    from tvm.s_tir import dlight as dl

    return [dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                    dl.gpu.GeneralReduction(), dl.gpu.Fallback())]


def relax_pipeline(spec: TargetSpec, *, fusion: Fusion = "tvm", schedules: bool = True,
                   extra_passes: list | None = None) -> tvm.transform.Pass:
    """The Relax pass pipeline for ``spec``; ``extra_passes`` run after legalization and fusion
    (tuning applies its database there)."""
    target = spec.tvm_target()
    # the submodule, not the package: only it exports dataflow_lower_passes in 0.27
    if spec.kind == "cuda":
        from tvm.relax.backend.cuda import pipeline as backend
    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend
    layout, schedule = ([], _gpu_schedule_passes()) if spec.kind == "cuda" else _cpu_schedule_passes(target)
    if not schedules and spec.kind != "cuda":
        layout, schedule = [], []
    fuse = [relax.transform.FuseOps(), relax.transform.FuseTIR()] if fusion == "tvm" else []
    passes = [
        *backend.library_dispatch_passes(target),
        *layout,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        *fuse,
        *(extra_passes or []),
        *schedule,
        *backend.dataflow_lower_passes(target),
        *backend.finalize_passes(target),
    ]

    @tvm.transform.module_pass(opt_level=0, name="graphopt_build")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def build(mod: tvm.IRModule, spec: TargetSpec, *, fusion: Fusion = "tvm", schedules: bool = True,
          extra_passes: list | None = None) -> relax.VMExecutable:
    """Compile ``mod`` for ``spec``; failures become CompilationError with TVM's last line."""
    target = spec.tvm_target()
    pipeline = relax_pipeline(spec, fusion=fusion, schedules=schedules, extra_passes=extra_passes)
    try:
        return tvm.compile(mod, target=target, relax_pipeline=pipeline)
    except Exception as e:  # TVM raises InternalError/TVMError/ValueError from deep inside
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise CompilationError(f"TVM build for target {spec.name} failed: "
                               f"{lines[-1] if lines else type(e).__name__}") from e


def fusion_mode(graph, requested: str | None) -> Fusion:
    """The backend fusion policy for ``graph``: what the user asked for, else TVM's own."""
    return requested or "tvm"  # type: ignore[return-value]


def count_kernels(mod: tvm.IRModule) -> int:
    """Number of TIR PrimFuncs (kernels) in a Relax module after legalization/fusion."""
    return sum(1 for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))


def default_num_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
