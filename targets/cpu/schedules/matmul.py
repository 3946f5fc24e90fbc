"""Matmul / dense / batch-matmul with fused epilogue.

Matches any single-reduction block ``C[b.., i, j] += A[b.., i, k] * B[b.., k, j]``
(``B[b.., j, k]`` too) -- what LegalizeOps makes of relax matmul, linear (after
FoldConstant pre-transposes the constant weight) and the batched matmuls of attention.

Schedule (a register-blocked GEMM micro-kernel, as in BLIS/oneDNN):
* output tile ``II`` rows x ``JI`` columns, JI = 1-2 SIMD vectors along j (contiguous in
  C and, for the NN form, in B); II rows chosen so II*JI/lanes accumulators fit in the
  vector registers;
* loop order ``batch, jo, io | k | ii (unrolled), ji (vectorized)``: for each k one or two
  vector loads of B, II broadcasts of A, II*JI/lanes FMAs;
* the accumulator tile is a ``cache_write`` in "local" scope (registers after LLVM's
  SROA); its write-back carries the fused epilogue (bias, relu, gelu, residual add ...);
* parallel over the fused (batch, jo, io) loops when there is enough work; a GEMV
  (M == 1) tile per core is too small to pay for the thread-pool wake-up otherwise.
"""

from __future__ import annotations

from tvm import tirx
from tvm.target import Target

from . import base

# Multiply-adds below which a kernel stays single-threaded (thread-pool wake-up ~5 us).
_MIN_PARALLEL_MACS = 1 << 17
# Interleaved partial sums of a long GEMV reduction (_schedule_gemv_split_k).
_GEMV_K_SPLIT = 2


def match_matmul(info: base.FuncInfo):
    """Return the index of the vector axis j among the spatial iters, or None."""
    if info is None or info.main is None:
        return None
    block = info.stmt(info.main)
    kinds = base.iter_kinds(block)
    if not kinds.endswith("SSR") or kinds.count("R") != 1 or not kinds.startswith("S"):
        return None
    if len(block.iter_vars) != kinds.index("R") + 1:
        return None
    ops = base.mac_operands(block)
    if ops is None:
        return None
    store, a, b = ops
    iv = [v.var for v in block.iter_vars]
    k = iv[-1]
    # Output must be indexed by plain spatial vars; both operands must use k.
    if not all(isinstance(i, tirx.Var) for i in store.indices):
        return None
    for op in (a, b):
        if not any(isinstance(i, tirx.Var) and i.same_as(k) for i in op.indices):
            return None
    return block


class Matmul(base.CPURule):
    """Register-blocked, vectorized, parallel GEMM / batched GEMM."""

    def match(self, info: base.FuncInfo, target: Target):
        return match_matmul(info)

    def schedule(self, info: base.FuncInfo, block, target: Target):
        sch = info.sch
        post = base.inline_post(sch, info.post)
        schedule_gemm_block(sch, info.main, target, post)
        lanes = base.simd_lanes(target, block.body.buffer.dtype.bits)
        for b in info.pre:
            base.parallel_vectorize_injective(sch, b, lanes, base.num_cores(target))
        return sch


def gemm_j_tile(n_ext: int, lanes: int, m_ext: int) -> int:
    """Output columns per register tile: 1-2 SIMD vectors when N allows, else a divisor.

    With rows to spare (M >= 2) the tile is a whole or power-of-two part of a register:
    LLVM splits odd widths such as <20 x float> (N = 1000) into a zmm + xmm pair with
    shuffles, 10x slower than 8-lane tiles (mobilenet's classifier at batch 8: 16 vs 180
    GFLOP/s). A GEMV (M = 1) has one accumulator row, so there the widest tile wins:
    more independent FMA chains (N = 1000: 43 GFLOP/s at 20 wide, 28 at 8).
    layout.py packs constant weights in panels of exactly this width, so the two must
    agree (a panel of another width would make the tile's vector loads strided)."""
    if m_ext >= 2:
        ji = base.register_tile(n_ext, lanes, lanes // 4)
        if ji:
            return ji
    ji = base.largest_divisor(n_ext, 2 * lanes, lanes) or base.largest_divisor(n_ext, 2 * lanes, 4)
    if ji == 0:
        ji = n_ext if n_ext <= 2 * lanes else base.largest_divisor(n_ext, 2 * lanes)
    return ji


def gemm_i_tile(m_ext: int, ji: int, lanes: int, max_acc: int) -> int:
    """Output rows per register tile: as many as the accumulator registers allow, each row
    ``ceil(ji / lanes)`` accumulators (with one broadcast of A and the tile's vectors of B
    the step fits the register file: 12 x 1 + 1 + 1 of AVX2's 16)."""
    j_vecs = max((ji + lanes - 1) // lanes, 1)
    return base.largest_divisor(m_ext, max(max_acc // j_vecs, 1)) or 1


def _schedule_gemv_split_k(sch, main, ji: int, cores: int, post):
    """A GEMV (one row) with its reduction split in ``_GEMV_K_SPLIT`` interleaved partial
    sums (rfactor), summed at the end of each column tile.

    With one row, a tile has only ji/lanes accumulators, each a chain of dependent FMAs
    down K: the kernel waits on FMA latency, not memory (mobilenet_v2's 1280 -> 1000
    classifier: 0.050 ms warm, 2 threads).  Two interleaved partial sums per column halve
    the chains' length: 0.043 ms."""
    i, j, k = sch.get_loops(main)[-3:]
    jo, jv = sch.split(j, [None, ji])
    ko, ki = sch.split(k, [None, _GEMV_K_SPLIT])
    sch.reorder(jo, i, ko, ki, jv)
    partial = sch.rfactor(ki, factor_axis=0)
    sch.set_scope(partial, 0, "local")
    jo, _i, ko, ki, jv = sch.get_loops(partial)
    base.spread_loops(sch, jo, cores, unroll=(ki,), vectorize=jv)
    sch.decompose_reduction(partial, ko)
    # the final sum over the partial sums, and the epilogue, per column tile
    sch.reverse_compute_at(main, jo)
    sch.decompose_reduction(main, sch.get_loops(main)[-2])
    for b in post:
        sch.reverse_compute_at(b, jo)
        try:
            sch.vectorize(sch.get_loops(b)[-1])
        except Exception:  # noqa: BLE001 - an epilogue it cannot vectorize stays scalar
            pass
    return jo


def is_gemm_block(block) -> bool:
    kinds = base.iter_kinds(block)
    if not kinds.endswith("SSR") or kinds.count("R") != 1 or not kinds.startswith("S"):
        return False
    ops = base.mac_operands(block)
    if ops is None:
        return False
    store, a, b = ops
    i, j, k = (iv.var for iv in block.iter_vars[-3:])
    if not all(isinstance(idx, tirx.Var) for idx in store.indices):
        return False

    def reads(op, var) -> bool:
        return any(isinstance(idx, tirx.Var) and idx.same_as(var) for idx in op.indices)

    # Both operands are indexed by k, and i and j each index one of them as a plain
    # variable: A[.., i, k] x B[.., k, j] or the NT form B[.., j, k].  Reductions that
    # merely look alike (Winograd's transforms: T[e, r, p, c] x B[r, e2], or an output
    # pixel read as tile x // 4 and tap x % 4) are not GEMMs: tiled as one, the output
    # of Winograd's inverse transform came out wrong.
    return (reads(a, k) and reads(b, k)
            and ((reads(a, i) and reads(b, j)) or (reads(b, i) and reads(a, j))))


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _swap_axes(first: int, second: int):
    """The index map exchanging two axes.  A closure over a plain ``*idx`` signature:
    ``transform_layout`` binds one index variable to every parameter it sees, defaults included."""

    def swap(*idx):
        idx = list(idx)
        idx[first], idx[second] = idx[second], idx[first]
        return tuple(idx)

    return swap


def schedule_gemm_block(sch, main, target: Target, post=()):
    """Schedule one GEMM block in place (also used for matmuls inside bigger funcs)."""
    block = sch.get(main)
    exts = [int(iv.dom.extent) for iv in block.iter_vars]
    m_ext, n_ext = exts[-3], exts[-2]
    isa = base.vector_isa(target)
    lanes = isa.lanes(block.body.buffer.dtype.bits)
    max_acc = isa.accumulators
    cores = base.num_cores(target)

    ivs = [v.var for v in block.iter_vars]
    jvar, kvar = ivs[-2], ivs[-1]
    _store, a, b = base.mac_operands(block)
    j_operand = next((op for op in (a, b) if any(i.same_as(jvar) for i in op.indices)), b)
    batch_vars = ivs[:-3]
    # Batch axes the "weight" operand ignores (e.g. a (L, 1, E) x (E, F) projection) are
    # really rows: merge them into M so a M=1 batched GEMV becomes one GEMM tile loop.
    merge_batch = bool(batch_vars) and not any(
        v.same_as(idx) for v in batch_vars for idx in j_operand.indices)
    if merge_batch:
        for e in exts[:-3]:
            m_ext *= e
    ji = gemm_j_tile(n_ext, lanes, m_ext)
    ii = gemm_i_tile(m_ext, ji, lanes, max_acc)

    # "NT" operand (B[.., j, k], e.g. Q @ K^T): a vector over j would be a gather, so
    # the (jtile x K) panel is repacked as (K x jtile) before the row tiles that read it.
    nt_operand = None
    for op in (a, b):
        idx = list(op.indices)
        if any(isinstance(i, tirx.Var) and i.same_as(jvar) for i in idx) and not idx[-1].same_as(jvar):
            nt_operand = op

    k_ext = exts[-1]
    if (m_ext == 1 and not batch_vars and nt_operand is None and k_ext % _GEMV_K_SPLIT == 0
            and k_ext >= 512 and n_ext * k_ext >= _MIN_PARALLEL_MACS):
        return _schedule_gemv_split_k(sch, main, ji, cores, post)
    wb = sch.cache_write(main, 0, "local")
    loops = sch.get_loops(main)
    batch, i, j, k = loops[:-3], loops[-3], loops[-2], loops[-1]
    if merge_batch:
        i = sch.fuse(*batch, i)
        batch = []
    io, iv_ = sch.split(i, [None, ii])
    jo, jv = sch.split(j, [None, ji])
    sch.reorder(*batch, jo, io, k, iv_, jv)
    sch.unroll(iv_)
    sch.vectorize(jv)
    total = 1
    for e in exts:
        total *= e
    parallel = cores > 1 and total >= _MIN_PARALLEL_MACS
    repack = nt_operand is not None and len(nt_operand.indices) >= 2
    # A repacked NT panel serves every row tile of its (batch, column tile): packed once per
    # panel, the copy costs 1/M of the GEMM's loads; once per output tile, 1/ii (attention's
    # Q @ K^T at K = 64: the scalar transposing copies took longer than the FMAs).  The
    # panels alone must keep every core busy, else the rows are split across cores too.
    panels = ((n_ext + ji - 1) // ji) * (1 if merge_batch else _product(exts[:-3]))
    if repack and (not parallel or panels >= 2 * cores):
        outer = sch.fuse(*batch, jo) if batch else jo
        tile = io
    else:
        outer = tile = sch.fuse(*batch, jo, io)
    if parallel:
        sch.parallel(outer)
    if repack:
        try:
            r_idx = next(n for n, r in enumerate(sch.get(main).reads) if r.source.same_as(nt_operand.source))
            pc = sch.cache_read(main, r_idx, "global")
            sch.compute_at(pc, outer)
            jpos = next(n for n, e in enumerate(nt_operand.indices) if e.same_as(jvar))
            kpos = next(n for n, e in enumerate(nt_operand.indices) if e.same_as(kvar))
            sch.transform_layout(pc, ("write", 0), _swap_axes(jpos, kpos))
        except Exception:  # noqa: BLE001 - keep the strided form, still correct
            pass
    sch.reverse_compute_at(wb, tile, preserve_unit_loops=True)
    left = base.fuse_epilogue(sch, wb, list(post))
    try:
        sch.vectorize(sch.get_loops(wb)[-1])
    except Exception:  # noqa: BLE001 - epilogue with a non-vectorizable access
        pass
    for b in left:
        sch.reverse_compute_at(b, tile, preserve_unit_loops=True)
    sch.decompose_reduction(main, k)
    return outer
