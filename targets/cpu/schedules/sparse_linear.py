"""Block-sparse linear layers: constant weights with enough all-zero blocks skip them.

``sparse_linear_weights(lanes)`` (sparse_rewrite.py) is a Relax rewrite, run with the other
weight layouts before legalization (layout.py): a float32 ``x @ W`` whose weight is a constant (or a
transposed constant, which is how a linear arrives) and has enough all-zero blocks
(sparse_format.py decides, per layer, and says why on the ``graphopt.sparse`` logger)
becomes a call of a block-sparse kernel. Its constants are the kept blocks, their columns
and the block rows' starts: the dense weight leaves the module, so the artifact shrinks
with the sparsity. Blocks are one SIMD vector wide; of the two layouts (sparse_format.py)::

    row blocks (1 x L):   for each output n, for each kept block j of row n:
                            acc[0:L] += values[j, 0:L] * x[m, L*col[j] : L*col[j] + L]
                          y[m, n] = sum(acc)            (halving tree, log2 L vector adds)
    column blocks (L x 1): for each block row b, for each kept block j of row b:
                            acc[0:L] += values[j, 0:L] * x[m, col[j]]      (a broadcast)
                          y[m, L*b : L*b + L] = acc

Each kept block is read once for a tile of ``rows_per_tile`` input rows (up to 8, the rows'
accumulators in registers). A kept-block loop's length is read from ``indptr`` at run time,
which TensorIR cannot express as a block iterator; so the kernel is written as one block per
(row tile, block row) whose body holds the vector loops, annotated with ``SPARSE_BLOCK_ATTR``,
and the rule ``SparseLinear`` orders and parallelizes the block's loops (weight rows outer,
so a row's blocks stay in L1 across the row tiles) and schedules the fused epilogue.

A weight with few all-zero blocks but N:M structure (2:4) goes to the N:M kernel instead
(sparse_nm.py), where sparse_format.py's cost rule says it wins.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir
from tvm.script import tirx as T
from tvm.target import Target

from . import base
from .sparse_format import BSRWeight

SPARSE_BLOCK_ATTR = "graphopt.sparse_linear"  # block annotation: "row" or "column" blocks
_MAX_ROWS_PER_TILE = 8  # accumulators: 8 rows x one vector, well inside 16 (AVX2) or 32 registers
# Multiply-adds below which the kernel stays single-threaded (as the dense rule: matmul.py).
_MIN_PARALLEL_MACS = 1 << 16


def rows_per_tile(rows: int) -> int:
    """The largest divisor of ``rows`` up to 8: rows sharing each loaded block."""
    return max(t for t in range(1, min(rows, _MAX_ROWS_PER_TILE) + 1) if rows % t == 0)


def row_block_kernel(rows: int, in_f: int, out_f: int, lanes: int, kept: int) -> tvm.tirx.PrimFunc:
    """``y[m, n] = sum over kept 1 x lanes blocks of row n`` (module doc)."""
    tile = rows_per_tile(rows)
    x_shape, y_shape, ptr_shape = _i64(rows, in_f), _i64(rows, out_f), _i64(out_f + 1)
    # the halving tree's widths, lanes/2 .. 1 (lanes 4 to 16); a level of width 0 is left out
    h1, h2, h3, h4 = lanes // 2, lanes // 4, lanes // 8, lanes // 16

    @T.prim_func(s_tir=True)
    def sparse_linear(x: T.Buffer(x_shape, "float32"), values: T.Buffer((kept, lanes), "float32"),
                      indices: T.Buffer((kept,), "int32"), indptr: T.Buffer(ptr_shape, "int32"),
                      y: T.Buffer(y_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        for mo, n in T.grid(rows // tile, out_f):
            with T.sblock("sparse_linear"):
                vmo, vn = T.axis.remap("SS", [mo, n])
                T.reads(x[vmo * tile:vmo * tile + tile, 0:in_f], values[0:kept, 0:lanes], indices[0:kept],
                        indptr[vn:vn + 2])
                T.writes(y[vmo * tile:vmo * tile + tile, vn])
                T.sblock_attr({SPARSE_BLOCK_ATTR: "row"})
                # "global" scope: a small constant allocation is a stack array, which LLVM keeps in
                # registers ("local" would be a workspace allocation, stored to on every step)
                acc = T.alloc_buffer((tile, lanes), "float32", scope="global")
                start: T.int32 = indptr[vn]
                stop: T.int32 = indptr[vn + 1]
                for mi in T.unroll(tile):
                    for c in T.vectorized(lanes):
                        acc[mi, c] = T.float32(0)
                for j in range(start, stop):
                    col: T.int32 = indices[j] * lanes
                    for mi in T.unroll(tile):
                        for c in T.vectorized(lanes):
                            acc[mi, c] = acc[mi, c] + values[j, c] * x[vmo * tile + mi, col + c]
                for mi in T.unroll(tile):
                    for c in T.vectorized(h1):
                        acc[mi, c] = acc[mi, c] + acc[mi, c + h1]
                    for c in T.vectorized(h2):
                        acc[mi, c] = acc[mi, c] + acc[mi, c + h2]
                    if h3 > 0:  # a Python constant: the level is there or not
                        for c in T.vectorized(h3):
                            acc[mi, c] = acc[mi, c] + acc[mi, c + h3]
                    if h4 > 0:
                        for c in T.vectorized(h4):
                            acc[mi, c] = acc[mi, c] + acc[mi, c + h4]
                    y[vmo * tile + mi, vn] = acc[mi, 0]

    return sparse_linear


def column_block_kernel(rows: int, in_f: int, out_f: int, lanes: int, kept: int) -> tvm.tirx.PrimFunc:
    """``y[m, lanes*b : lanes*b + lanes] = sum over kept lanes x 1 blocks of block row b`` (module doc)."""
    tile = rows_per_tile(rows)
    block_rows = out_f // lanes
    x_shape, y_shape, ptr_shape = _i64(rows, in_f), _i64(rows, out_f), _i64(block_rows + 1)

    @T.prim_func(s_tir=True)
    def sparse_linear(x: T.Buffer(x_shape, "float32"), values: T.Buffer((kept, lanes), "float32"),
                      indices: T.Buffer((kept,), "int32"), indptr: T.Buffer(ptr_shape, "int32"),
                      y: T.Buffer(y_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        for mo, b in T.grid(rows // tile, block_rows):
            with T.sblock("sparse_linear"):
                vmo, vb = T.axis.remap("SS", [mo, b])
                T.reads(x[vmo * tile:vmo * tile + tile, 0:in_f], values[0:kept, 0:lanes], indices[0:kept],
                        indptr[vb:vb + 2])
                T.writes(y[vmo * tile:vmo * tile + tile, vb * lanes:vb * lanes + lanes])
                T.sblock_attr({SPARSE_BLOCK_ATTR: "column"})
                acc = T.alloc_buffer((tile, lanes), "float32", scope="global")  # see row_block_kernel
                start: T.int32 = indptr[vb]
                stop: T.int32 = indptr[vb + 1]
                for mi in T.unroll(tile):
                    for r in T.vectorized(lanes):
                        acc[mi, r] = T.float32(0)
                for j in range(start, stop):
                    col: T.int32 = indices[j]
                    for mi in T.unroll(tile):
                        for r in T.vectorized(lanes):
                            acc[mi, r] = acc[mi, r] + values[j, r] * x[vmo * tile + mi, col]
                for mi in T.unroll(tile):
                    for r in T.vectorized(lanes):
                        y[vmo * tile + mi, vb * lanes + r] = acc[mi, r]

    return sparse_linear


def _i64(*dims: int) -> tuple:
    """Buffer dimensions as int64, the type of the legalized kernels' shapes (FuseTIR matches them)."""
    return tuple(tvm.tirx.IntImm("int64", d) for d in dims)


def sparse_kernel(bsr: BSRWeight, rows: int) -> tvm.tirx.PrimFunc:
    """The kernel for ``bsr`` over ``rows`` input rows."""
    out_f, in_f = bsr.shape
    make = row_block_kernel if bsr.block[0] == 1 else column_block_kernel
    return make(rows, in_f, out_f, max(bsr.block), bsr.kept)


# --------------------------------------------------------------------------- the schedule rule


class SparseLinear(base.CPURule):
    """The block-sparse kernel above, found by its block annotation; the input's reshape before
    it and its epilogue (bias, activation) after it are elementwise loops."""

    kinds = ("row", "column")  # the SPARSE_BLOCK_ATTR values this rule schedules

    def analyze(self, func):
        return base.root_blocks(func)

    def match(self, info: base.FuncInfo, target: Target):
        sch = info.sch
        mains = [i for i, b in enumerate(info.blocks)
                 if str(sch.get(b).annotations.get(SPARSE_BLOCK_ATTR, "")) in self.kinds]
        if len(mains) != 1 or len(sch.get_loops(info.blocks[mains[0]])) != 2:
            return None
        # before it: the input flattened to rows (a sequence's); after it: the epilogue
        return info.blocks[:mains[0]], info.blocks[mains[0]], info.blocks[mains[0] + 1:]

    def schedule(self, info: base.FuncInfo, match, target: Target) -> s_tir.Schedule:
        sch = info.sch
        pre, main, post = match
        row_tiles, weight_rows = sch.get_loops(main)
        sch.reorder(weight_rows, row_tiles)  # a weight row's kept blocks stay in cache across the row tiles
        # the kernels write y (rows, out_features) and read their kept values second: a multiply-add each per row
        y, values = sch.get(main).writes[0].source, sch.get(main).reads[1].source
        macs = int(y.shape[0]) * int(np.prod([int(d) for d in values.shape]))
        cores = base.num_cores(target)
        if cores > 1 and macs >= _MIN_PARALLEL_MACS:
            # one contiguous share of the weight rows per core, each a plain loop: the kept blocks
            # differ per row, so finer tasks balance no better and cost a task each
            share, _ = sch.split(weight_rows, [cores, None])
            sch.parallel(share)
        lanes = base.simd_lanes(target)
        for block in [*pre, *post]:
            base.parallel_vectorize_injective(sch, block, lanes, cores)
        return sch
