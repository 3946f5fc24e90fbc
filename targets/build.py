"""Build a lowered Relax module for a target: the Relax/TIR pass pipeline and tvm.compile.

The pipeline follows TVM's default one (dispatch, legalize, fuse, schedule, lower to the
VM) with the stages graphopt controls spelled out:

* fusion — ``"graph"`` makes one kernel per kernel function the lowering emitted (each
  fusion group of graphopt's ``fuse`` pass, and each op outside a group): they become
  ``Primitive`` functions (constants lifted to parameters) that FuseTIR turns into one
  PrimFunc each, with no FuseOps; ``"tvm"`` runs TVM's automatic FuseOps/FuseTIR; ``"none"``
  turns fusion off, so every op is its own kernel (A/B comparisons are real). The last two
  first inline the lowering's kernel functions back into ``main``;
* schedules — CPU PrimFuncs get graphopt's schedule rules (targets/cpu/schedules) unless a
  tuning record already scheduled them; GPU PrimFuncs get TVM's dlight GPU rules, which
  bind every loop nest to threads (an unscheduled kernel cannot run on a GPU at all).
"""

from __future__ import annotations

import os
from typing import Literal

import tvm
from tvm import relax, s_tir

from graphopt.errors import CompilationError
from graphopt.targets.cpu.tir_pipeline import tir_pipeline_for
from graphopt.targets.cpu.legalize import CPU_LEGALIZE
from graphopt.targets.frontend.indexing import OWN_SHAPES_ATTR
from graphopt.targets.registry import TargetSpec

Fusion = Literal["graph", "tvm", "none"]
FUSION_MODES = ("graph", "tvm", "none")


def _cpu_schedule_passes(target: tvm.target.Target) -> tuple[list, list]:
    """(layout passes before legalization, schedule passes after fusion) for CPU targets."""
    from graphopt.targets.cpu.schedules import cpu_layout_passes, cpu_schedule_pass

    # Weights a schedule reads in a packed order (conv2d.py) come with a copy marked as a
    # layout-rewrite preprocess: split it out of the kernel and run it on the constant.
    return list(cpu_layout_passes(target)), [cpu_schedule_pass(target), _split_weight_prepacking,
                                             relax.transform.FoldConstant()]


LAYOUT_REWRITE_PREPROC = "meta_schedule.layout_rewrite_preproc"


def _has_layout_rewrite_preproc(func: tvm.tirx.PrimFunc) -> bool:
    """True when a block of ``func`` is marked as a weight's layout-rewrite preprocess."""
    pending = [func.body]
    while pending:
        stmt = pending.pop()
        if isinstance(stmt, s_tir.SBlock) and LAYOUT_REWRITE_PREPROC in stmt.annotations:
            return True
        pending.extend(child for name in ("body", "block", "init", "then_case", "else_case")
                       if (child := getattr(stmt, name, None)) is not None)
        pending.extend(getattr(stmt, "seq", ()))
    return False


@tvm.transform.module_pass(opt_level=0, name="graphopt.SplitWeightPrepacking")
def _split_weight_prepacking(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """TVM's SplitLayoutRewritePreproc, shown only the kernels it splits.

    It reads every PrimFunc of the module as a root block over block subtrees and fails on a
    kernel that is plain loops without blocks (TOPI's scan, sort, top-k and scatter kernels),
    although it would leave such a kernel unchanged. The other kernels are set aside while it
    runs and put back after it."""
    split = {gv for gv, f in mod.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and _has_layout_rewrite_preproc(f)}
    if not split:
        return mod
    aside = {gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and gv not in split}
    shown = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in aside}, attrs=mod.attrs)
    out = relax.transform.SplitLayoutRewritePreproc()(shown)
    out.update({gv: f for gv, f in aside.items()})
    return out


def _gpu_schedule_passes() -> list:
    from tvm.s_tir import dlight as dl

    return [dl.ApplyDefaultSchedule(_int8_safe_matmul_rule(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                    dl.gpu.GeneralReduction(), dl.gpu.Fallback())]


def _int8_safe_matmul_rule():
    """dlight's GPU Matmul rule without its int8 tensor-core path.

    For an int8 x int8 -> int32 matmul (a quantized linear or 1x1 conv) with every extent
    over 64, dlight's Matmul picks ``MatmulInt8Tensorization`` (WMMA fragments in dynamic
    shared memory) on sm_70+, and TVM 0.27's CUDA codegen then fails on it ("Check failed:
    (it != fragment_info_.end())"): mobilenet_v2 quantized to int8 did not build for cuda.
    The rule decides on tensor cores from the target's arch only, so for functions with
    int8 buffers it is shown the same target on a pre-Volta arch, which gives its generic
    tiled SIMT schedule; everything else (fp32, fp16 tensor cores) is unchanged.
    """
    from tvm.s_tir import dlight as dl

    class Int8SafeMatmul(dl.gpu.Matmul):
        def apply(self, func, target, tunable):
            if isinstance(func, tvm.tirx.PrimFunc) and _has_int8_buffers(func):
                target = _without_tensor_cores(target)
            return super().apply(func, target, tunable)

    return Int8SafeMatmul()


def _has_int8_buffers(func: tvm.tirx.PrimFunc) -> bool:
    # TVM 0.27 PrimFunc parameters are the buffers themselves, typed by element dtype
    return any(str(getattr(param, "dtype", "")) in ("int8", "uint8") for param in func.params)


def _without_tensor_cores(target: tvm.target.Target) -> tvm.target.Target:
    config = dict(target.export())
    config["arch"] = "sm_61"  # the last arch before tensor cores (dp4a int8 is still there)
    return tvm.target.Target(config)


def relax_pipeline(spec: TargetSpec, *, fusion: Fusion = "tvm", schedules: bool = True,
                   extra_passes: list | None = None) -> tvm.transform.Pass:
    """The Relax pass pipeline for ``spec``; ``extra_passes`` run after legalization and fusion
    (tuning applies its database there)."""
    target = spec.tvm_target()
    passes = [*_passes_until_scheduled(spec, fusion, schedules, extra_passes), *_lowering_passes(spec)]

    @tvm.transform.module_pass(opt_level=0, name="graphopt_build")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def scheduled_module(mod: tvm.IRModule, spec: TargetSpec, *, fusion: Fusion = "tvm",
                     schedules: bool = True) -> tvm.IRModule:
    """``mod`` legalized, fused and scheduled, before lowering to the VM: every kernel is a
    PrimFunc that ``main`` calls with call_tir (benchmarks/profile_kernels.py times them)."""
    passes = [*_passes_until_scheduled(spec, fusion, schedules, None), relax.transform.RewriteDataflowReshape()]
    with spec.tvm_target():
        return tvm.transform.Sequential(passes)(mod)


def _backend(spec: TargetSpec):
    # the submodule, not the package: only it exports dataflow_lower_passes in 0.27
    if spec.kind == "cuda":
        from tvm.relax.backend.cuda import pipeline as backend
    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend
    return backend


def _passes_until_scheduled(spec: TargetSpec, fusion: Fusion, schedules: bool, extra_passes: list | None) -> list:
    target = spec.tvm_target()
    layout, schedule = ([], _gpu_schedule_passes()) if spec.kind == "cuda" else _cpu_schedule_passes(target)
    if not schedules and spec.kind != "cuda":
        layout, schedule = [], []
    prologue, fuse = fusion_passes(fusion)
    return [
        *prologue,
        *_backend(spec).library_dispatch_passes(target),
        *layout,
        _legalize(spec),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        *fuse,
        *(extra_passes or []),
        *schedule,
    ]



def _legalize(spec: TargetSpec) -> tvm.transform.Pass:
    return relax.transform.LegalizeOps(customize_legalize_map=None if spec.kind == "cuda" else CPU_LEGALIZE)


def _lowering_passes(spec: TargetSpec) -> list:
    target = spec.tvm_target()
    backend = _backend(spec)
    return [*backend.dataflow_lower_passes(target), *backend.finalize_passes(target)]


def build(mod: tvm.IRModule, spec: TargetSpec, *, fusion: Fusion = "tvm", schedules: bool = True,
          extra_passes: list | None = None) -> relax.VMExecutable:
    """Compile ``mod`` for ``spec``; failures become CompilationError with TVM's last line."""
    target = spec.tvm_target()
    pipeline = relax_pipeline(spec, fusion=fusion, schedules=schedules, extra_passes=extra_passes)
    try:
        executable = tvm.compile(mod, target=target, relax_pipeline=pipeline, tir_pipeline=tir_pipeline_for(target))
    except Exception as e:  # TVM raises InternalError/TVMError/ValueError from deep inside
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise CompilationError(f"TVM build for target {spec.name} failed: "
                               f"{lines[-1] if lines else type(e).__name__}") from e
    if spec.kind == "cuda":
        from graphopt.targets.cuda.device_code import compile_device_code

        executable.graphopt_device_code = compile_device_code(executable, target)
    return executable


def fusion_passes(fusion: Fusion) -> tuple[list, list]:
    """(passes before legalization, passes after legalization + FoldConstant) for ``fusion``."""
    if fusion not in FUSION_MODES:
        raise CompilationError(f"unknown fusion mode {fusion!r}; valid modes: {', '.join(FUSION_MODES)}")
    if fusion == "graph":
        return [], [_kernels_to_primitive, relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()]
    inline = [relax.transform.InlinePrivateFunctions()]
    if fusion == "tvm":
        return inline, [relax.transform.FuseOps(), relax.transform.FuseTIR()]
    return inline, []


@relax.expr_functor.mutator
class _LiftConstants(relax.PyExprMutator):
    """Replace every tensor constant in a kernel function by a new parameter (FuseTIR
    accepts no constants inside a Primitive function); ``lifted`` keeps (param, constant)."""

    def __init__(self):
        super().__init__()
        self.lifted: list[tuple[relax.Var, relax.Expr]] = []

    def visit_generic_const_(self, op: relax.Expr) -> relax.Expr:  # relax.Constant before TVM 0.27
        for param, const in self.lifted:
            if const.same_as(op):
                return param
        param = relax.Var(f"c{len(self.lifted)}", op.ty)
        self.lifted.append((param, op))
        return param


@relax.expr_functor.mutator
class _PassLiftedConstants(relax.PyExprMutator):
    """Point every call of a kernel function at its new version, passing the lifted constants."""

    def __init__(self, new_kernels: dict):
        super().__init__()
        self.new_kernels = new_kernels  # old GlobalVar -> (new GlobalVar, constants)

    def visit_call_(self, op: relax.Call) -> relax.Expr:
        call = super().visit_call_(op)
        for old, (new, consts) in self.new_kernels.items():
            if call.op.same_as(old):
                return relax.Call(new, [*call.args, *consts], call.attrs, call.ty_args, call.span)
        return call


VM_ALIGNMENT = 64  # bytes: how the Relax VM allocates tensors, and how TE declares buffers


def _declares_own_buffers(func: tvm.tirx.PrimFunc) -> bool:
    """True when a parameter of ``func`` is a buffer with a free offset or an alignment other
    than the VM's, as TOPI's extern kernels (scatter, sort, top-k, scan) declare them."""
    return any(isinstance(ty := getattr(p, "ty", None), tvm.tirx.BufferType)
               and (not isinstance(ty.elem_offset, tvm.tirx.IntImm) or ty.data_alignment != VM_ALIGNMENT)
               for p in func.params)


def _calls_extern_kernel(mod: tvm.IRModule, func: relax.Function) -> bool:
    """True when ``func`` calls a PrimFunc that declares its buffers its own way (an extern
    kernel fed by the index checks or views before it, an index check of a dynamic length).

    FuseTIR cannot merge such calls into one PrimFunc: it maps each tensor to one buffer and
    requires every PrimFunc touching the tensor to declare the same buffer type."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    for block in getattr(func.body, "blocks", ()):
        for binding in block.bindings:
            call = binding.value
            if isinstance(call, relax.Call) and call.op.same_as(call_tir):
                callee = mod.functions.get(call.args[0])
                if isinstance(callee, tvm.tirx.PrimFunc) and (
                        _declares_own_buffers(callee) or OWN_SHAPES_ATTR in (callee.attrs or {})):
                    return True
    return False


@tvm.transform.module_pass(opt_level=0, name="graphopt.KernelsToPrimitive")
def _kernels_to_primitive(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Mark the lowering's kernel functions Primitive, with their constants lifted to params.

    A kernel function that calls an extern kernel stays a plain function whose calls run one
    by one (see ``_calls_extern_kernel``)."""
    from graphopt.targets.frontend.lower import KERNEL_ATTR

    def is_kernel(func) -> bool:
        return isinstance(func, relax.Function) and func.attrs is not None and KERNEL_ATTR in func.attrs

    builder = relax.BlockBuilder(tvm.IRModule({g: f for g, f in mod.functions.items() if not is_kernel(f)},
                                              attrs=mod.attrs))
    new_kernels = {}
    for gvar, func in mod.functions.items():
        if not is_kernel(func):
            continue
        lifter = _LiftConstants()
        body = lifter.visit_expr(func.body)
        params = [*func.params, *(p for p, _ in lifter.lifted)]
        new = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        if not _calls_extern_kernel(mod, func):
            new = new.with_attr("Primitive", True)
        # a new GlobalVar: the old one's type still says the old number of parameters
        new_gvar = builder.add_func(new, gvar.name_hint)
        new_kernels[gvar] = (new_gvar, [c for _, c in lifter.lifted])
    out = builder.get()
    for gvar, func in list(out.functions.items()):
        if isinstance(func, relax.Function) and not is_kernel(func):
            out[gvar] = _PassLiftedConstants(new_kernels).visit_expr(func)
    return out


def fusion_mode(graph, requested: str | None) -> Fusion:
    """The backend fusion policy for ``graph``.

    What the user asked for, else ``"graph"`` when the graph carries fusion groups (the
    ``fuse`` pass ran), else ``"none"``: with no ``fuse`` in the pipeline TVM's automatic
    fusion is off too, so pipelines with and without ``fuse`` compare honestly.
    """
    if requested is not None:
        if requested not in FUSION_MODES:
            raise CompilationError(f"unknown fusion mode {requested!r}; valid modes: {', '.join(FUSION_MODES)}")
        return requested  # type: ignore[return-value]
    has_groups = any("fusion_group" in n.meta for n in graph.nodes)
    return "graph" if has_groups else "none"


def kernel_rules(mod: tvm.IRModule, spec: TargetSpec, fusion: Fusion) -> list[tuple[str, str | None]]:
    """(PrimFunc name, the graphopt schedule rule that scheduled it, or None) for every kernel
    of ``mod`` (from lower_to_relax) built for ``spec``, in launch order."""
    from graphopt.targets.cpu.schedules import rule_of

    scheduled = scheduled_module(mod, spec, fusion=fusion)
    return [(name, rule_of(scheduled[name])) for name in dict.fromkeys(name for name, _ in tir_calls(scheduled))]


def count_kernels(mod: tvm.IRModule) -> int:
    """Number of TIR PrimFuncs (kernels) in a Relax module after legalization/fusion."""
    return sum(1 for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))


def kernel_launches(mod: tvm.IRModule, spec: TargetSpec, fusion: Fusion) -> list[tuple[str, int]]:
    """(PrimFunc name, bytes it writes) for every kernel ``main`` launches, in order, when
    ``mod`` (from lower_to_relax) is legalized and fused with ``fusion``. Reshapes that
    TVM turns into no-copy views are not kernels."""
    prologue, fuse = fusion_passes(fusion)
    seq = tvm.transform.Sequential([*prologue, _legalize(spec), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FoldConstant(), *fuse, relax.transform.RewriteDataflowReshape()])
    with spec.tvm_target():
        fused = seq(mod)
    return [(name, _sinfo_bytes(var.ty)) for name, var in tir_calls(fused)]


def tir_calls(mod: tvm.IRModule) -> list[tuple[str, relax.Var]]:
    """(PrimFunc name, the var bound to its result) for each call_tir of ``main``, in order."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    calls = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op.same_as(call_tir):
                calls.append((value.args[0].name_hint, binding.var))
    return calls


def _sinfo_bytes(sinfo) -> int:
    if isinstance(sinfo, relax.TupleType):
        return sum(_sinfo_bytes(f) for f in sinfo.fields)
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return 0
    n = 1
    for d in sinfo.shape.values:
        if not isinstance(d, tvm.tirx.IntImm):
            return 0  # symbolic size
        n *= int(d)
    return n * tvm.runtime.DataType(sinfo.dtype).bits // 8


def default_num_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
