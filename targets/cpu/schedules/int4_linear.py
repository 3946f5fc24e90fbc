"""int4 weight-only linear (targets/frontend/quantized_int4.py): a vector of output features per step.

The kernel is three reductions: ``xsum[m, g]`` (the input summed per group),
``dots[m, g, n] = sum_{k in g} x[m, k] * u(W[n/T, k/2, n%T])`` (``u`` the stored nibble) and the
annotated main block ``acc[m, n] += s[n/T, g, n%T] * (dots[m, g, n] - 8 xsum[m, g])``, whose
annotation ``INT4_BLOCK_ATTR`` is the tile width ``T`` (64). Schedule::

    xsum                                   # M x groups adds, before the parallel loop
    parallel for tile in N/T:              # one 64-byte line of packed weight per input pair
      for m:                               # the batch rows (1 for a batch-1 GEMV)
        for part in T/S:                   # S output features whose accumulators fit the registers
          acc_local[0:S] = 0
          for g:
            dots_local[0:S] = 0            # S/lanes vector registers, as many again for acc_local
            for kb, nib (nib unrolled: a constant shift):
              dots_local[0:S] += x[m, k] * float((W[tile, byte, part*S:+S] >> 4nib) & 15)
            acc_local[0:S] += s[tile, g, part*S:+S] * (dots_local[0:S] - 8 xsum[m, g])
          epilogue (bias, activation) on acc_local, written out

The innermost step is an unpack, a conversion and a multiply-add per vector; the scale and
the nibble offset cost once per group. Batch-1 linear layers are bound by the weight's
memory traffic; reading 4 bits per weight instead of 32 is the point, and the contiguous
bytes per step keep the reads sequential. ``S`` comes from the target's vector unit: the
largest part of the tile whose two accumulator sets (``dots_local``, ``acc_local``) fit its
accumulator budget (``VectorISA.accumulators``): the whole tile on AVX-512 (4 + 4 zmm), half of
it on NEON (8 + 8 of 4-lane registers) and AVX2 (4 + 4 ymm). The parts of a tile read the same
cache lines one after the other, which stay in L1/L2 between them.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from graphopt.targets.frontend.quantized_int4 import INT4_BLOCK_ATTR

from . import base


def register_part(tile: int, isa: base.VectorISA) -> int:
    """Output features scheduled together: the largest divisor of ``tile``, a whole number of
    vectors, whose two sets of accumulators fit ``isa``'s accumulator registers (one vector at least)."""
    lanes = isa.lanes(32)
    fitting = [p for p in range(lanes, tile + 1, lanes) if tile % p == 0 and 2 * (p // lanes) <= isa.accumulators]
    return max(fitting, default=lanes)


class Int4Linear(base.CPURule):
    """The int4 linear kernel of targets/frontend/quantized_int4.py, found by its block annotation."""

    def analyze(self, func):
        return base.root_blocks(func)

    def match(self, info: base.FuncInfo, target: Target):
        sch = info.sch
        names = [sch.get(b).name_hint for b in info.blocks]
        mains = [i for i, b in enumerate(info.blocks) if INT4_BLOCK_ATTR in sch.get(b).annotations]
        if len(mains) != 1 or sorted(names[:mains[0]]) != ["linear_int4_group", "linear_int4_xsum"]:
            return None
        main = info.blocks[mains[0]]
        tile = int(sch.get(main).annotations[INT4_BLOCK_ATTR])
        if len(sch.get_loops(main)) != 3 or tile % base.simd_lanes(target) != 0:
            return None
        dots = info.blocks[names.index("linear_int4_group")]
        return dots, main, info.blocks[mains[0] + 1:], tile, register_part(tile, base.vector_isa(target))

    def schedule(self, info: base.FuncInfo, match, target: Target) -> s_tir.Schedule:
        sch = info.sch
        dots, main, post, tile, part = match
        m, n, g = sch.get_loops(main)
        tile_loop, part_loop, lane = sch.split(n, [None, tile // part, part])
        sch.reorder(tile_loop, m, part_loop, g, lane)
        acc = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(acc, part_loop)
        for block in post:  # bias, activation: applied to the part before it leaves the registers
            sch.reverse_compute_at(block, part_loop)
        if post:
            sch.compute_inline(acc)  # the first epilogue block reads the accumulators directly
        # one group's dot products for the tile, in registers, right where the group's scale is applied
        sch.compute_at(dots, g)
        sch.set_scope(dots, 0, "local")
        dot_lane, kb, nib = sch.get_loops(dots)[-3:]
        sch.reorder(kb, nib, dot_lane)
        sch.unroll(nib)
        sch.vectorize(dot_lane)
        sch.vectorize(lane)
        for block in post if post else [acc]:
            inner = sch.get_loops(block)[-1]
            if base.loop_extent(sch, inner) is not None:
                sch.vectorize(inner)
        sch.parallel(tile_loop)  # before the inits are split off: parallel needs whole reductions
        sch.vectorize(sch.get_loops(sch.decompose_reduction(dots, kb))[-1])
        sch.vectorize(sch.get_loops(sch.decompose_reduction(main, g))[-1])
        return sch
