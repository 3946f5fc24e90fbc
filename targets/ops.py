"""Converters that replace TVM importer lowerings whose semantics differ from PyTorch's.

TVM lowers ``relu`` to ``max(x, 0)`` and clamps to ``min(max(x, lo), hi)``; LLVM compiles
those to maxnum/minnum, which return the *non*-NaN operand. PyTorch propagates NaN
(``relu(nan) == nan``), so a NaN input would silently turn into zeros. A compare-and-select
(``x < 0 ? 0 : x``) keeps NaN (every comparison with NaN is false) at the same cost.
"""

from __future__ import annotations

import math

import torch.fx as fx
from tvm import relax

from graphopt.targets.lower import register_converter


def _select_clamp(importer, node: fx.Node, lo: float | None, hi: float | None) -> relax.Expr:
    x = importer.env[node.args[0]]
    dtype = str(x.ty.dtype)
    out = x
    if lo is not None and not math.isinf(lo):
        c = relax.const(lo, dtype)
        out = importer.block_builder.emit(relax.op.where(relax.op.less(out, c), c, out))
    if hi is not None and not math.isinf(hi):
        c = relax.const(hi, dtype)
        out = importer.block_builder.emit(relax.op.where(relax.op.greater(out, c), c, out))
    return out


@register_converter("relu.default")
def relu(importer, node: fx.Node) -> relax.Expr:
    return _select_clamp(importer, node, 0.0, None)


@register_converter("hardtanh.default")
def hardtanh(importer, node: fx.Node) -> relax.Expr:
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    return _select_clamp(importer, node, float(lo), float(hi))


@register_converter("clamp.default")
def clamp(importer, node: fx.Node) -> relax.Expr:
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        return importer.importer_convert_map["clamp.default"](node)
    return _select_clamp(importer, node, None if lo is None else float(lo), None if hi is None else float(hi))


@register_converter("relu6.default")
def relu6(importer, node: fx.Node) -> relax.Expr:
    return _select_clamp(importer, node, 0.0, 6.0)
