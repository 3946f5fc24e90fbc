"""graphopt's default (untuned) CPU schedules for TVM 0.27.

TVM 0.27 ships no CPU schedules for conv2d / matmul, so an untuned build compiles them to
naive single-threaded loops.  This package provides dlight-style ``ScheduleRule``s, one
per op family, applied to every not-yet-scheduled PrimFunc by ``cpu_schedule_pass``:

=====================  ===========================================================
rule                   handles
=====================  ===========================================================
SparseLinear           linear with a block-sparse constant weight (BSR, kept blocks only)
SparseNMLinear         linear with an N:M-sparse constant weight (kept values + 1-byte positions)
Int8DotProduct         int8 conv2d / dense tensorized with vpdpbusd, vpmaddubsw or AArch64 sdot
WinogradConv2d         3x3 stride-1 conv as Winograd F(4x4|2x2, 3x3) + fused epilogue
ConvThenDepthwise      a conv and the depthwise conv it feeds, merged into one kernel
Conv2dNCHW             dense conv2d (NCHW data, HWIO/OIHW weight) + fused epilogue
DepthwiseConv2dNCHW    depthwise / grouped conv2d + fused epilogue
Matmul                 matmul, dense, batch-matmul + fused epilogue
Pooling                max / avg / adaptive pools, other single-input window reduces
RowReduction           softmax, layer norm, other reduce-then-normalize funcs
Injective              elementwise / broadcast / layout funcs
Fallback               anything else: parallel + vectorize what can be
=====================  ===========================================================

Each rule is a ``match`` (does it apply, and with which tiles) and a ``schedule``
(base.CPURule); ``rules.dispatch`` gives a func to the first rule that matches, stamps the
rule's name on it (``graphopt.rule``), and reports a rule that raises (rules.py).  Tile
sizes come from the target's vector ISA (``graphopt.targets.registry.vector_isa``: lanes,
registers, int8 dot instruction).

Pipeline contract (see targets/build.py)::

    [*library_dispatch_passes, *cpu_layout_passes(target), LegalizeOps,
     AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR, cpu_schedule_pass(target), ...]

``cpu_layout_passes`` must run *before* LegalizeOps (it rewrites relax.nn.conv2d calls).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .base import num_cores, simd_lanes, vector_isa
from .blocked import block_depthwise_inputs
from .int8 import int8_layout_passes
from .layout import conv_weight_to_hwio, pack_dense_weights
from .sparse_rewrite import sparse_linear_weights
from .rules import RULE_ATTR, RULES, Dispatched, ScheduleRuleWarning, cpu_schedule_pass, dispatch, rule_of, \
    schedule_primfunc
from .winograd import winograd_convs

__all__ = [
    "RULES",
    "RULE_ATTR",
    "Dispatched",
    "ScheduleRuleWarning",
    "cpu_layout_passes",
    "cpu_schedule_pass",
    "dispatch",
    "num_cores",
    "rule_of",
    "schedule_primfunc",
    "simd_lanes",
    "vector_isa",
]


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
    * sparse_linear_weights: constant dense weights with enough all-zero blocks -> block-sparse
      kernels (sparse_linear.py); before pack_dense_weights, which packs the rest.
    * pack_dense_weights: constant dense weights [K, N] -> register-tile panels (layout.py).
    * block_depthwise_inputs: a conv kernel hands the depthwise conv after it NCHW[L]c
      (blocked.py).
    """
    if target is not None and tvm.target.Target(target).kind.name != "llvm":
        return []
    lanes = vector_isa(tvm.target.Target(target)).lanes()
    return [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
            *int8_layout_passes(target), winograd_convs(lanes), conv_weight_to_hwio, sparse_linear_weights(lanes),
            pack_dense_weights(lanes),
            block_depthwise_inputs(lanes)]
