"""Pooling (max / avg / adaptive) and other single-input window reductions.

Matches a func whose one reduction block reads a single tensor (``C = max(C, A[..])``
or ``C = C + A[..]``), e.g. topi's pool_max / pool_sum / adaptive_pool_sum.
The schedule moves the reduction loops *inside* the spatial tile and vectorizes the
innermost spatial axis with extent > 1 (output width for pools, channels for global /
adaptive pools), so each window tap is one vector max/add; the (n, c) loops run in
parallel.  Padding producers and the avg-divide epilogue are scheduled as injective
blocks (parallel + vectorized); small epilogues are inlined into the write-back.
"""

from __future__ import annotations

from tvm import tirx
from tvm.target import Target

from . import base


def _is_window_reduction(block) -> bool:
    kinds = base.iter_kinds(block)
    n_s = len(kinds) - len(kinds.lstrip("S"))
    if n_s == 0 or kinds[n_s:] != "R" * (len(kinds) - n_s):
        return False
    body = block.body
    if not isinstance(body, tirx.BufferStore):
        return False
    if base.mac_operands(block) is not None:
        return False  # a two-operand multiply-accumulate (conv / matmul family)
    return len(block.reads) <= 2


class Pooling(base.CPURule):
    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not self.is_target_available(target):
            return None
        info = base.analyze(func)
        if info is None or info.main is None:
            return None
        sch = info.sch
        block = sch.get(info.main)
        if not _is_window_reduction(block) or "R" not in base.iter_kinds(block):
            return None
        return schedule_window_reduction(sch, info, target)


def schedule_window_reduction(sch, info: base.FuncInfo, target: Target):
    main = info.main
    block = sch.get(main)
    kinds = base.iter_kinds(block)
    n_s = kinds.count("S")
    exts = [int(iv.dom.extent) for iv in block.iter_vars]
    lanes = base.simd_lanes(target, block.body.buffer.dtype.bits)
    cores = base.num_cores(target)
    loops = sch.get_loops(main)
    spatial, reduce = loops[:n_s], loops[n_s:]
    # Vector axis: innermost spatial axis with extent > 1.
    vaxis = max((i for i in range(n_s) if exts[i] > 1), default=None)
    post = base.inline_post(sch, info.post)
    if vaxis is None:
        outer = sch.fuse(*spatial) if n_s > 1 else spatial[0]
        inner_spatial = []
    else:
        vext = exts[vaxis]
        vi = vext if vext <= 2 * lanes else (base.largest_divisor(vext, 2 * lanes, 4) or
                                               base.largest_divisor(vext, 2 * lanes))
        vo, vv = sch.split(spatial[vaxis], [None, vi])
        others = [lp for i, lp in enumerate(spatial) if i != vaxis]
        sch.reorder(*others, vo, *reduce, vv)
        outer = sch.fuse(*others, vo) if others else vo
        inner_spatial = [vv]
    total = 1
    for e in exts:
        total *= e
    if cores > 1 and total >= 1 << 14:
        sch.parallel(outer)
    if inner_spatial and reduce:
        sch.decompose_reduction(main, reduce[0])
        # The update block's vector loop is the innermost one after decomposition.
        try:
            sch.vectorize(sch.get_loops(main)[-1])
        except Exception:  # noqa: BLE001 - e.g. strided gather the vectorizer refuses
            pass
    for b in post:
        try:
            sch.reverse_compute_at(b, outer, preserve_unit_loops=True)
            lps = sch.get_loops(b)
            if len(lps) > 1:
                sch.vectorize(lps[-1])
        except Exception:  # noqa: BLE001
            base.parallel_vectorize_injective(sch, b, lanes, cores)
    for b in info.pre:
        base.parallel_vectorize_injective(sch, b, lanes, cores)
    return sch
