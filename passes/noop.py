"""``noop``: remove operations that return their input unchanged.

In an inference graph these come from training-only layers and framework plumbing:
dropout in eval mode (captured as ``clone``), ``nn.Identity``, ``contiguous``/``clone``,
views and reshapes to the same shape, identity permutes, casts to the same dtype,
full-range slices, and arithmetic with the neutral element (``x * 1``, ``x + 0``,
``x / 1``). Every removal is exact: the outputs stay bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.capture import RUNTIME_ASSERTIONS
from graphopt.graph import Graph
from graphopt.passes_base import GraphPass, PassResult, register_pass
from graphopt.passes.utils import aten, is_op

_COPIES = (aten.clone, aten.alias, aten.detach, aten.lift_fresh_copy, aten.contiguous)
_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.flatten, aten.squeeze, aten.unsqueeze)


def _same_type(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return (va is not None and vb is not None and hasattr(va, "shape") and hasattr(vb, "shape")
            and tuple(va.shape) == tuple(vb.shape) and va.dtype == vb.dtype)


def _keeps_layout(node: fx.Node, src: fx.Node) -> bool:
    """A copy with ``memory_format`` is a no-op only when ``src`` already has that layout
    (export writes ``flatten`` of a permuted tensor as ``clone(contiguous) -> _unsafe_view``;
    fuzz seeds 135 and 139)."""
    fmt = node.kwargs.get("memory_format")
    if fmt is None or fmt == torch.preserve_format:
        return True
    val = src.meta.get("val")
    try:
        return bool(val.is_contiguous(memory_format=fmt))
    except Exception:  # undecidable symbolic strides, or no meta: keep the copy
        return False


def forwarded_input(node: fx.Node) -> fx.Node | None:
    """The input ``node`` passes through unchanged, or None if it does real work."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if is_op(node, *_COPIES, aten.dropout) and _same_type(node, src):
        if is_op(node, aten.dropout) and (len(node.args) > 2 and node.args[2]):
            return None  # dropout in training mode is random, not a no-op
        if not _keeps_layout(node, src):
            return None  # a copy into another memory format: views after it rely on the new strides
        return src
    if is_op(node, *_RESHAPES) and _same_type(node, src):
        return src
    if is_op(node, aten.permute) and list(node.args[1]) == list(range(len(node.args[1]))):
        return src
    if is_op(node, aten._to_copy, aten.to) and _same_type(node, src) and not node.kwargs.get("memory_format"):
        return src
    if is_op(node, aten.slice) and _same_type(node, src):
        return src
    if _same_type(node, src) and len(node.args) >= 2 and not isinstance(node.args[1], fx.Node):
        neutral = node.args[1]
        alpha = node.kwargs.get("alpha", 1)
        if is_op(node, aten.mul, aten.div) and neutral == 1:
            return src
        if is_op(node, aten.add, aten.sub) and neutral == 0 and alpha == 1:
            return src
    return None


@register_pass
@dataclass(frozen=True)
class RemoveNoOps(GraphPass):
    """Remove dropout (eval), identity, same-shape views/casts and other ops that return their input."""

    name: ClassVar[str] = "noop"
    tolerance: ClassVar[str] = "exact"

    def run(self, graph: Graph) -> PassResult:
        removed = 0
        outputs = set(graph.output_values())
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in RUNTIME_ASSERTIONS and not node.users:
                # export's re-checks of dtypes/shapes that the graph's meta already fixes
                graph.fx_graph.erase_node(node)
                removed += 1
                continue
            src = forwarded_input(node)
            if src is None:
                continue
            if node in outputs and src.op == "placeholder" and src in outputs:
                continue  # keep distinct outputs distinct
            node.replace_all_uses_with(src)
            graph.fx_graph.erase_node(node)
            removed += 1
        return PassResult(removed > 0, {"removed": removed})
