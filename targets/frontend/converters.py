"""Converters that fix TVM importer lowerings whose semantics differ from PyTorch's.

They are registered with ``fixes_importer=True``, so they replace the importer's own entry
in the base map every other converter (e.g. the integer ones) falls back to.

TVM lowers ``relu`` to ``max(x, 0)`` and clamps to ``min(max(x, lo), hi)``; LLVM compiles
those to maxnum/minnum, which return the *non*-NaN operand. PyTorch propagates NaN
(``relu(nan) == nan``), so a NaN input would silently turn into zeros. A compare-and-select
(``x < lo ? lo : x``) keeps NaN (every comparison with NaN is false). Float clamps are one TE
kernel of such selects on the scalar values, which LLVM compiles to x86's ``maxps lo, x`` /
``minps hi, x`` (exactly those semantics, one instruction each).  Written as Relax
``where(less(x, lo), lo, x)`` (still the form for integer clamps) the comparison went through
a bool tensor and the bound through a buffer, and compiled to a compare and a masked move per
bound (mobilenet_v2's 16 -> 96 + depthwise kernel: 2125 instructions then, 1585 now; timed
alone its small-K conv kernels are 0-5% faster, within this host's noise).
``clamp_min``/``clamp_max`` get the same treatment, and ``maximum``/``minimum`` (and their
``max.other``/``min.other`` spellings) become ``a > b or isnan(a) ? a : b``.
The max reductions of ``max_pool1d/2d/3d`` (and ``*_with_indices``) and the full ``max``/``min``
reductions have the same flaw; each is rebuilt in TE with a NaN-propagating combiner (one
PrimFunc, one reduction, like topi's pool). The adaptive max pools, which the importer lacks,
are written the same way. Pool *indices* are not computed: TVM's importer returns float zeros
for them, so a graph that reads them is an UnsupportedOpError instead of a wrong answer.
"""

from __future__ import annotations

import functools
import math
import operator

import torch.fx as fx
from tvm import relax, te, tirx, topi

from graphopt.errors import UnsupportedOpError
from graphopt.targets.frontend.lower import register_converter


def _select_clamp(importer, node: fx.Node, lo: float | None, hi: float | None) -> relax.Expr:
    x = importer.env[node.args[0]]
    dtype = str(x.ty.dtype)
    lo = None if lo is None or math.isinf(lo) else lo
    hi = None if hi is None or math.isinf(hi) else hi
    if "float" in dtype and (lo is not None or hi is not None):
        def clamp(t):
            def value(*i):
                v = t(*i)
                if lo is not None:  # NaN fails both comparisons and stays (module doc)
                    c = tirx.const(lo, dtype)
                    v = tirx.Select(c > v, c, v)
                if hi is not None:
                    c = tirx.const(hi, dtype)
                    v = tirx.Select(c < v, c, v)
                return v
            return te.compute(t.shape, value, name="clamp")
        return importer.block_builder.emit_te(clamp, x)
    out = x
    if lo is not None:
        c = relax.const(lo, dtype)
        out = importer.block_builder.emit(relax.op.where(relax.op.less(out, c), c, out))
    if hi is not None:
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


@register_converter("clamp_min.default", fixes_importer=True)
def clamp_min(importer, node: fx.Node) -> relax.Expr:
    if isinstance(node.args[1], fx.Node):
        return importer.tvm_convert_map["clamp_min.default"](node)
    return _select_clamp(importer, node, float(node.args[1]), None)


@register_converter("clamp_max.default", fixes_importer=True)
def clamp_max(importer, node: fx.Node) -> relax.Expr:
    if isinstance(node.args[1], fx.Node):
        return importer.tvm_convert_map["clamp_max.default"](node)
    return _select_clamp(importer, node, None, float(node.args[1]))


def _nan_select(importer, node: fx.Node, pick_first, name: str) -> relax.Expr:
    """Elementwise max/min as ``pick_first(a, b) or a is NaN ? a : b``: NaN on either side wins."""
    a, b = importer.retrieve_args(node)[:2]
    if not (isinstance(a, relax.Expr) and isinstance(b, relax.Expr)) or str(a.ty.dtype) != str(b.ty.dtype) \
            or not str(a.ty.dtype).startswith(("float", "bfloat")):
        return importer.tvm_convert_map[name](node)
    bb = importer.block_builder
    first = bb.emit(relax.op.logical_or(pick_first(a, b), relax.op.isnan(a)))
    return bb.emit(relax.op.where(first, a, b))


# op -> which operand a NaN-propagating select keeps when neither is NaN
for _name, _pick_first in (("maximum.default", relax.op.greater), ("minimum.default", relax.op.less),
                           ("max.other", relax.op.greater), ("min.other", relax.op.less)):
    register_converter(_name, fixes_importer=True)(
        functools.partial(_nan_select, pick_first=_pick_first, name=_name))


@register_converter("relu6.default", fixes_importer=True)
def relu6(importer, node: fx.Node) -> relax.Expr:
    return _select_clamp(importer, node, 0.0, 6.0)


def _nan_max(a, b):
    """max that returns NaN when either side is NaN (``a != a`` would be simplified away)."""
    return tirx.Select(tirx.Or(a > b, tirx.isnan(a)), a, b)


def _nan_min(a, b):
    return tirx.Select(tirx.Or(a < b, tirx.isnan(a)), a, b)


_nan_max_reducer = te.comm_reducer(_nan_max, lambda dtype: tirx.const(-math.inf, dtype), name="nan_max")
_nan_min_reducer = te.comm_reducer(_nan_min, lambda dtype: tirx.const(math.inf, dtype), name="nan_min")


def _nan_reduce_all(importer, node: fx.Node, reducer, name: str) -> relax.Expr:
    """``max(x)`` / ``min(x)`` over every element, NaN if any element is NaN (TVM's reduce drops it)."""
    x = importer.retrieve_args(node)[0]
    shape = list(x.ty.shape.values) if x.ty.shape is not None else None
    if not str(x.ty.dtype).startswith(("float", "bfloat")) or shape is None \
            or not all(isinstance(d, tirx.IntImm) for d in shape) or not shape:
        return importer.tvm_convert_map[f"{name}.default"](node)

    def compute(data: te.Tensor) -> te.Tensor:
        axes = [te.reduce_axis((0, int(d)), f"k{i}") for i, d in enumerate(shape)]
        return te.compute((), lambda: reducer(data[tuple(axes)], axis=axes), name=f"{name}_all")

    return importer.block_builder.emit_te(compute, x, primfunc_name_hint=f"{name}_all")


@register_converter("max.default", fixes_importer=True)
def max_all(importer, node: fx.Node) -> relax.Expr:
    return _nan_reduce_all(importer, node, _nan_max_reducer, "max")


@register_converter("min.default", fixes_importer=True)
def min_all(importer, node: fx.Node) -> relax.Expr:
    return _nan_reduce_all(importer, node, _nan_min_reducer, "min")


def _ints(v, n: int) -> list[int]:
    """A pooling argument (an int or a list of 1 or ``n`` ints) as ``n`` ints."""
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(d) for d in (v * n if len(v) == 1 else v)]


def _static_spatial_out(node: fx.Node, x: relax.Expr, nd: int) -> list[int] | None:
    """The node's output size in its last ``nd`` dims (the one torch computed, ceil_mode included), or None
    when the NaN-propagating form does not apply (integer input: no NaN; symbolic sizes)."""
    out_val = node.meta.get("val")
    if isinstance(out_val, (tuple, list)):  # adaptive pools return (values, indices)
        out_val = out_val[0]
    if out_val is None or not str(x.ty.dtype).startswith(("float", "bfloat")):
        return None
    spatial_out = list(out_val.shape[-nd:])
    in_shape = list(x.ty.shape.values)[-nd:]
    if not all(isinstance(d, int) for d in spatial_out) or not all(isinstance(d, tirx.IntImm) for d in in_shape):
        return None
    return [int(d) for d in spatial_out]


def _max_pool_nd(importer, node: fx.Node, nd: int) -> relax.Expr:
    """Max pooling over the last ``nd`` dims that returns NaN for a window holding a NaN, like PyTorch.

    TVM's pools reduce with ``max``, which LLVM compiles to maxnum: a NaN in the window is dropped. This is
    the same pool written in TE with a NaN-propagating combiner (``a > b or a is NaN ? a : b``): still one
    PrimFunc with one reduction block over the (-inf padded) input, so it is one kernel in every fusion mode
    and, for 2-d pools, the CPU pooling schedule (targets/cpu/schedules/pooling.py) matches it like topi's pool.
    """
    name = f"max_pool{nd}d.default"
    args = importer.retrieve_args(node)
    x = args[0]
    spatial_out = _static_spatial_out(node, x, nd)
    if spatial_out is None:
        return importer.tvm_convert_map[name](node)
    kernel = _ints(args[1], nd)
    stride = _ints(args[2], nd) if len(args) > 2 and args[2] else kernel
    padding = _ints(args[3], nd) if len(args) > 3 else [0] * nd
    dilation = _ints(args[4], nd) if len(args) > 4 else [1] * nd

    def compute(data: te.Tensor) -> te.Tensor:
        lead = len(data.shape) - nd
        after = [0] * lead
        for d in range(nd):  # right padding so the last (ceil_mode) window stays in bounds
            need = (spatial_out[d] - 1) * stride[d] + dilation[d] * (kernel[d] - 1) + 1
            after.append(max(0, need - int(data.shape[lead + d]) - padding[d]))
        if any(padding) or any(after):
            data = topi.nn.pad(data, [0] * lead + padding, after, pad_value=-math.inf)
        taps = [te.reduce_axis((0, kernel[d]), f"r{d}") for d in range(nd)]

        def window_max(*idx):
            spatial = [idx[lead + d] * stride[d] + taps[d] * dilation[d] for d in range(nd)]
            return _nan_max_reducer(data[(*idx[:lead], *spatial)], axis=taps)

        return te.compute([*data.shape[:lead], *spatial_out], window_max, name="pool_max")

    return importer.block_builder.emit_te(compute, x, primfunc_name_hint=f"max_pool{nd}d")


for _nd in (1, 2, 3):
    register_converter(f"max_pool{_nd}d.default", fixes_importer=True)(functools.partial(_max_pool_nd, nd=_nd))


def _indices_unsupported(node: fx.Node) -> None:
    if any(not (u.target is operator.getitem and u.args[1] == 0) for u in node.users):
        raise UnsupportedOpError(f"operator {node.target} (node {node.name!r}): its indices output is used, "
                                 "and the TVM backend computes only the pooled values")


def _max_pool_with_indices(importer, node: fx.Node, nd: int) -> relax.Expr:
    """``(values,)`` from the NaN-propagating pool. TVM's own lowering returns float zeros as the indices
    (seen with tvm 0.27), so a graph that reads them is refused rather than silently wrong."""
    _indices_unsupported(node)
    if _static_spatial_out(node, importer.env[node.args[0]], nd) is None:
        return importer.tvm_convert_map[f"max_pool{nd}d_with_indices.default"](node)
    return importer.block_builder.emit(relax.Tuple([_max_pool_nd(importer, node, nd)]))


for _nd in (2, 3):
    register_converter(f"max_pool{_nd}d_with_indices.default", fixes_importer=True)(
        functools.partial(_max_pool_with_indices, nd=_nd))


def _adaptive_max_pool_nd(importer, node: fx.Node, nd: int) -> relax.Expr:
    """Adaptive max pooling (TVM's importer has none), NaN-propagating like the pools above.

    Output cell ``o`` of a dim of size ``L`` pooled to ``O`` covers ``[floor(o*L/O), ceil((o+1)*L/O))``, as
    in PyTorch. Windows differ in size, so the reduction runs over the largest one and masks the taps
    past a window's end with -inf (reading a clamped, in-bounds index). The op returns ``(values,
    indices)``; only the values are computed: a graph that reads the indices is unsupported.
    """
    _indices_unsupported(node)
    args = importer.retrieve_args(node)
    x = args[0]
    spatial_out = _static_spatial_out(node, x, nd)
    if spatial_out is None:
        raise UnsupportedOpError(f"operator {node.target} (node {node.name!r}): the TVM backend supports "
                                 "it only for floating-point inputs of static shape")
    spatial_in = [int(d) for d in list(x.ty.shape.values)[-nd:]]
    starts = [[(o * n) // m for o in range(m)] for n, m in zip(spatial_in, spatial_out)]
    ends = [[-((-(o + 1) * n) // m) for o in range(m)] for n, m in zip(spatial_in, spatial_out)]
    widest = [max(e - s for s, e in zip(st, en)) for st, en in zip(starts, ends)]

    def compute(data: te.Tensor) -> te.Tensor:
        lead = len(data.shape) - nd
        taps = [te.reduce_axis((0, widest[d]), f"r{d}") for d in range(nd)]

        def window_max(*idx):
            inside, spatial = [], []
            for d in range(nd):
                n, m = spatial_in[d], spatial_out[d]
                start = tirx.floordiv(idx[lead + d] * n, m)
                end = tirx.floordiv((idx[lead + d] + 1) * n + m - 1, m)
                inside.append(start + taps[d] < end)
                spatial.append(tirx.min(start + taps[d], n - 1))
            value = data[(*idx[:lead], *spatial)]
            masked = tirx.Select(functools.reduce(tirx.And, inside), value, tirx.const(-math.inf, data.dtype))
            return _nan_max_reducer(masked, axis=taps)

        return te.compute([*data.shape[:lead], *spatial_out], window_max, name="adaptive_pool_max")

    bb = importer.block_builder
    values = bb.emit_te(compute, x, primfunc_name_hint=f"adaptive_max_pool{nd}d")
    return bb.emit(relax.Tuple([values]))


for _nd in (1, 2, 3):
    register_converter(f"adaptive_max_pool{_nd}d.default")(functools.partial(_adaptive_max_pool_nd, nd=_nd))


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


def _arithmetic_with_sizes(importer, node: fx.Node, op_name: str) -> relax.Expr:
    """``x * seq``: a symbolic size as an operand of tensor arithmetic (a scale by the sequence
    length) enters as a 0-d tensor of the result's dtype; the importer passes it on as an int64
    scalar, which Relax refuses next to a float tensor."""
    import torch

    sizes = [a for a in node.args if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.SymInt)]
    val = node.meta.get("val")
    if not sizes or not isinstance(val, torch.Tensor):
        return importer.tvm_convert_map[op_name](node)
    bb = importer.block_builder
    dtype = str(val.dtype).removeprefix("torch.")
    saved = {a: importer.env[a] for a in sizes}
    for a in sizes:
        shape = relax.ShapeExpr([importer.env[a]])
        as_tensor = bb.emit(relax.op.reshape(bb.emit(relax.op.shape_to_tensor(shape)), []))
        importer.env[a] = bb.emit(relax.op.astype(as_tensor, dtype))
    try:
        return importer.tvm_convert_map[op_name](node)
    finally:
        importer.env.update(saved)


for _name in ("add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "rsub.Scalar", "rsub.Tensor"):
    register_converter(_name, fixes_importer=True)(functools.partial(_arithmetic_with_sizes, op_name=_name))
