"""What quantize/dequantize (QDQ) nodes are to fusion and to the integer lowering.

The quantized graph (passes/quantize/insert_qdq.py) wraps each conv2d / linear / matmul operand
in ``dequantize(int8)``. The TVM backend (targets/frontend/quantized.py) runs such an op as one
integer kernel that reads the int8 values directly, so a dequantize whose every user is
lowered that way emits nothing: to fusion it is a view, not a kernel (it joins no group
and is counted as no kernel). A ``quantize`` is an elementwise op (float -> int8), so it
fuses into its producer's epilogue and that kernel writes int8.

:func:`match_integer_op` is the single definition of "lowered as an integer op" that both
the ``fuse`` pass and the lowering use; it is pure fx (no TVM), so fusion can ask it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed
import torch.fx as fx

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten

_DQ_TENSOR = (qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor)
DEQUANTIZE = {*_DQ_TENSOR, qd.dequantize_per_channel.default}
QUANTIZE = {qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor}


@dataclass
class Operand:
    """One int8 operand of an integer op: the node holding int8 values and its parameters."""

    int8: fx.Node
    scale: Any  # float, np.ndarray (per channel) or fx.Node (run-time scale)
    zero_point: Any  # int, or fx.Node (run time; always 0 for our symmetric dynamic mode)
    axis: int | None = None  # per-channel axis of a weight
    dequantize: fx.Node | None = None  # the dequantize node the op reads this operand through


def operand(node: Any) -> Operand | None:
    """``node`` as an int8 operand when it is a dequantize of int8 values, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target in _DQ_TENSOR:
        x, scale, zp, _qmin, _qmax, dtype = node.args[:6]
        return Operand(x, scale, zp, dequantize=node) if dtype == torch.int8 else None
    if node.target is qd.dequantize_per_channel.default:
        x, scale, zp, axis, _qmin, _qmax, dtype = node.args[:7]
        if dtype != torch.int8 or x.op != "get_attr" or scale.op != "get_attr":
            return None
        return Operand(x, scale, zp, axis, dequantize=node)
    return None


@dataclass
class IntegerOp:
    node: fx.Node
    kind: str
    x: Operand
    w: Operand
    bias: fx.Node | None


def match_integer_op(node: fx.Node) -> IntegerOp | None:
    """The integer form of ``node`` when it is a QDQ-wrapped conv2d/linear/matmul, else None."""
    if node.op != "call_function":
        return None
    if node.target is aten.conv2d.default:
        kind = "conv"
    elif node.target is aten.linear.default:
        kind = "linear"
    elif node.target in (aten.mm.default, aten.matmul.default, aten.bmm.default):
        kind = "matmul"
    else:
        return None
    x, w = operand(node.args[0]), operand(node.args[1])
    if x is None or w is None or x.axis is not None:
        return None
    bias = node.args[2] if kind != "matmul" and len(node.args) > 2 else None
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
        return None
    w_is_const = w.int8.op == "get_attr"
    if w_is_const:
        expected_axis = {"conv": 0, "linear": 0, "matmul": 1}[kind]
        if w.axis is not None and w.axis != expected_axis:
            return None
    elif not (_is_zero(x.zero_point) and _is_zero(w.zero_point)):
        return None  # activation x activation products are lowered symmetric only
    if isinstance(x.zero_point, fx.Node) and bias is not None and not _dynamic_ok(x):
        return None
    return IntegerOp(node, kind, x, w, bias)


def elided_dequantize(node: fx.Node) -> bool:
    """Whether ``node`` is a dequantize the lowering drops: every user reads its int8 input."""
    return (node.op == "call_function" and node.target in DEQUANTIZE and bool(node.users)
            and all(match_integer_op(u) is not None for u in node.users))


def _is_zero(zp: Any) -> bool:
    return isinstance(zp, int) and zp == 0 or isinstance(zp, fx.Node) and _is_dynamic_zp(zp)


def _is_dynamic_zp(zp: fx.Node) -> bool:
    # getitem(choose_qparams_symmetric(...), 1): zero by construction
    src = zp.args[0] if zp.op == "call_function" and zp.args else None
    return isinstance(src, fx.Node) and src.target is qd.choose_qparams_symmetric.tensor


def _dynamic_ok(x: Operand) -> bool:
    return isinstance(x.zero_point, fx.Node) and _is_dynamic_zp(x.zero_point)
