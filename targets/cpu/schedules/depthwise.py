"""Depthwise / grouped conv2d in NCHW with fused epilogue.

A depthwise conv does KH*KW multiply-adds per output, so it is bound by memory and
loop overhead, not FMAs.  The schedule vectorizes along the output *width* (the input
row is contiguous for stride 1, a strided load for stride 2; the weight of one tap is a
scalar broadcast), keeps a one-row accumulator tile in registers via cache_write,
parallelizes over (n, channel), and folds the epilogue (BN affine, clip/relu6 ...) into
the write-back.  Each task pads its own plane right before convolving it (``base.pad_in_task``):
no separate pass over the input, and one parallel region per kernel.

Also matches grouped convs with more than one channel per group: the reduction over rc
is just a longer loop of broadcast taps.

Short or strided rows (output width below one vector, or stride 2) starve that kernel:
a 7-wide row is scalar code and a stride-2 row is a gather.  Those depthwise convs (with
channels a multiple of the vector width) take a channel-blocked variant instead
(``_schedule_channel_blocked``): the padding copy, which runs anyway, writes the input
packed as NCHW[16]c, the weight is repacked to (ry, rx, c) at compile time, the register
tile is 16 channels x up to 8 pixels of one row (one vector load + one FMA per tap and
pixel), and the write-back transposes back to NCHW vectorized over pixels, carrying the
epilogue.  mobilenet_v2, 1 thread: its 13 short/strided depthwise layers ~2.1 -> ~1.3 ms.

When the conv before it writes NCHW[16]c (blocked.py), the channel-blocked kernel reads
that directly: the unblocking copy and the padding are both inlined, so each tap's load
is one vector of the producer's output under a bounds check, and the kernel is a single
pass over memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.target import Target

from . import base

# Accumulator vectors of a register tile (pixels of a row, or channel vectors).  A depthwise
# tap is one load and one FMA per vector, so the tile is bound by memory, not registers: 8,
# with the tap's input vector and weight broadcast 10 registers, fit AVX2's 16 as well as 32.
TILE_VECTORS = 8


def match_grouped_conv2d(info: base.FuncInfo):
    found = base.conv_mac(info)
    if found is None:
        return None
    _store, a, b, iv = found
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


def _use_channel_blocked(block, data, target: Target) -> bool:
    """Channel-vectorized kernel for true depthwise convs whose rows are too short for the
    width-vectorized one (output width < one vector) or strided (a stride-2 row is a
    gather); measured per mobilenet_v2 layer, 1 thread: 960x7x7 140 -> 44 us,
    96x112x112/2 714 -> 426 us, 576x14x14 143 -> 86 us; stride-1 rows of 28+ pixels stay
    faster in the width-vectorized kernel (the pack + transposed write-back cost more)."""
    lanes = base.simd_lanes(target, block.body.buffer.dtype.bits)
    f_ext, x_ext = int(block.iter_vars[1].dom.extent), int(block.iter_vars[3].dom.extent)
    if f_ext % lanes or int(block.iter_vars[4].dom.extent) != 1:
        return False
    # One input channel per output channel (a channel multiplier > 1 reads c = f // m,
    # which is not a contiguous channel vector in the packed layout).
    ch, f_var = data.indices[1], block.iter_vars[1].var
    if not (ch.same_as(f_var) or (isinstance(ch, tirx.Add) and ch.a.same_as(f_var))):
        return False
    return _is_strided(data) or x_ext < lanes


def _is_strided(data) -> bool:
    """The data load indexes rows or columns as ``y * stride + ry`` (stride > 1)."""
    return any(isinstance(idx, tirx.Add) and isinstance(idx.a, tirx.Mul) for idx in data.indices[2:])


def _read_index(block, buf) -> int:
    return next(i for i, r in enumerate(block.reads) if r.source.same_as(buf))


def _is_param(sch, buf) -> bool:
    return any(buf.same_as(b) for b in sch.mod["main"].params)  # (0.27: the params are buffers)


def _schedule_channel_blocked(sch, info: base.FuncInfo, target: Target, data, weight, vec: int,
                              max_rows: int = 8):
    """Depthwise conv vectorized over ``vec`` channels of an NCHW[vec]c input."""
    main = info.main
    block = sch.get(main)
    cores = base.num_cores(target)
    x_ext = int(block.iter_vars[3].dom.extent)
    tx = base.largest_divisor(x_ext, TILE_VECTORS) or 1
    post = base.inline_post(sch, info.post)
    # An input that arrives blocked (blocked.py) is unblocked by a plain copy first; inlined,
    # the padding reads it as it is.  Otherwise the padding copy (or a new copy) packs it.
    blocked_in = base.reads_channel_blocked(sch, info.pre, vec)
    pre = base.inline_plain_copies(sch, info.pre) if blocked_in else info.pre
    w_idx = _read_index(block, weight.source)
    d_idx = _read_index(block, data.source)
    pad = pre[0] if len(pre) == 1 else None
    if pad is None or not sch.get(pad).writes[0].source.same_as(data.source):
        pad = sch.cache_read(main, d_idx, "global")
    sch.transform_layout(pad, ("write", 0), lambda n, c, y, x: (n, c // vec, y, x, c % vec))
    # The weight as (rc, ry, rx, f): one vector of channels per tap.  Marked as a layout
    # rewrite, so that for a constant weight the copy runs at compile time (build.py); per
    # call it was a serial prologue, ~20% of a 960x7x7 layer's time.
    wc = sch.cache_read(main, w_idx, "global")
    if _is_param(sch, weight.source):
        sch.annotate(wc, "meta_schedule.layout_rewrite_preproc", True)
    sch.transform_layout(wc, ("write", 0), lambda f, r, y, x: (r, y, x, f))
    wb = sch.cache_write(main, 0, "local")
    sch.transform_layout(main, ("write", 0), lambda n, f, y, x: (n, y, x, f))
    n, f, y, x, rc, ry, rx = sch.get_loops(main)
    fo, fv = sch.split(f, [None, vec])
    xo, xi = sch.split(x, [None, tx])
    # Read in place, up to 8 output rows per task: 20-25% faster than one (mobilenet_v2's
    # 144x56x56/2, 192x28x28, 960x7x7), with still 36+ tasks to share between the cores.
    # A task that packs its input rows packs one row's worth: more spill L1 (96x112x112/2:
    # 0.14 ms with 1 row per task, 0.23 ms with 4).
    rows = base.largest_divisor(int(block.iter_vars[2].dom.extent), max_rows) if blocked_in else 1
    yo, yi = sch.split(y, [None, rows])
    sch.reorder(n, fo, yo, yi, xo, rc, ry, rx, xi, fv)
    outer = base.spread_loops(sch, (n, fo, yo), cores, unroll=(xi,), vectorize=fv)
    # The sums of a whole task (rows x width x vec) are written back at its end, row by row,
    # each row a whole run of every channel's NCHW row.  Written back per register tile
    # (8 pixels), a task wrote 32 bytes at a time into 16 channel planes: 96x112x112/2
    # 0.091 -> 0.063 ms, 192x28x28 0.044 -> 0.028 ms with a cold output (2 threads), and
    # faster warm too.  The sums stay in L1 (a stack buffer); a task too wide for that
    # writes back row by row, or per tile.
    row_bytes = x_ext * vec * 4
    at = outer if rows * row_bytes <= (64 << 10) else yi if row_bytes <= (64 << 10) else xo
    sch.reverse_compute_at(wb, at, preserve_unit_loops=True)
    left = base.fuse_epilogue(sch, wb, post)
    wb_loops = sch.get_loops(wb)[-4:]  # the tile's (n, f, y, x)
    if len(wb_loops) == 4 and len(sch.get_loops(wb)) > 4:
        wn, wf, wy, wx = wb_loops
        # The tile is transposed by register shuffles on the way out (base.py): timed alone,
        # 384x14x14 0.0100 -> 0.0075 ms, 192x28x28 0.0187 -> 0.0142 ms.  Otherwise channel
        # outer, pixels inner: contiguous NCHW stores and a vectorized epilogue, but a
        # strided read from the tile, X scalar loads per row.  (Left scalar, this
        # write-back cost 5x the convolution itself: 576x14x14 680 -> 86 us.)
        if left or not base.write_back_transposed(sch, wb, at, vec, target):
            sch.reorder(wn, wy, wf, wx)
            sch.vectorize(wx)
    for b in left:
        sch.reverse_compute_at(b, at, preserve_unit_loops=True)
    sch.decompose_reduction(main, rc)
    pl = sch.get_loops(pad)
    if blocked_in:
        # Already NCHW[vec]c: the padding is a bounds check on each tap's vector load, no
        # copy at all (a copy of the rows each task reads, even from L1, took a fifth of the
        # time: 96x112x112/2 0.076 -> 0.060 ms, 960x7x7 0.0108 -> 0.0089 ms with the weight
        # prepacked too, 2 threads).
        sch.compute_inline(pad)
    elif len(pl) == 4 and _is_strided(data):
        # Strided conv: pack the input rows each output row reads right before it, under
        # the parallel row loop, instead of in a pass over the whole input. The rows stay
        # in L1 instead of making a round trip through memory as a packed copy as big as
        # the input (mobilenet_v2's 96x112x112 stride-2 layer, batch 8: 5.9 -> 2.6 ms).
        # Consecutive output rows share one input row: 1.5x the packing work at stride 2,
        # which is why stride-1 convs (3x) keep the separate pass.
        sch.compute_at(pad, outer)
        c_in, in_rows, xs = sch.get_loops(pad)[-3:]
        sch.reorder(in_rows, xs, c_in)
        sch.vectorize(c_in)
    elif len(pl) == 4:
        # Pack loop order (n, c//vec, y, x, c%vec): contiguous writes, vector over c%vec.
        pn, pcc, py, px = pl
        pco, pci = sch.split(pcc, [None, vec])
        sch.reorder(pn, pco, py, px, pci)
        sch.vectorize(pci)
        po = sch.fuse(pn, pco, py)
        if cores > 1:
            sch.parallel(po)
    return sch


@dataclass(frozen=True)
class DepthwiseMatch:
    data: object  # the data load
    weight: object  # the weight load
    lanes: int
    channel_blocked: bool  # the NCHW[lanes]c kernel (``_schedule_channel_blocked``)


class DepthwiseConv2dNCHW(base.CPURule):
    """Width-vectorized depthwise / grouped conv2d, channel-blocked for short or strided rows."""

    def match(self, info: base.FuncInfo, target: Target) -> DepthwiseMatch | None:
        m = match_grouped_conv2d(info)
        if m is None:
            return None
        block = info.stmt(info.main)
        lanes = base.simd_lanes(target, block.body.buffer.dtype.bits)
        blocked = _use_channel_blocked(block, m[0], target) or base.reads_channel_blocked(info.sch, info.pre, lanes)
        return DepthwiseMatch(m[0], m[1], lanes, blocked)

    def schedule(self, info: base.FuncInfo, match: DepthwiseMatch, target: Target):
        if match.channel_blocked:
            return _schedule_channel_blocked(info.sch, info, target, match.data, match.weight, match.lanes)
        return _schedule_width_vectorized(info.sch, info, target)


def _schedule_width_vectorized(sch, info: base.FuncInfo, target: Target):
    """Vectors along the output row, a few of them unrolled as the register tile."""
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
    unroll = base.largest_divisor(x_ext // vw, TILE_VECTORS)
    post = base.inline_post(sch, info.post)
    wb = sch.cache_write(main, 0, "local")
    n, f, y, x, rc, ry, rx = sch.get_loops(main)
    xo, xu, xv = sch.split(x, [None, unroll, vw])
    sch.reorder(n, f, y, xo, rc, ry, rx, xu, xv)
    outer = base.spread_loops(sch, (n, f), cores, unroll=(xu,), vectorize=xv if vw > 1 else None)
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
        try:
            base.pad_in_task(sch, b, outer)
        except Exception:  # noqa: BLE001 - e.g. a producer shared by several planes' tasks
            base.parallel_vectorize_injective(sch, b, lanes, cores)
    return sch
