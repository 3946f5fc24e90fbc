"""Elementwise / injective funcs, and the catch-all fallback.

``Injective``: every block is spatial (relu, add, clip, reshape, transpose, concat,
layout copies ...).  Each block is compute-inlined into the last one where possible;
the rest get ``parallel(outer fused loops)`` + ``vectorize(inner loop)``.

``Fallback``: catches every PrimFunc no other rule took, so nothing is left naive and
single-threaded.  First the data movement between the real work is inlined (see
``_inline_data_movement``: the attention group of the transformer is ~25 reshape /
transpose / take copies around two batch matmuls and a softmax, each of which was a
full parallel pass over memory).  Spatial blocks are treated as above; reduction blocks get their
leading spatial loops fused and parallelized (when big enough); multiply-accumulate
blocks inside bigger funcs (the batch matmuls of legalized ``nn.attention``) get the
matmul rule's register-blocked GEMM schedule.  Any failure degrades to
the unscheduled function for that block only (never to a build error).
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.ir.expr import Call  # TVM 0.27: TIR expressions live in tvm.ir.expr
from tvm.target import Target

from . import base
from .matmul import is_gemm_block, schedule_gemm_block

# erf(x) = x * P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf(4) rounds to 1 in float32):
# the rational approximation of Eigen and of TVM's topi.fast_erf, within a few ulp.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def erf_as_rational(call):
    """``tirx.erf`` on float32 scalars and vectors as plain arithmetic.

    LLVM has no erf instruction or vector library call: left alone, every element of an
    erf-GELU epilogue is a scalar ``erff`` call, which took as long as the GEMM before it
    (BERT's 768 -> 3072 linear + GELU, one core).  As arithmetic it vectorizes with the
    epilogue.  Other dtypes keep the libm call."""
    dtype = str(call.ty)
    if dtype != "float32" and not dtype.startswith("float32x"):
        return call
    lanes = 1 if dtype == "float32" else int(dtype[len("float32x"):])

    def const(value):
        scalar = tirx.const(value, "float32")
        return scalar if lanes == 1 else tirx.Broadcast(scalar, lanes)

    x = tirx.max(tirx.min(call.args[0], const(4.0)), const(-4.0))
    x2 = x * x
    p = const(_ERF_P[0])
    for coeff in _ERF_P[1:]:
        p = x2 * p + const(coeff)
    q = const(_ERF_Q[0])
    for coeff in _ERF_Q[1:]:
        q = x2 * q + const(coeff)
    return x * p / q


if tvm.ir.Op.get("tirx.erf").get_attr("llvm.FLowerIntrinsic") is None:
    tvm.ir.register_op_attr("tirx.erf", "llvm.FLowerIntrinsic", erf_as_rational)


class Injective(base.CPURule):
    """Funcs of spatial blocks only: inline what can be, parallel + vectorize the rest."""

    def match(self, info: base.FuncInfo, target: Target):
        if not info.blocks or any("R" in base.iter_kinds(info.stmt(b)) for b in info.blocks):
            return None
        return True

    def schedule(self, info: base.FuncInfo, match, target: Target):
        sch = info.sch
        lanes = base.simd_lanes(target)
        cores = base.num_cores(target)
        outs = base.output_blocks(sch)
        remaining = []
        for b in info.blocks:
            if sch.get(b).name_hint not in outs:
                try:
                    sch.compute_inline(b)
                    continue
                except Exception:  # noqa: BLE001
                    pass
            remaining.append(b)
        for b in remaining:
            base.parallel_vectorize_injective(sch, b, lanes, cores)
        return sch


class Fallback(base.CPURule):
    """Every func with a root block: inline data movement, schedule each block by its kind."""

    def analyze(self, func: tirx.PrimFunc):
        return base.root_blocks(func)

    def match(self, info: base.FuncInfo, target: Target):
        return True

    def schedule(self, info: base.FuncInfo, match, target: Target):
        sch = info.sch
        lanes = base.simd_lanes(target)
        cores = base.num_cores(target)
        blocks = _inline_data_movement(sch, info.blocks)
        for b in blocks:
            try:
                _schedule_block(sch, b, lanes, cores, target)
            except Exception:  # noqa: BLE001 - leave this block as it was
                pass
        return sch


def _inline_data_movement(sch: s_tir.Schedule, blocks: list) -> list:
    """compute_inline the spatial blocks that only move or cheaply transform data.

    A block is inlined into its consumers when it writes no function output, none of its
    consumers is a GEMM (a matmul operand stays materialized, so the GEMM's vector loads
    stay contiguous), and recomputing it is cheap: one consumer, or a body without calls
    (an exp feeding both the sum and the normalization of a softmax is computed once).
    Returns the blocks that remain, in order."""
    outs = base.output_blocks(sch)
    remaining = []
    for b in blocks:
        blk = sch.get(b)
        if "R" in base.iter_kinds(blk) or blk.name_hint in outs:
            remaining.append(b)
            continue
        consumers = sch.get_consumers(b)
        if (not consumers or any(is_gemm_block(sch.get(c)) for c in consumers)
                or (len(consumers) > 1 and _has_calls(blk.body))):
            remaining.append(b)
            continue
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001 - e.g. a non-trivial write index; keep the copy
            remaining.append(b)
    return remaining


def _has_calls(stmt) -> bool:
    """True when ``stmt`` calls an intrinsic other than a select (exp, tanh, erf ...);
    a call on constants, like attention's 1/sqrt(64), folds away and does not count."""
    return any(isinstance(e, Call) and getattr(e.op, "name", "") != "tirx.if_then_else"
               and not all(isinstance(arg, (tirx.IntImm, tirx.FloatImm)) for arg in e.args)
               for e in base.subexpressions(stmt))


def _schedule_block(sch: s_tir.Schedule, b, lanes: int, cores: int, target: Target) -> None:
    blk = sch.get(b)
    kinds = base.iter_kinds(blk)
    loops = sch.get_loops(b)
    if len(loops) != len(kinds) or any(base.loop_extent(sch, lp) is None for lp in loops):
        return
    if is_gemm_block(blk):
        # e.g. the two batch matmuls inside relax's legalized nn.attention.
        schedule_gemm_block(sch, b, target)
        return
    if "R" not in kinds:
        base.parallel_vectorize_injective(sch, b, lanes, cores)
        return
    n_lead = len(kinds) - len(kinds.lstrip("S"))
    total = 1
    for lp in loops:
        total *= base.loop_extent(sch, lp)
    if n_lead and cores > 1 and total >= 1 << 14:
        lead = loops[:n_lead]
        fused = sch.fuse(*lead) if n_lead > 1 else lead[0]
        sch.parallel(fused)
