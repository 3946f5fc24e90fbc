"""Lowering the QDQ graph form (passes/quantize/insert_qdq.py) to integer compute in Relax.

Every conv2d / linear / matmul whose operands are ``dequantize(int8)`` becomes::

    acc  = conv2d(x_q, W_q, out_dtype="int32")        # int8 x int8 -> int32 accumulate
    acc  = acc + B_q                                   # bias in int32 (zero-point term folded in)
    y    = float(acc) * (s_x * s_w[c])                 # requantize epilogue

with ``W_q`` an int8 constant, ``B_q[c] = round(b[c] / (s_x s_w[c])) - zp_x * sum(W_q[c])``
(an asymmetric activation's zero point contributes ``zp_x * sum W`` per output channel, a
constant because weights are symmetric; conv padding is done explicitly with ``zp_x``,
the quantized zero, so the correction holds at the borders). When the next layer's
``quantize`` follows (directly or after relu/add), TVM's FuseOps puts it in the same
kernel's epilogue, so the kernel reads int8 and writes int8. After LegalizeOps the conv
and matmul PrimFuncs have int8 input buffers and an int32 reduction block
``C[...] += int32(A[...]) * int32(B[...])``: the form the CPU schedule rules (and a
VNNI/dot-product tensorizing rule) match.

Dynamic quantization (``*.tensor`` variants) computes ``s_x = max|x| / 127.5`` at run time;
its bias is added in float after the epilogue. A ``dequantize`` whose users are all
lowered to integer ops emits nothing: its users read the int8 value, so no float copy of
a weight ever reaches the compiled module. Anything else (a dequantize feeding a float op)
is lowered literally.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
from tvm import relax

from graphopt.qdq import IntegerOp, Operand, elided_dequantize, match_integer_op, operand
from graphopt.targets.frontend.lower import register_converter


def _int8_value(importer, x: Operand) -> relax.Expr:
    """The int8 Relax value of an activation operand, read through its dequantize node.

    An integer op's fx inputs are the dequantize nodes, not the int8 producers behind them;
    inside a fusion-group kernel (targets/frontend/lower.py) only the op's fx inputs are parameters,
    so reading the producer directly would reference a variable of ``main`` (FuseTIR then
    fails in MapArgsToBuffer). An elided dequantize's value *is* the int8 value.
    """
    if x.dequantize is not None and elided_dequantize(x.dequantize):
        return importer.env[x.dequantize]
    return importer.env[x.int8]


def _const(importer, node: fx.Node) -> np.ndarray:
    """The value of a get_attr node (lower.py turns each into a relax.Constant in env)."""
    return importer.env[node].value.numpy()


# ------------------------------------------------------------------------- relax helpers


def _emit(importer, expr):
    return importer.block_builder.emit(expr)


def _f32(value) -> relax.Constant:
    return relax.const(np.asarray(value, dtype="float32"))


def _scale_expr(importer, scale: Any) -> relax.Expr:
    if isinstance(scale, fx.Node):
        if scale.op == "get_attr":
            return _f32(_const(importer, scale))
        return _emit(importer, relax.op.astype(importer.env[scale], "float32"))
    return _f32(scale)


def _quantize(importer, x, scale: Any, zp: Any, qmin: int, qmax: int, dtype: torch.dtype) -> relax.Expr:
    inv = (relax.op.divide(_f32(1.0), _scale_expr(importer, scale)) if isinstance(scale, fx.Node)
           else _f32(1.0 / scale))
    y = relax.op.round(relax.op.multiply(x, inv))
    zp_e = _scale_expr(importer, zp) if isinstance(zp, fx.Node) else _f32(zp)
    y = relax.op.clip(relax.op.add(y, zp_e), qmin, qmax)
    return _emit(importer, relax.op.astype(y, _dtype(dtype)))


def _dtype(dtype: torch.dtype) -> str:
    return {torch.int8: "int8", torch.uint8: "uint8", torch.int32: "int32"}[dtype]


# ------------------------------------------------------------------- quantize / dequantize


@register_converter("quantize_per_tensor.default")
@register_converter("quantize_per_tensor.tensor")
def _convert_quantize(importer, node: fx.Node) -> relax.Expr:
    x, scale, zp, qmin, qmax, dtype = node.args[:6]
    return _quantize(importer, importer.env[x], scale, zp, qmin, qmax, dtype)


@register_converter("choose_qparams_symmetric.tensor")
def _convert_choose_qparams(importer, node: fx.Node) -> relax.Expr:
    # torch: scale = max(|min(x, 0)|, max(x, 0)) / ((qmax - qmin) / 2), at least eps; zp = 0
    x, qmin, qmax, eps, _dtype_ = node.args[:5]
    x = importer.env[x]
    amax = relax.op.maximum(relax.op.negative(relax.op.min(x)), relax.op.max(x))
    scale = relax.op.maximum(relax.op.divide(amax, _f32((qmax - qmin) / 2)), _f32(eps))
    scale = _emit(importer, relax.op.reshape(scale, (1,)))
    zp = relax.const(np.zeros((1,), dtype="int64"))
    return relax.Tuple([scale, zp])


@register_converter("dequantize_per_tensor.default")
@register_converter("dequantize_per_tensor.tensor")
@register_converter("dequantize_per_channel.default")
def _convert_dequantize(importer, node: fx.Node) -> relax.Expr:
    if elided_dequantize(node):
        return importer.env[node.args[0]]  # consumers read the int8 value directly
    op = operand(node)
    if op is None:
        raise NotImplementedError(f"dequantize {node.format_node()}")
    x = relax.op.astype(importer.env[op.int8], "float32")
    scale = _scale_expr(importer, op.scale)
    zp = _scale_expr(importer, op.zero_point) if isinstance(op.zero_point, fx.Node) else _f32(op.zero_point)
    if op.axis is not None:
        shape = [1] * len(node.meta["val"].shape)
        shape[op.axis] = -1
        scale, zp = relax.op.reshape(scale, shape), relax.op.reshape(zp, shape)
    return _emit(importer, relax.op.multiply(relax.op.subtract(x, zp), scale))


# ------------------------------------------------------------------------ integer ops


def _base_converter(importer, node: fx.Node):
    base = getattr(importer, "importer_convert_map", None)
    if base is None:
        base = importer.__dict__.setdefault("_graphopt_base_map", importer.create_convert_map())
    return base[node.target.__name__](node)


def _weight_scale(importer, w: Operand, channels: int) -> np.ndarray:
    s = _const(importer, w.scale) if isinstance(w.scale, fx.Node) else np.asarray(w.scale)
    return np.broadcast_to(s.astype("float64").reshape(-1), (channels,))


@register_converter("conv2d.default")
@register_converter("linear.default")
@register_converter("mm.default")
@register_converter("matmul.default")
@register_converter("bmm.default")
def _convert_integer_op(importer, node: fx.Node) -> relax.Expr:
    op = match_integer_op(node)
    if op is None:
        return _base_converter(importer, node)
    if op.w.int8.op != "get_attr":
        return _activation_matmul(importer, op)
    xq = _int8_value(importer, op.x)
    wq = _const(importer, op.w.int8)
    channel_axis = {"conv": 0, "linear": 0, "matmul": 1}[op.kind]
    channels = wq.shape[channel_axis]
    s_w = _weight_scale(importer, op.w, channels)
    w_sum = wq.astype("int64").sum(axis=tuple(d for d in range(wq.ndim) if d != channel_axis))
    dynamic = isinstance(op.x.scale, fx.Node)
    zp_x = 0 if dynamic else int(op.x.zero_point)

    if op.kind == "conv":
        stride, padding, dilation, groups = (list(node.args[3:4]) or [[1, 1]])[0], \
            (list(node.args[4:5]) or [[0, 0]])[0], (list(node.args[5:6]) or [[1, 1]])[0], \
            (list(node.args[6:7]) or [1])[0]
        padding = _pair(padding)
        if zp_x != 0 and any(padding):
            # pad with the quantized zero, so the zero-point correction holds at the borders
            xq = _emit(importer, relax.op.nn.pad(xq, [0, 0, 0, 0, padding[0], padding[0], padding[1], padding[1]],
                                                 pad_value=float(zp_x)))
            padding = [0, 0]
        acc = relax.op.nn.conv2d(xq, relax.const(wq), strides=_pair(stride), padding=padding,
                                 dilation=_pair(dilation), groups=int(groups), out_dtype="int32")
        bshape = [1, channels, 1, 1]
    elif op.kind == "linear":
        # matmul on the transposed constant rather than relax linear (= matmul(x,
        # permute_dims(W))): the weight stays a constant operand, which is what the int8
        # dot-product packing (targets/cpu/schedules/int8.py) recognizes
        acc = relax.op.matmul(xq, relax.const(np.ascontiguousarray(wq.T)), out_dtype="int32")
        bshape = [channels]
    else:
        acc = relax.op.matmul(xq, relax.const(wq), out_dtype="int32")
        bshape = [channels]
    acc = _emit(importer, acc)
    bias = _const(importer, op.bias).astype("float64") if op.bias is not None else None

    if dynamic:
        s_x = _scale_expr(importer, op.x.scale)
        scale = relax.op.multiply(s_x, _f32(s_w.reshape(bshape)))
        out = relax.op.multiply(relax.op.astype(acc, "float32"), scale)
        if bias is not None:
            out = relax.op.add(out, _f32(bias.reshape(bshape)))
        return _emit(importer, out)

    s_x = float(op.x.scale)
    s_out = s_x * s_w
    b_q = np.zeros(channels, dtype="int64") if bias is None else np.round(bias / s_out).astype("int64")
    b_q = b_q - zp_x * w_sum
    if np.any(b_q):
        b_q = np.clip(b_q, np.iinfo("int32").min, np.iinfo("int32").max).astype("int32")
        acc = _emit(importer, relax.op.add(acc, relax.const(b_q.reshape(bshape))))
    return _emit(importer, relax.op.multiply(relax.op.astype(acc, "float32"), _f32(s_out.reshape(bshape))))


def _activation_matmul(importer, op: IntegerOp) -> relax.Expr:
    """int8 activation x int8 activation (both symmetric): matmul to int32, scale by s_a * s_b."""
    acc = _emit(importer, relax.op.matmul(_int8_value(importer, op.x), _int8_value(importer, op.w),
                                          out_dtype="int32"))
    scale = relax.op.multiply(_scale_expr(importer, op.x.scale), _scale_expr(importer, op.w.scale))
    return _emit(importer, relax.op.multiply(relax.op.astype(acc, "float32"), scale))


def _pair(v: Any) -> list[int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(x) for x in (v * 2 if len(v) == 1 else v)]
