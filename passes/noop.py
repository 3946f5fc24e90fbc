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
from graphopt.rewrite import ERASE, Rewrite, counter_stats, rewrite_fx
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


def _unary(node: fx.Node) -> fx.Node | None:
    """The tensor input of a call whose first argument is a node."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0]


def _copy(node: fx.Node) -> fx.Node | None:
    src = _unary(node)
    if src is None or not is_op(node, *_COPIES, aten.dropout) or not _same_type(node, src):
        return None
    if is_op(node, aten.dropout) and len(node.args) > 2 and node.args[2]:
        return None  # dropout in training mode is random, not a no-op
    if not _keeps_layout(node, src):
        return None  # a copy into another memory format: views after it rely on the new strides
    return src


def _same_shape(*ops):
    def match(node: fx.Node) -> fx.Node | None:
        src = _unary(node)
        return src if src is not None and is_op(node, *ops) and _same_type(node, src) else None
    return match


def _identity_permute(node: fx.Node) -> fx.Node | None:
    src = _unary(node)
    if src is not None and is_op(node, aten.permute) and list(node.args[1]) == list(range(len(node.args[1]))):
        return src
    return None


def _same_dtype_cast(node: fx.Node) -> fx.Node | None:
    src = _unary(node)
    if src is not None and is_op(node, aten._to_copy, aten.to) and _same_type(node, src) \
            and not node.kwargs.get("memory_format"):
        return src
    return None


def _neutral(ops, element):
    """``op(x, element)`` with a neutral scalar (and alpha 1 for add/sub)."""
    def match(node: fx.Node) -> fx.Node | None:
        src = _unary(node)
        if src is None or not is_op(node, *ops) or not _same_type(node, src) or len(node.args) < 2:
            return None
        other = node.args[1]
        if isinstance(other, fx.Node) or other != element or node.kwargs.get("alpha", 1) != 1:
            return None
        return src
    return match


def _unused_runtime_assertion(node: fx.Node) -> bool | None:
    # export's re-checks of dtypes/shapes that the graph's meta already fixes
    return True if node.op == "call_function" and node.target in RUNTIME_ASSERTIONS and not node.users else None


def _forward(node: fx.Node, src: fx.Node) -> fx.Node:
    return src


# pattern -> replacement: every rule replaces an op by the input it passes through unchanged.
NOOP_REWRITES = (
    Rewrite("runtime-assertion", _unused_runtime_assertion, lambda node, _: ERASE),
    Rewrite("copy", _copy, _forward, "clone/alias/detach/contiguous/eval dropout of the same type"),
    Rewrite("same-shape-view", _same_shape(*_RESHAPES), _forward, "view/reshape/expand/... to the same shape"),
    Rewrite("identity-permute", _identity_permute, _forward),
    Rewrite("same-dtype-cast", _same_dtype_cast, _forward),
    Rewrite("full-slice", _same_shape(aten.slice), _forward),
    Rewrite("times-one", _neutral((aten.mul, aten.div), 1), _forward, "x * 1, x / 1"),
    Rewrite("plus-zero", _neutral((aten.add, aten.sub), 0), _forward, "x + 0, x - 0"),
)


@register_pass
@dataclass(frozen=True)
class RemoveNoOps(GraphPass):
    """Remove dropout (eval), identity, same-shape views/casts and other ops that return their input."""

    name: ClassVar[str] = "noop"
    tolerance: ClassVar[str] = "exact"

    def run(self, graph: Graph) -> PassResult:
        outputs = set(graph.output_values())

        def distinct_outputs(node: fx.Node) -> bool:
            # a graph output that forwards an input that is itself an output stays: two distinct outputs
            src = _unary(node)
            return not (node in outputs and src is not None and src.op == "placeholder" and src in outputs)

        candidates = [n for n in graph.nodes if distinct_outputs(n)]
        counts = rewrite_fx(graph.fx_graph, NOOP_REWRITES, candidates)
        removed = sum(counts.values())
        return PassResult(removed > 0, {"removed": removed, **counter_stats(counts)})
