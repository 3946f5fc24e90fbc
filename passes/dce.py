"""``dce``: dead-code elimination.

Removes pure nodes whose value no one uses (walking backwards, so whole dead chains go
in one sweep) and the constants only they used. Exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphopt.graph import Graph
from graphopt.passes_base import GraphPass, PassResult, register_pass
from graphopt.passes.utils import is_pure


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(GraphPass):
    """Remove nodes whose results are never used, and constants nothing reads."""

    name: ClassVar[str] = "dce"
    tolerance: ClassVar[str] = "exact"

    def run(self, graph: Graph) -> PassResult:
        removed = 0
        for node in reversed(list(graph.nodes)):
            if node.op == "call_function" and not node.users and is_pure(node):
                graph.fx_graph.erase_node(node)
                removed += 1
        constants = graph.prune_unused_constants()
        return PassResult(bool(removed or constants), {"nodes": removed, "constants": constants})
