"""Depthwise / grouped conv2d in NCHW with fused epilogue.

A depthwise conv does KH*KW multiply-adds per output, so it is bound by memory and
loop overhead, not FMAs.  The schedule vectorizes along the output *width* (the input
row is contiguous for stride 1, a strided load for stride 2; the weight of one tap is a
scalar broadcast), keeps a one-row accumulator tile in registers via cache_write,
parallelizes over (n, channel), and folds the epilogue (BN affine, clip/relu6 ...) into
the write-back.  The padding copy stays a separate parallel, vectorized pass.

Also matches grouped convs with more than one channel per group: the reduction over rc
is just a longer loop of broadcast taps.
"""

from __future__ import annotations

from tvm import tirx
from tvm.target import Target

from . import base


def match_grouped_conv2d(info: base.FuncInfo):
    if info is None or info.main is None:
        return None
    block = info.stmt(info.main)
    if base.iter_kinds(block) != "SSSSRRR":
        return None
    ops = base.mac_operands(block)
    if ops is None:
        return None
    _store, a, b = ops
    iv = [v.var for v in block.iter_vars]
    for data, weight in ((a, b), (b, a)):
        if len(data.indices) != 4 or len(weight.indices) != 4:
            continue
        # Grouped: the data's channel index depends on the output channel f.
        ch = data.indices[1]
        if isinstance(ch, tirx.Var) and ch.same_as(iv[4]):
            return None  # dense conv (conv2d.py)
        if str(iv[1]) in str(ch):
            return data, weight
    return None


class DepthwiseConv2dNCHW(base.CPURule):
    """Width-vectorized depthwise / grouped conv2d."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not self.is_target_available(target):
            return None
        info = base.analyze(func)
        if match_grouped_conv2d(info) is None:
            return None
        sch = info.sch
        main = info.main
        block = sch.get(main)
        x_ext = int(block.iter_vars[3].dom.extent)
        lanes = base.simd_lanes(target, block.body.buffer.dtype.bits)
        cores = base.num_cores(target)
        # Vector = the widest power of two <= lanes dividing the row; a few of them
        # unrolled form the register tile.  (Odd widths such as <28 x float> make LLVM
        # emit shuffle-heavy code.)
        vw = 1
        while vw * 2 <= lanes and x_ext % (vw * 2) == 0:
            vw *= 2
        unroll = base.largest_divisor(x_ext // vw, 8)
        post = base.inline_post(sch, info.post)
        wb = sch.cache_write(main, 0, "local")
        n, f, y, x, rc, ry, rx = sch.get_loops(main)
        xo, xu, xv = sch.split(x, [None, unroll, vw])
        sch.reorder(n, f, y, xo, rc, ry, rx, xu, xv)
        outer = sch.fuse(n, f)
        if cores > 1:
            sch.parallel(outer)
        sch.unroll(xu)
        if vw > 1:
            sch.vectorize(xv)
        sch.reverse_compute_at(wb, xo, preserve_unit_loops=True)
        left = base.fuse_epilogue(sch, wb, post)
        wb_loops = sch.get_loops(wb)
        if vw > 1:
            _, wv = sch.split(wb_loops[-1], [None, vw])
            sch.vectorize(wv)
        for b in left:
            sch.reverse_compute_at(b, xo, preserve_unit_loops=True)
        sch.decompose_reduction(main, rc)
        for b in info.pre:
            base.parallel_vectorize_injective(sch, b, lanes, cores)
        return sch
