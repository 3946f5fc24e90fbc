"""``dce``: dead-code elimination.

Removes pure nodes whose value no one uses and the constants only they used. A worklist
revisits the inputs of every removed node, so whole dead chains go in one run whatever
their order in the node list. Exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphopt.graph import Graph
from graphopt.passes_base import GraphPass, PassResult, register_pass
from graphopt.passes.utils import is_pure


def remove_dead_code(graph: Graph) -> tuple[int, int]:
    """Erase pure nodes nobody uses, then constants nothing reads: (nodes, constants) removed."""
    removed = 0
    worklist = list(reversed(list(graph.nodes)))
    while worklist:
        node = worklist.pop()
        if node.graph is None or node.op != "call_function" or node.users or not is_pure(node):
            continue
        inputs = node.all_input_nodes
        graph.fx_graph.erase_node(node)
        node.graph = None  # mark erased: the worklist may still hold it
        removed += 1
        worklist.extend(inputs)
    return removed, graph.prune_unused_constants()


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(GraphPass):
    """Remove nodes whose results are never used, and constants nothing reads."""

    name: ClassVar[str] = "dce"
    tolerance: ClassVar[str] = "exact"

    def run(self, graph: Graph) -> PassResult:
        removed, constants = remove_dead_code(graph)
        return PassResult(bool(removed or constants), {"nodes": removed, "constants": constants})
