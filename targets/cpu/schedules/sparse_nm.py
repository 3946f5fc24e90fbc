"""N:M-sparse linear layers: a constant weight with at most N nonzeros in every M inputs.

The weight is stored packed (sparse_format.py ``NMWeight``): each output row's kept values and
their positions in their groups, one byte each. Each output row picks its own inputs, so a
vector of outputs would load a different input element per lane, a gather. The kernel avoids
it: the ``m`` inputs of a group are broadcast scalars, and each lane picks its input among them
by its position with ``m - 1`` vector compares and selects::

    for each input row r, for each vector b of `lanes` outputs:
        for each group g, for each of its n kept values j:
            x_picked[0:L] = select(pos[b, g*n + j, 0:L] == 0, x[r, g*m], select(... == 1, ...))
            acc[0:L] += values[b, g*n + j, 0:L] * x_picked[0:L]
        y[r, L*b : L*b + L] = acc

``values`` and ``positions`` are laid out ``(outputs / lanes, kept, lanes)``: one contiguous
vector each per step. For one input row (a matrix-vector product, bound by the weight's bytes)
this reads 5/8 of a dense weight's bytes at 2:4 and wins; for more rows the dense GEMM reuses
each weight load and wins (sparse_format.py ``NM_MAX_ROWS``). The kept values' positions are
data, so the kernel is one block per (row, output vector) with its loops in the body,
annotated ``SPARSE_BLOCK_ATTR = "n:m"``; ``SparseNMLinear`` schedules it as ``SparseLinear``
does the block-sparse kernel (weight rows outer, split across cores).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from .sparse_format import NMWeight
from .sparse_linear import SPARSE_BLOCK_ATTR, SparseLinear, _i64


def _pick(position, x, row, base, m: int):
    """``x[row, base + position]`` for a ``position`` below ``m``, as a chain of ``m - 1`` selects
    (vector compares and blends where a loaded index would make a gather)."""
    pos = T.Cast("int32", position)
    out = x[row, base + m - 1]
    for p in range(m - 2, -1, -1):
        out = T.Select(pos == p, x[row, base + p], out)
    return out


def nm_kernel(nm: NMWeight, rows: int, lanes: int) -> tvm.tirx.PrimFunc:
    """``y = x @ W.T`` for the packed N:M weight ``nm`` laid out by ``lanes_layout`` (module doc)."""
    out_f, in_f = nm.shape
    n, m = nm.n, nm.m
    kept, groups = in_f * n // m, in_f // m
    x_shape, y_shape, packed = _i64(rows, in_f), _i64(rows, out_f), _i64(out_f // lanes, kept, lanes)

    @T.prim_func(s_tir=True)
    def sparse_nm_linear(x: T.Buffer(x_shape, "float32"), values: T.Buffer(packed, "float32"),
                         positions: T.Buffer(packed, "uint8"), y: T.Buffer(y_shape, "float32")):
        T.func_attr({"tirx.noalias": True})
        for r, b in T.grid(rows, out_f // lanes):
            with T.sblock("sparse_nm_linear"):
                vr, vb = T.axis.remap("SS", [r, b])
                T.reads(x[vr, 0:in_f], values[vb, 0:kept, 0:lanes], positions[vb, 0:kept, 0:lanes])
                T.writes(y[vr, vb * lanes:vb * lanes + lanes])
                T.sblock_attr({SPARSE_BLOCK_ATTR: "n:m"})
                # "global" scope: a small stack array LLVM keeps in a register (sparse_linear.py)
                acc = T.alloc_buffer((lanes,), "float32", scope="global")
                for c in T.vectorized(lanes):
                    acc[c] = T.float32(0)
                for g in range(groups):
                    for j in T.unroll(n):
                        for c in T.vectorized(lanes):
                            acc[c] = acc[c] + values[vb, g * n + j, c] * _pick(positions[vb, g * n + j, c], x, vr,
                                                                              g * m, m)
                for c in T.vectorized(lanes):
                    y[vr, vb * lanes + c] = acc[c]

    return sparse_nm_linear


def lanes_layout(packed: np.ndarray, lanes: int) -> np.ndarray:
    """``(out, kept)`` as ``(out / lanes, kept, lanes)``: a vector of outputs per kept value."""
    out_f = packed.shape[0]
    return np.ascontiguousarray(packed.reshape(out_f // lanes, lanes, -1).transpose(0, 2, 1))


def call_nm_kernel(builder: relax.BlockBuilder, x: relax.Expr, nm: NMWeight, rows: int,
                   lanes: int) -> relax.Expr:
    """``x`` (``rows x in_features``) times the N:M weight."""
    kernel = builder.add_func(nm_kernel(nm, rows, lanes), "sparse_nm_linear")
    return relax.call_tir(kernel, [x, relax.const(lanes_layout(nm.values, lanes), "float32"),
                                   relax.const(lanes_layout(nm.positions, lanes), "uint8")],
                          relax.TensorType([rows, nm.shape[0]], "float32"))


class SparseNMLinear(SparseLinear):
    """The N:M kernel above, found by its block annotation; the input's reshape before it and
    the epilogue after it are elementwise loops (scheduled as ``SparseLinear``'s)."""

    kinds = ("n:m",)
