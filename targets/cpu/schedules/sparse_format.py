"""Block-sparse weights read off their values, and when the block-sparse kernel pays.

A weight is looked at as the ``(out_features, in_features)`` matrix of its linear. Its
blocks are one SIMD vector of weights, ``lanes`` of them (16 fp32 on AVX-512, 8 on AVX2, 4 on
NEON), laid one of two ways:

* ``1 x lanes`` ("row" blocks): one output's ``lanes`` consecutive inputs, the default block
  of the ``sparsify`` pass. The kernel multiplies the block by the input's ``lanes``
  consecutive values, two contiguous vector loads, and sums each output's vector once;
* ``lanes x 1`` ("column" blocks): ``lanes`` consecutive outputs of one input. The kernel
  multiplies the block by one broadcast input value: an output vector per step, no final sum.

Coarser pruning is found too: an all-zero ``4 x 16`` or ``1 x 32`` block is several all-zero
``1 x 16`` ones. The layout with more all-zero blocks is used, stored as BSR (block sparse
row): the kept blocks' values, each kept block's column (``int32``) and where each block row
starts (``int32``, one more than the block rows). Only kept blocks are stored, so a weight
whose blocks are 90% zero costs 10% of its bytes plus one index per kept block.

Whether the sparse kernel beats the dense one is decided per layer from its share of kept
blocks and its row count (the product of the input's leading dimensions): the dense kernel
is a register-blocked GEMM that streams the weight, the sparse one pays an index load per
block and, for row blocks, a horizontal sum per output. :data:`MAX_KEPT_FOR_ONE_ROW` and
:data:`MAX_KEPT_FOR_ROWS` are the break-even shares measured with benchmarks/bench_sparse.py
(see docs/PERFORMANCE.md), rounded down for the noise of a shared host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Largest share of kept blocks at which the sparse kernel still wins, for a matrix-vector
# product (one row: the weight's bytes decide, and the sparse kernel reads fewer of them;
# the FFN 256-2048-256 on one thread: 1.8x at half the blocks kept, 0.84x with all kept) and
# for a matrix product of at least GEMM_ROWS rows (the dense GEMM keeps a register tile of
# rows x columns and reuses each load; the sparse kernel loads an input vector per multiply-
# add, about 2.5x the dense GEMM's time per kept block: the 128-token encoder lost at 50%
# and won at 70% and 90%).
MAX_KEPT_FOR_ONE_ROW = 0.6
MAX_KEPT_FOR_ROWS = 0.3
GEMM_ROWS = 8
# Weights with fewer all-zero blocks than this share are dense to any reader: no log line.
NOTABLE_ZERO_SHARE = 0.05


@dataclass(frozen=True)
class BSRWeight:
    """A ``(out_features, in_features)`` weight as its kept ``block`` s (rows x cols).

    ``values[j]`` is kept block ``j`` flattened in the order the kernel reads it: the block's
    ``lanes`` weights, contiguous (a row block's inputs, a column block's outputs);
    ``indices[j]`` its block column; block row ``i`` holds blocks ``indptr[i]:indptr[i+1]``."""

    shape: tuple[int, int]
    block: tuple[int, int]
    values: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray

    @property
    def kept(self) -> int:
        return int(self.indices.shape[0])

    @property
    def blocks(self) -> int:
        return (self.shape[0] // self.block[0]) * (self.shape[1] // self.block[1])

    @property
    def kept_share(self) -> float:
        return self.kept / self.blocks

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes + self.indptr.nbytes

    def dense(self) -> np.ndarray:
        """The ``(out_features, in_features)`` weight back (tests)."""
        r, c = self.block
        out = np.zeros((self.shape[0] // r, r, self.shape[1] // c, c), dtype=self.values.dtype)
        rows = np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))
        out[rows, :, self.indices, :] = self.values.reshape(self.kept, r, c)
        return out.reshape(self.shape)


def block_layouts(shape: tuple[int, int], lanes: int) -> list[tuple[int, int]]:
    """The block shapes a ``shape`` weight can be cut into: ``1 x lanes`` and ``lanes x 1``
    where the dimension is a whole number of vectors."""
    out_f, in_f = shape
    return [b for b in ((1, lanes), (lanes, 1)) if out_f % b[0] == 0 and in_f % b[1] == 0]


def zero_block_mask(w: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """``(out/r, in/c)`` booleans: True where the block holds only zeros (+0.0 or -0.0)."""
    r, c = block
    blocks = w.reshape(w.shape[0] // r, r, w.shape[1] // c, c)
    return ~np.any(blocks != 0, axis=(1, 3))


def to_bsr(w: np.ndarray, block: tuple[int, int]) -> BSRWeight:
    """``w`` (out, in) as its kept blocks (all-zero blocks dropped)."""
    r, c = block
    keep = ~zero_block_mask(w, block)
    if not keep.any():
        keep[0, 0] = True  # one zero block: the kernel's buffers are never empty
    rows, cols = np.nonzero(keep)  # row-major: block rows in order, columns ascending
    blocks = w.reshape(w.shape[0] // r, r, w.shape[1] // c, c).transpose(0, 2, 1, 3)
    values = np.ascontiguousarray(blocks[rows, cols].reshape(len(rows), r * c))
    indptr = np.zeros(w.shape[0] // r + 1, dtype=np.int32)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return BSRWeight((int(w.shape[0]), int(w.shape[1])), block, values, cols.astype(np.int32), indptr)


@dataclass(frozen=True)
class SparseChoice:
    """What the build does with one constant linear weight, and why (the build log's line)."""

    shape: tuple[int, int]  # (out_features, in_features)
    rows: int  # the product's row count (batch x sequence)
    block: tuple[int, int] | None  # the layout with the most all-zero blocks, None if none fits
    zero_share: float  # share of all-zero blocks in that layout
    sparse: bool

    @property
    def max_kept(self) -> float:
        return MAX_KEPT_FOR_ROWS if self.rows >= GEMM_ROWS else MAX_KEPT_FOR_ONE_ROW

    @property
    def notable(self) -> bool:
        """Worth a log line: some blocks are zero, or the layer is sparse."""
        return self.sparse or self.zero_share >= NOTABLE_ZERO_SHARE

    def reason(self) -> str:
        out_f, in_f = self.shape
        what = f"linear {in_f}->{out_f} ({self.rows} row{'s' if self.rows != 1 else ''})"
        if self.block is None:
            return f"{what}: dense kernel, the features are not a whole number of vectors"
        layout = f"{self.block[0]}x{self.block[1]}"
        share = f"{self.zero_share:.0%} of its {layout} blocks are zero"
        needed = f"{1 - self.max_kept:.0%}"
        if self.sparse:
            return f"{what}: block-sparse kernel, {share} (the sparse kernel wins from {needed})"
        return f"{what}: dense kernel, only {share}; the sparse kernel wins from {needed} at this row count"


def choose(w: np.ndarray, rows: int, lanes: int) -> tuple[SparseChoice, BSRWeight | None]:
    """The kernel for the ``(out, in)`` weight ``w`` of a product over ``rows`` input rows, and
    its BSR form when the sparse kernel is chosen."""
    shape = (int(w.shape[0]), int(w.shape[1]))
    layouts = block_layouts(shape, lanes)
    if not layouts:
        return SparseChoice(shape, rows, None, 0.0, False), None
    shares = [float(zero_block_mask(w, b).mean()) for b in layouts]
    best = int(np.argmax(shares))
    block, zero_share = layouts[best], shares[best]
    choice = SparseChoice(shape, rows, block, zero_share, False)
    if 1.0 - zero_share > choice.max_kept:
        return choice, None
    return SparseChoice(shape, rows, block, zero_share, True), to_bsr(w, block)


# --------------------------------------------------------------------------- N:M weights
#
# A weight is N:M when each output row's every M consecutive inputs hold at most N nonzeros
# (2:4 is the ``sparsify`` pass's ``pattern=2:4``). It is stored packed: each group's N kept
# values, ``(out, in * N / M)`` floats, and each one's position in its group as a ``uint8``,
# a quarter of a float. The kernel (sparse_nm.py) picks each kept value's input among its
# group's M with M - 1 vector selects, so it looks for M of 4 and 8 only.
NM_GROUPS = (4, 8)
# The N:M kernel wins over the dense one for a matrix-vector product (one row: the FFN
# 256-2048-256 on one thread, 1.6-2.3x at 2:4) and loses from a few rows on (4 rows: 0.75x,
# 128 rows: 0.8x; the dense GEMM reuses each weight load across its rows, the N:M kernel
# redoes its selects per row), measured with benchmarks/bench_sparse.py (docs/PERFORMANCE.md).
NM_MAX_ROWS = 1
NM_MAX_KEPT = 0.5  # N:M patterns keeping more than half the weights are left dense


@dataclass(frozen=True)
class NMWeight:
    """A ``(out_features, in_features)`` weight as ``n`` kept values per ``m`` inputs:
    ``values[o, g * n + j]`` is at input ``g * m + positions[o, g * n + j]`` of output ``o``."""

    shape: tuple[int, int]
    n: int
    m: int
    values: np.ndarray  # (out, in * n / m) float32
    positions: np.ndarray  # (out, in * n / m) uint8

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.positions.nbytes

    def dense(self) -> np.ndarray:
        """The ``(out_features, in_features)`` weight back (tests)."""
        out_f, in_f = self.shape
        groups = in_f // self.m
        dense = np.zeros((out_f, groups, self.m), dtype=self.values.dtype)
        np.put_along_axis(dense, self.positions.reshape(out_f, groups, self.n).astype(np.int64),
                          self.values.reshape(out_f, groups, self.n), axis=-1)
        return dense.reshape(self.shape)


def nm_structure(w: np.ndarray) -> tuple[int, int] | None:
    """``(n, m)`` with the smallest kept share ``n / m`` (then the smallest ``m``, of NM_GROUPS)
    such that every ``m`` consecutive inputs of each row of ``w`` hold at most ``n`` nonzeros
    and ``n / m <= NM_MAX_KEPT``; None when there is none."""
    best = None
    for m in NM_GROUPS:
        if w.shape[1] % m:
            continue
        n = max(int((w.reshape(w.shape[0], -1, m) != 0).sum(axis=-1).max()), 1)
        if n / m <= NM_MAX_KEPT and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return best


def to_nm(w: np.ndarray, n: int, m: int) -> NMWeight:
    """``w`` (out, in) packed as ``n`` of every ``m`` inputs (each group's nonzeros, in input
    order, then zeros to make ``n``)."""
    out_f, in_f = w.shape
    groups = w.reshape(out_f, in_f // m, m)
    # a stable sort of "is zero" puts each group's nonzeros first, in input order
    order = np.argsort(groups == 0, axis=-1, kind="stable")[..., :n]
    order.sort(axis=-1)
    values = np.take_along_axis(groups, order, axis=-1)
    return NMWeight((int(out_f), int(in_f)), n, m, np.ascontiguousarray(values.reshape(out_f, -1)),
                    np.ascontiguousarray(order.reshape(out_f, -1).astype(np.uint8)))


@dataclass(frozen=True)
class NMChoice:
    """What the build does with one N:M constant linear weight, and why (the build log's line)."""

    shape: tuple[int, int]
    rows: int
    n: int
    m: int
    lanes: int

    @property
    def sparse(self) -> bool:
        return self.rows <= NM_MAX_ROWS and self.shape[0] % self.lanes == 0

    def reason(self) -> str:
        out_f, in_f = self.shape
        what = f"linear {in_f}->{out_f} ({self.rows} row{'s' if self.rows != 1 else ''}), {self.n}:{self.m} sparse"
        if self.sparse:
            return f"{what}: N:M-sparse kernel"
        if self.rows > NM_MAX_ROWS:
            return (f"{what}: dense kernel; the N:M kernel wins only up to {NM_MAX_ROWS} row"
                    f"{'s' if NM_MAX_ROWS != 1 else ''} (the dense GEMM reuses each weight load across rows)")
        return f"{what}: dense kernel, the {out_f} outputs are not a whole number of {self.lanes}-lane vectors"


def choose_nm(w: np.ndarray, rows: int, lanes: int) -> tuple[NMChoice | None, NMWeight | None]:
    """The N:M choice for the ``(out, in)`` weight ``w`` (None when it is not N:M, nm_structure)
    and its packed form when the N:M kernel is chosen."""
    structure = nm_structure(w)
    if structure is None:
        return None, None
    choice = NMChoice((int(w.shape[0]), int(w.shape[1])), rows, *structure, lanes)
    return choice, (to_nm(w, *structure) if choice.sparse else None)
