"""Dense (groups=1) conv2d in NCHW with fused epilogue.

Design (the micro-kernel of oneDNN / TOPI's conv2d_NCHWc, without repacking activations):

* ``cpu_layout_passes`` stores every constant conv weight as HWIO (output channels
  innermost) at compile time, so a ``lanes``-wide vector of consecutive output channels
  is one contiguous load.  Activations stay NCHW: no layout_transform ops at run time.
* The output tile is ``RN`` output pixels of one row x ``FI`` output channels
  (FI = 1-2 vector registers).  For each (rc, ry, rx) of the reduction the kernel loads
  FI/lanes weight vectors, broadcasts RN input scalars and issues RN*FI/lanes FMAs into
  accumulators that stay in registers for the whole reduction (RN*FI/lanes <= ~24).
* The accumulator is a ``cache_write`` buffer re-laid out as (n, y, x, f) so its fast
  axis is the vectorized one; the copy back to NCHW carries the fused epilogue (BN
  affine, bias, relu, residual add, clip) by ``reverse_compute_inline``.
* Parallelism: the fused (n, f-block, y) loop.  Weights of one f-block (C*KH*KW*FI
  floats) stay in L2 while the row loop sweeps the image.
* Padding stays a separate, parallel copy: inlining it would put a bounds check on every
  broadcast in the inner loop.

When the weight is not constant (OIHW at run time) the same schedule still applies;
only the weight loads become strided.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from . import base


def match_conv2d(info: base.FuncInfo):
    """(C_store, data_load, weight_load) when info.main is a dense NCHW conv2d, else None."""
    if info is None or info.main is None:
        return None
    block = info.stmt(info.main)
    kinds = base.iter_kinds(block)
    if kinds != "SSSSRRR":
        return None
    ops = base.mac_operands(block)
    if ops is None:
        return None
    store, a, b = ops
    iv = [v.var for v in block.iter_vars]
    # The weight's indices are plain iter vars and include the output channel.
    for data, weight in ((a, b), (b, a)):
        if len(data.indices) != 4 or len(weight.indices) != 4:
            continue
        if not all(isinstance(i, tirx.Var) for i in weight.indices):
            continue
        if not any(i.same_as(iv[1]) for i in weight.indices):
            continue
        # Dense conv: the data's channel index is exactly rc (grouped convs use f too).
        if not data.indices[1].same_as(iv[4]):
            return None
        return store, data, weight
    return None


class Conv2dNCHW(base.CPURule):
    """Register-blocked, vectorized-over-output-channels direct convolution."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not self.is_target_available(target):
            return None
        info = base.analyze(func)
        m = match_conv2d(info)
        if m is None:
            return None
        _store, _data, weight = m
        sch = info.sch
        main = info.main
        block = sch.get(main)
        n_ext, f_ext, y_ext, x_ext = (int(iv.dom.extent) for iv in block.iter_vars[:4])
        lanes = base.simd_lanes(target, block.body.buffer.dtype.bits)
        max_acc = base.num_vector_registers(target) - 8  # leave room for weights/broadcasts

        # Output-channel tile: 2 vectors when possible (fewer input broadcasts per FMA).
        fi = base.largest_divisor(f_ext, 2 * lanes, lanes) or base.largest_divisor(f_ext, 2 * lanes, 4)
        if fi == 0:
            fi = base.largest_divisor(f_ext, 2 * lanes)
        f_vecs = max(fi // lanes, 1)
        # Width tile: as many pixels as accumulator registers allow.
        rn = base.largest_divisor(x_ext, max(max_acc // f_vecs, 1)) or 1

        post = base.inline_post(sch, info.post)
        wb = sch.cache_write(main, 0, "local")
        # Accumulator laid out (n, y, x, f): vector axis f contiguous.
        sch.transform_layout(main, ("write", 0), lambda n, f, y, x: (n, y, x, f))

        n, f, y, x, rc, ry, rx = sch.get_loops(main)
        fo, fv = sch.split(f, [None, fi])
        xo, xi = sch.split(x, [None, rn])
        sch.reorder(n, fo, y, xo, rc, ry, rx, xi, fv)
        outer = sch.fuse(n, fo, y)
        sch.parallel(outer)
        sch.unroll(xi)
        sch.vectorize(fv)

        sch.reverse_compute_at(wb, xo, preserve_unit_loops=True)
        left = base.fuse_epilogue(sch, wb, post)
        # Write-back loops: channel outer, width inner -> contiguous NCHW stores.
        wb_loops = sch.get_loops(wb)[2:]
        if len(wb_loops) == 4:
            wn, wf, wy, wx = wb_loops
            sch.reorder(wn, wy, wf, wx)
        for b in left:
            sch.reverse_compute_at(b, xo, preserve_unit_loops=True)
        sch.decompose_reduction(main, rc)

        cores = base.num_cores(target)
        for b in info.pre:  # padding copies
            base.parallel_vectorize_injective(sch, b, lanes, cores)
        del weight, n_ext, y_ext
        return sch
