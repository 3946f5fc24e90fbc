"""Row reductions: softmax, layer norm, and similar multi-block reduce+normalize funcs.

Shape: several blocks (some reductions over the trailing axes, some injective) that all
share the same leading spatial axes, e.g. softmax = max(SR) -> exp(SS) -> sum(SR) ->
div(SS), layer norm = mean/var(SR) -> normalize(SS).  The schedule follows dlight's CPU
``Reduction`` rule: parallelize the fused leading spatial axes of the last block,
compute_at every other block under it (so each row is read from L1, not from memory, by
every stage), vectorize the injective stages and unroll the reduction stages.  We
delegate the mechanics to ``tvm.s_tir.dlight.cpu.Reduction`` (with its analysis fixed
to *our* target's SIMD width) and only add the applicability check and a guard that the
result has a parallel loop.
"""

from __future__ import annotations

from tvm.s_tir.dlight.cpu import Reduction as _DlightReduction
from tvm.target import Target

from . import base


class RowReduction(base.CPURule):
    """Reduce-then-normalize funcs, by dlight's CPU ``Reduction`` rule."""

    def match(self, info: base.FuncInfo, target: Target):
        if len(info.blocks) < 2:
            return None
        sch = info.sch
        kinds = [base.iter_kinds(sch.get(b)) for b in info.blocks]
        n_red = sum("R" in k for k in kinds)
        if n_red == 0 or "R" in kinds[-1]:
            return None
        # Funcs with multiply-accumulate blocks (matmul / conv, or attention = two batch
        # matmuls around a softmax) belong to the matmul / conv / fallback rules.
        if any(base.mac_operands(sch.get(b)) is not None for b in info.blocks):
            return None
        if not all(base.reduces_trailing_axes(sch.get(b)) for b in info.blocks if "R" in base.iter_kinds(sch.get(b))):
            return None  # e.g. softmax over a middle axis: the fallback rule's loops stay correct
        if any(base.writes_bool(sch.get(b)) for b in info.blocks):
            return None  # dlight would vectorize them (see base.writes_bool)
        return True

    def schedule(self, info: base.FuncInfo, match, target: Target):
        # dlight's rule declines (None) the patterns it cannot handle; the fallback rule
        # takes those
        return _DlightReduction().apply(info.sch.mod["main"], target, False)
