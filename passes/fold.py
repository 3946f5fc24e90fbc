"""``fold``: the standard clean-up, as one pass.

Runs ``noop``, ``fold-bn``, ``fold-const``, ``cse`` and ``dce`` in that order — the order
in which each exposes work for the next (a removed dropout lets BN meet its conv; folded
constants make duplicates visible; everything leaves dead code). Use the individual passes
to bisect or to skip one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphopt.graph import Graph
from graphopt.passes_base import GraphPass, PassResult, register_pass
from graphopt.passes.cse import CommonSubexpressionElimination
from graphopt.passes.dce import DeadCodeElimination
from graphopt.passes.fold_batchnorm import FoldBatchNorm
from graphopt.passes.fold_constants import FoldConstants
from graphopt.passes.noop import RemoveNoOps


@register_pass
@dataclass(frozen=True)
class Fold(GraphPass):
    """Shorthand for noop,fold-bn,fold-const,cse,dce: the standard inference clean-up."""

    name: ClassVar[str] = "fold"
    tolerance: ClassVar[str] = "algebraic"

    def run(self, graph: Graph) -> PassResult:
        stats: dict[str, int] = {}
        changed = stale = False
        for p in (RemoveNoOps(), FoldBatchNorm(), FoldConstants(), CommonSubexpressionElimination(),
                  DeadCodeElimination()):
            if stale:  # the next sub-pass reads shape meta; after the last, the pass manager refreshes it
                graph.recompile()
            r = p.run(graph)
            stale = r.changed
            changed |= r.changed
            for k, v in r.stats.items():
                stats[f"{p.name}.{k}"] = v
        return PassResult(changed, stats)
