"""Converters that fix TVM importer lowerings whose semantics differ from PyTorch's.

They are registered with ``fixes_importer=True``, so they replace the importer's own entry
in the base map every other converter (e.g. the integer ones) falls back to.

TVM lowers ``relu`` to ``max(x, 0)`` and clamps to ``min(max(x, lo), hi)``; LLVM compiles
those to maxnum/minnum, which return the *non*-NaN operand. PyTorch propagates NaN
(``relu(nan) == nan``), so a NaN input would silently turn into zeros. A compare-and-select
(``x < 0 ? 0 : x``) keeps NaN (every comparison with NaN is false) at the same cost.
The max reduction of ``max_pool2d`` has the same flaw; it is rebuilt in TE with a
NaN-propagating combiner (one PrimFunc, one reduction, like topi's pool).
"""

from __future__ import annotations

import math

import torch.fx as fx
from tvm import relax, te, tirx, topi

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


@register_converter("relu.default", fixes_importer=True)
def relu(importer, node: fx.Node) -> relax.Expr:
    return _select_clamp(importer, node, 0.0, None)


@register_converter("hardtanh.default", fixes_importer=True)
def hardtanh(importer, node: fx.Node) -> relax.Expr:
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    return _select_clamp(importer, node, float(lo), float(hi))


@register_converter("clamp.default", fixes_importer=True)
def clamp(importer, node: fx.Node) -> relax.Expr:
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        return importer.tvm_convert_map["clamp.default"](node)
    return _select_clamp(importer, node, None if lo is None else float(lo), None if hi is None else float(hi))


@register_converter("relu6.default", fixes_importer=True)
def relu6(importer, node: fx.Node) -> relax.Expr:
    return _select_clamp(importer, node, 0.0, 6.0)


def _nan_max(a, b):
    """max that returns NaN when either side is NaN (``a != a`` would be simplified away)."""
    return tirx.Select(tirx.Or(a > b, tirx.isnan(a)), a, b)


_nan_max_reducer = te.comm_reducer(_nan_max, lambda dtype: tirx.const(-math.inf, dtype), name="nan_max")


def _pair(v) -> list[int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(d) for d in (v * 2 if len(v) == 1 else v)]


@register_converter("max_pool2d.default", fixes_importer=True)
def max_pool2d(importer, node: fx.Node) -> relax.Expr:
    """Max pooling that returns NaN for a window holding a NaN, like PyTorch.

    TVM's pool reduces with ``max``, which LLVM compiles to maxnum: a NaN in the window is
    dropped. This is the same pool written in TE with a NaN-propagating combiner
    (``a > b or a is NaN ? a : b``): still one PrimFunc with one reduction block over the
    (-inf padded) input, so it is one kernel in every fusion mode and the CPU pooling
    schedule (targets/schedules/pooling.py) matches it like topi's pool. The output size
    (ceil_mode included) is the one torch computed for the node.
    """
    args = importer.retrieve_args(node)
    x = args[0]
    out_val = node.meta.get("val")
    spatial_out = list(out_val.shape[-2:]) if out_val is not None else []
    if not str(x.ty.dtype).startswith(("float", "bfloat")) or not all(isinstance(d, int) for d in spatial_out):
        return importer.tvm_convert_map["max_pool2d.default"](node)  # integers have no NaN
    kernel = _pair(args[1])
    stride = _pair(args[2]) if len(args) > 2 and args[2] else kernel
    padding = _pair(args[3]) if len(args) > 3 else [0, 0]
    dilation = _pair(args[4]) if len(args) > 4 else [1, 1]

    def compute(data: te.Tensor) -> te.Tensor:
        rank = len(data.shape)
        lead = rank - 2
        after = [0] * lead
        for d in range(2):  # right padding so the last (ceil_mode) window stays in bounds
            need = (spatial_out[d] - 1) * stride[d] + dilation[d] * (kernel[d] - 1) + 1
            after.append(max(0, need - int(data.shape[lead + d]) - padding[d]))
        if any(padding) or any(after):
            data = topi.nn.pad(data, [0] * lead + padding, after, pad_value=-math.inf)
        rh, rw = te.reduce_axis((0, kernel[0]), "rh"), te.reduce_axis((0, kernel[1]), "rw")

        def window_max(*idx):
            h = idx[lead] * stride[0] + rh * dilation[0]
            w = idx[lead + 1] * stride[1] + rw * dilation[1]
            return _nan_max_reducer(data[(*idx[:lead], h, w)], axis=[rh, rw])

        shape = [*data.shape[:lead], *spatial_out]
        return te.compute(shape, window_max, name="pool_max")

    return importer.block_builder.emit_te(compute, x, primfunc_name_hint="max_pool2d")


_HALF = ("float16", "bfloat16")


@register_converter("conv2d.default", fixes_importer=True)
def conv2d_any_float(importer, node: fx.Node) -> relax.Expr:
    """conv2d for fp32, fp16 and bf16 inputs.

    TVM's importer hard-codes ``out_dtype="float32"`` and then adds the bias in the input's
    dtype, which fails for half inputs. PyTorch's half conv accumulates in fp32 and returns
    the input dtype, so: conv accumulating in fp32, fp32 bias, one cast back.
    """
    args = importer.retrieve_args(node)
    x = args[0]
    dtype = str(x.ty.dtype)
    if dtype not in _HALF:
        return importer.tvm_convert_map["conv2d.default"](node)
    bias = args[2] if len(args) > 2 else None
    out = importer._conv2d_impl(x, args[1], None, args[3] if len(args) > 3 else 1, args[4] if len(args) > 4 else 0,
                                args[5] if len(args) > 5 else 1, args[6] if len(args) > 6 else 1)
    bb = importer.block_builder
    if bias is not None:
        b = bb.emit(relax.op.astype(bias, "float32"))
        b = bb.emit(relax.op.reshape(b, (1, -1, 1, 1)))
        out = bb.emit(relax.op.add(out, b))
    return bb.emit(relax.op.astype(out, dtype))


@register_converter("linear.default", fixes_importer=True)
def linear_any_float(importer, node: fx.Node) -> relax.Expr:
    """linear for fp32, fp16 and bf16 inputs: the importer hard-codes a float32 result."""
    args = importer.retrieve_args(node)
    dtype = str(args[0].ty.dtype)
    if dtype not in _HALF:
        return importer.tvm_convert_map["linear.default"](node)
    bias = args[2] if len(args) > 2 else None
    return importer.block_builder.emit(relax.op.linear(args[0], args[1], bias, dtype))
