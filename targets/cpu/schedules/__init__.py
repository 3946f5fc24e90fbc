"""graphopt's default (untuned) CPU schedules for TVM 0.27.

TVM 0.27 ships no CPU schedules for conv2d / matmul, so an untuned build compiles them to
naive single-threaded loops.  This package provides dlight-style ``ScheduleRule``s, one
per op family, applied to every not-yet-scheduled PrimFunc by ``cpu_schedule_pass``:

=====================  ===========================================================
rule                   handles
=====================  ===========================================================
WinogradConv2d         3x3 stride-1 conv as Winograd F(4x4|2x2, 3x3) + fused epilogue
Conv2dNCHW             dense conv2d (NCHW data, HWIO/OIHW weight) + fused epilogue
DepthwiseConv2dNCHW    depthwise / grouped conv2d + fused epilogue
Matmul                 matmul, dense, batch-matmul + fused epilogue
Pooling                max / avg / adaptive pools, other single-input window reduces
RowReduction           softmax, layer norm, other reduce-then-normalize funcs
Injective              elementwise / broadcast / layout funcs
Fallback               anything else: parallel + vectorize what can be
=====================  ===========================================================

The first rule whose applicability check passes schedules the func; if its ``apply``
raises, the next rule is tried, so a schedule bug degrades performance, never the build.

Pipeline contract (see targets/build.py)::

    [*library_dispatch_passes, *cpu_layout_passes(target), LegalizeOps,
     AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR, cpu_schedule_pass(target), ...]

``cpu_layout_passes`` must run *before* LegalizeOps (it rewrites relax.nn.conv2d calls).
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax, tirx

from .base import is_scheduled, num_cores, simd_lanes
from .blocked import block_depthwise_inputs
from .conv2d import Conv2dNCHW
from .conv_depthwise import ConvThenDepthwise
from .depthwise import DepthwiseConv2dNCHW
from .elementwise import Fallback, Injective
from .int8 import Int8DotProduct, int8_layout_passes
from .layout import conv_weight_to_hwio, pack_dense_weights
from .matmul import Matmul
from .pooling import Pooling
from .reduction import RowReduction
from .winograd import WinogradConv2d, winograd_convs

__all__ = [
    "RULES",
    "cpu_layout_passes",
    "cpu_schedule_pass",
    "schedule_primfunc",
    "simd_lanes",
    "num_cores",
]

_log = logging.getLogger(__name__)

RULES = [
    Int8DotProduct(),
    WinogradConv2d(),
    ConvThenDepthwise(),
    Conv2dNCHW(),
    DepthwiseConv2dNCHW(),
    Matmul(),
    Pooling(),
    RowReduction(),
    Injective(),
    Fallback(),
]


def schedule_primfunc(func: tirx.PrimFunc, target: tvm.target.Target, rules=None):
    """Apply the first matching rule; return (rule_name, scheduled func) or (None, func)."""
    for rule in rules if rules is not None else RULES:
        if not rule.is_target_available(target):
            continue
        try:
            sch = rule.apply(func, target, False)
        except Exception as err:  # noqa: BLE001 - a rule bug must not break the build
            _log.debug("schedule rule %s failed: %s", type(rule).__name__, err)
            continue
        if sch is None:
            continue
        if isinstance(sch, list):
            sch = sch[0]
        return type(rule).__name__, sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return None, func


def cpu_schedule_pass(target: tvm.target.Target, rules=None) -> tvm.transform.Pass:
    """Module pass: schedule every PrimFunc that carries no "tirx/tir.is_scheduled" attr.

    Functions already scheduled (e.g. by MetaScheduleApplyDatabase) are left untouched so
    tuned records win.  Uses ``target`` (or the func's own "target" attr) for the SIMD
    width and core count."""
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target

    @tvm.transform.module_pass(opt_level=0, name="graphopt.CPUSchedule")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            func_target = func.attrs.get("target") if func.attrs is not None else None
            rule, new = schedule_primfunc(func, func_target or target, rules)
            if rule is not None:
                updates[gv] = new
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def cpu_layout_passes(target: tvm.target.Target) -> list:
    """Relax passes to run before LegalizeOps for CPU targets.

    * DecomposeOpsForInference: batch_norm (inference) -> elementwise affine ops, which
      FoldConstant folds into per-channel scale/shift and FuseOps fuses into the conv's
      epilogue (otherwise batch_norm is an opaque multi-output func after every conv).
    * CanonicalizeBindings: the decomposition leaves ``TupleGetItem(Tuple(...), 0)``
      between the BN affine and the following relu/clip/residual add, and FuseOps stops
      at tuples: without it every conv is followed by a separate relu/clip pass over
      memory (resnet18: 24 -> 19 kernels, conv+BN+add+relu in one).
    * winograd_convs: 3x3 stride-1 convs with enough tiles -> Winograd kernels (winograd.py).
    * conv_weight_to_hwio: constant conv2d weights OIHW -> HWIO (see layout.py).
    * pack_dense_weights: constant dense weights [K, N] -> register-tile panels (layout.py).
    * block_depthwise_inputs: a conv kernel hands the depthwise conv after it NCHW[L]c
      (blocked.py).
    """
    if target is not None and tvm.target.Target(target).kind.name != "llvm":
        return []
    return [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
            *int8_layout_passes(target), winograd_convs(simd_lanes(target)), conv_weight_to_hwio, pack_dense_weights(simd_lanes(target)),
            block_depthwise_inputs(simd_lanes(target))]
