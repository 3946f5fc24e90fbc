"""Transposing write-backs as register shuffles: a loop annotation set by the schedule rules
and a TIR pass, run after lowering, that rewrites the annotated loop.

Why.  A channel-vectorized kernel (depthwise.py's channel-blocked one, conv2d.py's) computes
a tile of ``V`` channels x ``X`` pixels with the channels as the vector axis, and writes it
to NCHW, where the pixels are contiguous.  As TIR that is ``for f in range(V): out[f, 0:X]
= tile[f::V][:X]``: each output row is a strided read of the tile, which LLVM compiles to X
scalar loads and inserts.  In mobilenet_v2's depthwise kernels that write-back took nearly
as long as the convolution: timed alone, 384x14x14 took 0.0100 ms, 0.0056 ms with the tile
stored untransposed (a wrong result, as a bound), 0.0075 ms with this pass; 192x28x28
0.0187 / 0.0104 / 0.0142 ms.

How.  The schedule writes the tile with the epilogue into a local buffer ``tmp`` laid out
(pixel, channel) and marks the copy loop over ``f`` with ``TRANSPOSE``.  After lowering
and vectorization that loop is a single store::

    for f in range(V):
        out[Ramp(o(f), 1, X)] = tmp[Ramp(t + f, S, X)]      # S: the tile's channels, V or more

The pass replaces it with X vector loads of ``tmp`` (V channels of one pixel each), a transpose
network of two-input shuffles, and V stores.  Pixels are taken ``V`` at a time, each group
padded with zero vectors to ``P``, a power of two; stage ``k`` of the network swaps bit
``k`` of the row (pixel) index with bit ``k`` of the lane (channel) index, so after
log2(P) stages channel ``f``'s pixels sit in vector ``f % P``, lanes ``f - f % P`` onwards.
That is P * log2(P) shuffles for P x V values (16 x 16: 64) against V * X scalar loads.
Any loop that is not exactly that store keeps its plain code.
"""

from __future__ import annotations

import tvm
import tvm.sym
from tvm import tirx
from tvm.ir.expr import TensorLoad
from tvm.tirx import _ffi_api

from graphopt.targets.cpu.tir_rewrite import const_int, rewrite_annotated_loops, without_annotation

TRANSPOSE = "graphopt.transpose"


def annotate(sch, loop) -> None:
    """Mark ``loop`` (the copy's channel loop, its body the pixel-vectorized store) for the pass."""
    sch.annotate(loop, TRANSPOSE, 1)


def _at(expr, var, value: int):
    analyzer = tvm.sym.Analyzer()
    analyzer.bind(var, tirx.const(value, str(var.ty)))
    return analyzer.simplify(expr)


def network_positions(rows: int, lanes: int) -> list[tuple[int, int]]:
    """Where channel ``f``'s first pixel ends up after the transpose network on ``rows``
    (a power of two, <= ``lanes``) vectors: ``(vector, lane)`` for each ``f``; its other
    pixels follow in the next lanes."""
    return [(f % rows, f - f % rows) for f in range(lanes)]


def _transposed(loop: tirx.For):
    """The shuffle form of annotated ``loop`` (module doc), or None if it is not the store."""
    store, f = loop.body, loop.loop_var
    if not (isinstance(store, tirx.BufferStore) and isinstance(store.value, TensorLoad)
            and len(store.indices) == 1 and len(store.value.indices) == 1):
        return None
    out_index, in_index = store.indices[0], store.value.indices[0]
    if not (isinstance(out_index, tirx.Ramp) and isinstance(in_index, tirx.Ramp)):
        return None
    lanes, width = const_int(loop.extent), const_int(out_index.lanes)
    pixel_stride = const_int(in_index.stride)  # the tile's channel count: ``lanes`` or a multiple
    if (lanes is None or width is None or pixel_stride is None or const_int(loop.min) != 0
            or lanes & (lanes - 1) or pixel_stride % lanes or const_int(out_index.stride) != 1
            or const_int(in_index.lanes) != width):
        return None
    if const_int(tvm.sym.Analyzer().simplify(_at(in_index.base, f, 1) - _at(in_index.base, f, 0))) != 1:
        return None
    elem = str(store.value.ty).split("x")[0]
    vector = f"{elem}x{lanes}"
    tile_start = _at(in_index.base, f, 0)
    index_type = str(tile_start.ty)
    stmts, counter = [], [0]

    def bind(value):
        var = tirx.Var(f"transpose_v{counter[0]}", vector)
        counter[0] += 1
        stmts.append(tirx.Bind(var, value))
        return var

    def pixel(x: int):
        ramp = tirx.Ramp(tile_start + tirx.const(x * pixel_stride, index_type), tirx.const(1, index_type), lanes)
        return bind(_ffi_api.BufferLoad(store.value.source, [ramp], None))

    zero = tirx.Broadcast(tirx.const(0, elem), lanes)
    for first in range(0, width, lanes):  # each group's loads, network and stores in turn
        n = min(lanes, width - first)
        rows = 1 << (n - 1).bit_length()
        vecs = [pixel(first + x) for x in range(n)] + [zero] * (rows - n)
        bit = 1
        while bit < rows:  # swap row bit k with lane bit k
            for i in range(rows):
                if i & bit:
                    continue
                a, b = vecs[i], vecs[i | bit]
                lo = [j if not j & bit else lanes + j - bit for j in range(lanes)]
                hi = [j + bit if not j & bit else lanes + j for j in range(lanes)]
                vecs[i] = bind(tirx.Shuffle([a, b], [tirx.const(j, "int32") for j in lo]))
                vecs[i | bit] = bind(tirx.Shuffle([a, b], [tirx.const(j, "int32") for j in hi]))
            bit <<= 1
        for ch, (v, lane) in enumerate(network_positions(rows, lanes)):
            base = _at(out_index.base, f, ch) + tirx.const(first, str(out_index.base.ty))
            if n == 1:  # a single pixel: a scalar store
                value, index = tirx.Shuffle([vecs[v]], [tirx.const(lane, "int32")]), base
            else:
                value = vecs[v] if (n == lanes and lane == 0) else tirx.Shuffle(
                    [vecs[v]], [tirx.const(lane + r, "int32") for r in range(n)])
                index = tirx.Ramp(base, tirx.const(1, str(base.ty)), n)
            stmts.append(tirx.BufferStore(store.buffer, value, [index]))
    return tirx.SeqStmt(stmts)


def _lower(loop: tirx.For, body):
    shuffled = _transposed(loop)
    return shuffled if shuffled is not None else without_annotation(loop, TRANSPOSE, body)


@tirx.transform.prim_func_pass(opt_level=0, name="graphopt.LowerTranspose")
def lower_transposes(func, _mod, _ctx):
    """Rewrite every ``graphopt.transpose`` loop (module doc)."""
    body = rewrite_annotated_loops(func.body, TRANSPOSE, _lower)
    return func if body.same_as(func.body) else func.with_body(body)
