"""A dense conv and the depthwise conv it feeds, as one kernel (an inverted-residual block's
expand and depthwise convs, or mobilenet_v2's stem and first depthwise conv).

The expand conv's output is the biggest tensor of such a block (mobilenet_v2's 96x112x112:
4.8 MB) and the depthwise conv is its only reader.  As two kernels it makes a round trip
through L3: the expand conv writes it, the depthwise conv reads it back, and each reads
and writes about 75 GB/s less than it computes (in the model, 96x112x112/2 ran at 0.13 ms
against 0.06 ms alone).  ``blocked.py`` merges such a pair into one Relax function when it
hands the depthwise conv NCHW[16]c; this rule schedules the merged PrimFunc:

* the depthwise conv keeps its channel-blocked schedule (depthwise.py): tasks of 16
  channels x up to 8 output rows, parallel;
* each task first computes the rows of the intermediate it reads (its 16 channels, the
  output rows' input window) with the conv's register-tile kernel (16 channels x up to 16
  pixels of a row, vectorized over the channels) and the conv's epilogue, into a
  task-local NCHW[16]c buffer (17 x 112 x 16 floats for 96x112x112/2: L2-resident);
* the depthwise conv then reads that buffer as it read the blocked tensor, under the
  same bounds check for its padding.

Rows at the window edges are computed twice (by both neighbouring tasks): 1/16 more conv
work at stride 2, 1/4 at stride 1 with 8-row tasks, which is why stride-1 pairs get more
rows per task.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.target import Target

from . import base
from .conv2d import match_conv2d
from .depthwise import _schedule_channel_blocked, match_grouped_conv2d


def _split_chain(sch: s_tir.Schedule, blocks: list, lanes: int):
    """(conv_pre, conv, conv_epilogue, blocked, dw_pre, dw, dw_post) of a conv -> depthwise
    chain, or None: two reductions, and between them the conv's elementwise epilogue, the
    NCHW -> NCHW[lanes]c transform (writes a 5-D buffer) and the depthwise conv's prologue."""
    reductions = [i for i, b in enumerate(blocks) if "R" in base.iter_kinds(sch.get(b))]
    if len(reductions) != 2:
        return None
    ci, di = reductions
    between = blocks[ci + 1:di]
    to_blocked = [i for i, b in enumerate(between)
                  if len(sch.get(b).writes[0].source.shape) == 5
                  and base.const_int(sch.get(b).writes[0].source.shape[4]) == lanes]
    if len(to_blocked) != 1:
        return None
    k = to_blocked[0]
    return (blocks[:ci], blocks[ci], between[:k], between[k], between[k + 1:], blocks[di], blocks[di + 1:])


@dataclass(frozen=True)
class ChainMatch:
    conv: object
    conv_pre: list
    conv_epilogue: list
    blocked: object  # the NCHW -> NCHW[lanes]c transform between the two
    depthwise: base.FuncInfo
    data: object  # the depthwise conv's data load
    weight: object
    lanes: int
    pixels: int  # the conv's register tile: pixels of a row x one vector of channels


def conv_pixel_tile(width: int, accumulators: int) -> int:
    """Pixels of the conv's register tile (one vector of channels each): up to 16, fewer
    where the accumulator registers are fewer (AVX2: 12, with the weight vector and the
    broadcast input 14 of 16 registers)."""
    return base.largest_divisor(width, min(16, accumulators)) or 1


class ConvThenDepthwise(base.CPURule):
    """conv2d (+ epilogue) -> depthwise conv2d (+ epilogue) in one kernel (module doc)."""

    def analyze(self, func: tirx.PrimFunc):
        return base.root_blocks(func)

    def match(self, info: base.FuncInfo, target: Target) -> ChainMatch | None:
        sch, blocks = info.sch, info.blocks
        isa = base.vector_isa(target)
        lanes = isa.lanes()
        parts = _split_chain(sch, blocks, lanes)
        if parts is None:
            return None
        conv_pre, conv, conv_epi, blocked, dw_pre, dw, dw_post = parts
        dw_info = base.FuncInfo(sch=sch, blocks=blocks, main=dw, pre=dw_pre, post=dw_post)
        grouped = match_grouped_conv2d(dw_info)
        conv_info = base.FuncInfo(sch=sch, blocks=blocks, main=conv, pre=conv_pre, post=conv_epi)
        if grouped is None or match_conv2d(conv_info) is None or not base.reads_channel_blocked(sch, dw_pre, lanes):
            return None
        return ChainMatch(conv, conv_pre, conv_epi, blocked, dw_info, grouped[0], grouped[1], lanes,
                          conv_pixel_tile(_conv_width(sch, blocked), isa.accumulators))

    def schedule(self, info: base.FuncInfo, m: ChainMatch, target: Target):
        sch, conv, blocked, dw = info.sch, m.conv, m.blocked, m.depthwise.main
        # The conv's epilogue (bias, clip ...) is applied where the blocked tensor is written.
        for b in m.conv_epilogue:
            sch.compute_inline(b)
        # Its own input padding becomes a bounds check on its loads.
        for b in m.conv_pre:
            sch.compute_inline(b)
        stride = max(int(s) for s in _strides(sch.get(dw), m.data))
        rows = 8 if stride > 1 else 14
        _schedule_channel_blocked(sch, m.depthwise, target, m.data, m.weight, m.lanes, max_rows=rows)
        task = sch.get_loops(dw)[0]
        # The task's window of the intermediate, NCHW[lanes]c, computed at the task's start.
        sch.compute_at(blocked, task, preserve_unit_loops=True)
        # The transform iterates over the NCHW source: (n, c, y, x), y split in two where
        # the window is clipped at the image's edges.
        n, c, *ys, x = sch.get_loops(blocked)[1:]
        y = sch.fuse(*ys) if len(ys) > 1 else ys[0]
        xo, xi = sch.split(x, [None, m.pixels])
        sch.reorder(n, y, xo, xi, c)
        sch.vectorize(c)
        sch.unroll(xi)
        # The conv's sums for one tile (tile pixels x lanes channels): a register tile,
        # laid out pixel-major so each pixel's channels are one vector.
        sch.transform_layout(conv, ("write", 0), lambda n_, f, y_, x_: (n_, y_, x_, f))
        sch.set_scope(conv, 0, "local")
        sch.compute_at(conv, xo, preserve_unit_loops=True)
        loops = sch.get_loops(conv)
        cn, cf, cy, cx, rc, ry, rx = loops[-7:]
        sch.reorder(cn, cy, rc, ry, rx, cx, cf)
        sch.unroll(cx)
        sch.vectorize(cf)
        sch.decompose_reduction(conv, rc)
        return sch


def _conv_width(sch, blocked) -> int:
    """Width of the rows the NCHW -> NCHW[lanes]c transform reads (the conv's output)."""
    return int(sch.get(blocked).iter_vars[-1].dom.extent)


def _strides(block: tirx.SBlock, data) -> list[int]:
    """The depthwise conv's row/column strides, read off its data load ``y * s + ry``."""
    out = []
    for idx in data.indices[2:]:
        if isinstance(idx, tirx.Add) and isinstance(idx.a, tirx.Mul) and isinstance(idx.a.b, tirx.IntImm):
            out.append(int(idx.a.b.value))
        else:
            out.append(1)
    return out
