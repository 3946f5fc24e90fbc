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

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not self.is_target_available(target):
            return None
        info = base.analyze(func)
        block = match_matmul(info)
        if block is None:
            return None
        sch = info.sch
        main = info.main
        exts = [int(iv.dom.extent) for iv in block.iter_vars]
        m_ext, n_ext, k_ext = exts[-3], exts[-2], exts[-1]
        lanes = base.simd_lanes(target, block.body.buffer.dtype.bits)
        max_acc = base.num_vector_registers(target) - 8
        cores = base.num_cores(target)

        ji = base.largest_divisor(n_ext, 2 * lanes, lanes) or base.largest_divisor(n_ext, 2 * lanes, 4)
        if ji == 0:
            ji = n_ext if n_ext <= 2 * lanes else base.largest_divisor(n_ext, 2 * lanes)
        j_vecs = max((ji + lanes - 1) // lanes, 1)
        ii = base.largest_divisor(m_ext, max(max_acc // j_vecs, 1)) or 1

        post = base.inline_post(sch, info.post)
        wb = sch.cache_write(main, 0, "local")
        loops = sch.get_loops(main)
        batch, i, j, k = loops[:-3], loops[-3], loops[-2], loops[-1]
        io, iv_ = sch.split(i, [None, ii])
        jo, jv = sch.split(j, [None, ji])
        sch.reorder(*batch, jo, io, k, iv_, jv)
        sch.unroll(iv_)
        sch.vectorize(jv)
        outer = sch.fuse(*batch, jo, io)
        total = 1
        for e in exts:
            total *= e
        if cores > 1 and total >= _MIN_PARALLEL_MACS:
            sch.parallel(outer)
        sch.reverse_compute_at(wb, outer, preserve_unit_loops=True)
        left = base.fuse_epilogue(sch, wb, post)
        wb_loops = sch.get_loops(wb)
        try:
            sch.vectorize(wb_loops[-1])
        except Exception:  # noqa: BLE001 - epilogue with a non-vectorizable access
            pass
        for b in left:
            sch.reverse_compute_at(b, outer, preserve_unit_loops=True)
        sch.decompose_reduction(main, k)
        for b in info.pre:
            base.parallel_vectorize_injective(sch, b, lanes, cores)
        del k_ext
        return sch
