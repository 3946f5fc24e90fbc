"""``cse``: common-subexpression elimination.

Two pure nodes calling the same op on the same inputs (same nodes, same literal
arguments) compute the same value: keep the first. ``get_attr`` nodes reading the same
tensor, or identical small constants, merge too. Nodes are visited in topological order,
so chains of duplicates collapse in one sweep. Exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from graphopt.graph import Graph
from graphopt.passes_base import GraphPass, PassResult, register_pass
from graphopt.passes.utils import is_pure

# Constants up to this size are compared by value (larger ones only by identity), so
# merging stays cheap on big models.
_VALUE_COMPARE_BYTES = 4096


def _key(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return ("node", a)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(_key(x) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in a.items())))
    if isinstance(a, float):
        return ("float", a, str(a))  # keeps 0.0 and -0.0 apart
    if isinstance(a, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return ("torch", str(a))
    return (type(a).__name__, a)


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(GraphPass):
    """Merge nodes that compute the same op on the same inputs."""

    name: ClassVar[str] = "cse"
    tolerance: ClassVar[str] = "exact"

    def run(self, graph: Graph) -> PassResult:
        merged = 0
        seen: dict[Any, fx.Node] = {}
        small_consts: list[fx.Node] = []
        for node in list(graph.nodes):
            if node.op == "get_attr":
                dup = self._same_constant(graph, node, small_consts)
                if dup is not None:
                    node.replace_all_uses_with(dup)
                    graph.fx_graph.erase_node(node)
                    merged += 1
                continue
            if not is_pure(node):
                continue
            key = (node.target, _key(node.args), _key(node.kwargs))
            try:
                first = seen.setdefault(key, node)
            except TypeError:  # an unhashable literal argument: leave the node alone
                continue
            if first is not node:
                node.replace_all_uses_with(first)
                graph.fx_graph.erase_node(node)
                merged += 1
        if merged:
            graph.prune_unused_constants()
        return PassResult(merged > 0, {"merged": merged})

    @staticmethod
    def _same_constant(graph: Graph, node: fx.Node, small: list[fx.Node]) -> fx.Node | None:
        t = graph.constant(node)
        for other in small:
            if other.target == node.target:
                return other
            o = graph.constant(other)
            if (t.numel() * t.element_size() <= _VALUE_COMPARE_BYTES and o.dtype == t.dtype
                    and o.shape == t.shape and torch.equal(o, t)):
                return other
        small.append(node)
        return None
