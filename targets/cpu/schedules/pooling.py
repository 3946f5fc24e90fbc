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
    """Window reductions: vector taps over the innermost spatial axis, parallel planes."""

    def match(self, info: base.FuncInfo, target: Target):
        if info.main is None:
            return None
        block = info.stmt(info.main)
        return block if _is_window_reduction(block) and "R" in base.iter_kinds(block) else None

    def schedule(self, info: base.FuncInfo, block, target: Target):
        return schedule_window_reduction(info.sch, info, target)


def schedule_window_reduction(sch, info: base.FuncInfo, target: Target):
    main = info.main
    block = sch.get(main)
    kinds = base.iter_kinds(block)
    n_s = kinds.count("S")
    exts = [int(iv.dom.extent) for iv in block.iter_vars]
    lanes = base.simd_lanes(target, block.body.buffer.dtype.bits)
    cores = base.num_cores(target)
    if kinds == "SSSSRR" and exts[2] > 1 and exts[3] > 1:
        done = _schedule_planar_window(sch, info, exts, lanes, cores)
        if done is not None:
            return done
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


def _row_vector(width: int, lanes: int) -> tuple[int, int] | None:
    """(vector width, vectors per row tile): whole registers (16, 8 or 4 lanes) that
    divide the output row, at most 8 of them in flight."""
    for vec in (lanes, lanes // 2, lanes // 4):
        if vec >= 4 and width % vec == 0:
            return vec, base.largest_divisor(width // vec, 8)
    return None


def _schedule_planar_window(sch, info: base.FuncInfo, exts, lanes: int, cores: int):
    """A windowed pool over NCHW planes (resnet's 3x3/2 max pool): one task per plane.

    The padding copy runs per plane under the parallel loop, so the padded plane is
    still in L1/L2 when the window reads it (as a separate pass it cost as much as the
    pool: two extra trips over a 3 MB tensor).  The output row tile accumulates in
    registers, whole vectors at a time, and is stored once."""
    plan = _row_vector(exts[3], lanes)
    if plan is None or len(info.pre) > 1 or exts[0] * exts[1] < 2 * cores:
        return None
    vec, unroll = plan
    main = info.main
    post = base.inline_post(sch, info.post)
    acc = sch.cache_write(main, 0, "local")
    n, c, y, x, ry, rx = sch.get_loops(main)
    xo, xu, xv = sch.split(x, [None, unroll, vec])
    sch.reorder(n, c, y, xo, ry, rx, xu, xv)
    plane = base.spread_loops(sch, (n, c), cores, unroll=(xu,), vectorize=xv)
    sch.reverse_compute_at(acc, xo, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(acc)[-1])
    for b in post:
        sch.reverse_compute_at(b, xo, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(b)[-1])
    init = sch.decompose_reduction(main, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    for b in info.pre:
        base.pad_in_task(sch, b, plane)
    return sch
