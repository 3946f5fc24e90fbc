"""int4 weight-only linear (targets/frontend/int4.py): a vector of output features per step.

The kernel's reduction block ``acc[m, n] += x[m, k] * (nibble(W[n/T, k/2, n%T]) - 8) * s[n/T, g, n%T]``
carries ``INT4_BLOCK_ATTR`` (the tile width ``T``, 64). Schedule::

    parallel for tile in N/T:              # one 64-byte line of packed weight per input pair
      for m:                               # the batch rows (1 for a batch-1 GEMV)
        acc_local[0:T] = 0                 # T accumulators: T/lanes vector registers
        for g, kb:                         # group, byte in the group: scale load hoisted
          for nib in 0, 1 (unrolled):      # low then high nibble: a constant shift
            acc_local[0:T] += x[m, k] * (float((W[tile, byte, 0:T] >> 4nib) & 15) - 8) * s[tile, g, 0:T]
        epilogue (bias, activation) on acc_local, written out

Batch-1 linear layers are bound by the weight's memory traffic; reading 4 bits per weight
instead of 32 is the point, and the T contiguous bytes per step keep the reads sequential.
Larger batches reuse each unpacked weight vector across the rows of ``m`` from registers.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from graphopt.targets.frontend.int4 import INT4_BLOCK_ATTR

from . import base


class Int4Linear(base.CPURule):
    """The int4 linear kernel of targets/frontend/int4.py, found by its block annotation."""

    def analyze(self, func):
        return base.root_blocks(func)

    def match(self, info: base.FuncInfo, target: Target):
        sch = info.sch
        mains = [b for b in info.blocks if INT4_BLOCK_ATTR in sch.get(b).annotations]
        if len(mains) != 1 or info.blocks[0] != mains[0]:
            return None
        tile = int(sch.get(mains[0]).annotations[INT4_BLOCK_ATTR])
        if len(sch.get_loops(mains[0])) != 5 or tile % base.simd_lanes(target) != 0:
            return None
        return mains[0], info.blocks[1:], tile

    def schedule(self, info: base.FuncInfo, match, target: Target) -> s_tir.Schedule:
        sch = info.sch
        main, post, tile = match
        m, n, g, kb, nib = sch.get_loops(main)
        tile_loop, lane = sch.split(n, [None, tile])
        sch.reorder(tile_loop, m, g, kb, nib, lane)
        acc = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(acc, m)
        for block in post:  # bias, activation: applied to the tile before it leaves the registers
            sch.reverse_compute_at(block, m)
        if post:
            sch.compute_inline(acc)  # the first epilogue block reads the accumulators directly
        sch.unroll(nib)
        sch.vectorize(lane)
        for block in post if post else [acc]:
            inner = sch.get_loops(block)[-1]
            if base.loop_extent(sch, inner) is not None:
                sch.vectorize(inner)
        sch.parallel(tile_loop)  # before the init is split off: parallel needs the whole reduction
        init = sch.decompose_reduction(main, g)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch
