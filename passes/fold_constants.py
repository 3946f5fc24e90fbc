"""``fold-const``: evaluate subgraphs whose inputs are all constants, once, at compile time.

A node is foldable when it is pure and every tensor it reads is a constant (a
``get_attr``, or a node already folded). The value comes from running the very ATen op
eagerly — the reference semantics — so folding is bit-exact. Results larger than
``max_bytes`` are left alone: folding an ``expand`` of a scalar into a huge tensor would
trade a cheap op for a large constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.graph import Graph
from graphopt.passes_base import GraphPass, PassResult, option, register_pass
from graphopt.passes.dce import remove_dead_code
from graphopt.passes.utils import is_pure


@register_pass
@dataclass(frozen=True)
class FoldConstants(GraphPass):
    """Evaluate subgraphs with only constant inputs once and store the results as constants."""

    name: ClassVar[str] = "fold-const"
    tolerance: ClassVar[str] = "exact"
    max_bytes: int = option(64 * 2**20, "largest constant a fold may create", range=(0, 2**40, "[]"))

    def run(self, graph: Graph) -> PassResult:
        values: dict[fx.Node, object] = {}
        folded = 0
        for node in list(graph.nodes):
            if node.op == "get_attr":
                values[node] = graph.constant(node)
                continue
            if not is_pure(node) or not node.all_input_nodes:
                continue
            if not all(a in values for a in node.all_input_nodes):
                continue
            args = torch.fx.node.map_arg(node.args, lambda a: values[a])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: values[a])
            with torch.no_grad():
                result = node.target(*args, **kwargs)
            values[node] = result
            if not isinstance(result, torch.Tensor):
                continue  # tuples (e.g. from split) are folded through their getitem users
            if result.numel() * result.element_size() > self.max_bytes:
                continue
            const = graph.add_constant(result, f"folded_{node.name}", before=node, keep_strides=True)
            values[const] = graph.constant(const)
            node.replace_all_uses_with(const)
            folded += 1
        if folded:
            remove_dead_code(graph)
        return PassResult(folded > 0, {"folded": folded})
