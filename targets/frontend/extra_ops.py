"""Converters for ATen ops TVM's importer lacks and PyTorch does not decompose.

(Ops with a core-ATen decomposition, such as ``aten.diff`` or ``aten.where.ScalarOther``, need
no converter: targets/frontend/decompose.py decomposes them before lowering.)

* ``amax`` / ``amin``: reductions over a list of dims that return NaN when a reduced element is
  NaN, like PyTorch (TVM's max/min reductions drop NaN; converters.py has the same combiners);
* ``conv1d/2d/3d.padding``: convolutions with ``padding="same"`` or ``"valid"``; "same" with an
  even kernel pads more on the right, as PyTorch does;
* ``var_mean.correction``: the variance and the mean;
* ``min.dim``, ``any``, ``prod.dim_int``, ``div.Scalar_mode``: spellings of ops the importer has
  in another form; ``pixel_shuffle``, whose importer entry calls a topi function TVM 0.27 lacks;
* ``new_ones`` / ``new_zeros``: the importer gives the result the dtype of ``self`` and drops
  ``dtype=``; a bool mask made as ``x.new_ones((), dtype=torch.bool)`` from an integer ``x`` then
  turns ``&`` into an integer bitwise and, and the attention that takes the mask adds it to the
  scores instead of masking them (transformers' BERT builds its padding mask this way);
* ``slice.Tensor`` up to a symbolic size: ends at start + the length torch worked out, in bounds;
* ``index_copy``: rows written along any dim (a static KV cache's update); its decomposition is an
  ``index_put`` with ``None`` for the other dims, which TVM's index_put does not take.
"""

from __future__ import annotations

import functools

import torch.fx as fx
from tvm import relax, te, tirx

from graphopt.errors import UnsupportedOpError
from graphopt.targets.frontend.converters import _nan_max_reducer, _nan_min_reducer
from graphopt.targets.frontend.lower import register_converter, source_location


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _nan_reduce(importer, node: fx.Node, reducer, relax_op) -> relax.Expr:
    x = importer.env[node.args[0]]
    rank = len(x.ty.shape.values)
    dims = _arg(node, 1, "dim", [])
    dims = [dims] if isinstance(dims, int) else list(dims)
    axes = sorted({d % rank for d in dims}) if dims else list(range(rank))
    keepdim = bool(_arg(node, 2, "keepdim", False))
    bb = importer.block_builder
    if not str(x.ty.dtype).startswith(("float", "bfloat")) or rank == 0:
        return bb.emit(relax_op(x, axis=axes or None, keepdims=keepdim))

    def compute(data: te.Tensor) -> te.Tensor:
        reduce_axes = {a: te.reduce_axis((0, data.shape[a]), f"k{a}") for a in axes}
        out_shape = [1 if a in reduce_axes else d for a, d in enumerate(data.shape)
                     if keepdim or a not in reduce_axes]

        def value(*idx):
            it = iter(idx)
            index = []
            for a in range(rank):
                if a in reduce_axes:
                    if keepdim:
                        next(it)
                    index.append(reduce_axes[a])
                else:
                    index.append(next(it))
            return reducer(data[tuple(index)], axis=list(reduce_axes.values()))

        return te.compute(out_shape, value, name=node.target.__name__.split(".")[0])

    return bb.emit_te(compute, x, primfunc_name_hint=node.target.__name__.split(".")[0])


@register_converter("amax.default")
def amax(importer, node: fx.Node) -> relax.Expr:
    return _nan_reduce(importer, node, _nan_max_reducer, relax.op.max)


@register_converter("amin.default")
def amin(importer, node: fx.Node) -> relax.Expr:
    return _nan_reduce(importer, node, _nan_min_reducer, relax.op.min)


def _ints(v, n: int) -> list[int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(d) for d in (v * n if len(v) == 1 else v)]


_HALF = ("float16", "bfloat16")


def _conv_padding(importer, node: fx.Node, nd: int) -> relax.Expr:
    """``convNd(x, w, bias, stride, padding: str, dilation, groups)`` with the string padding made
    explicit: (begin..., end...) per spatial dim, ``dilation * (k - 1)`` in all for "same"."""
    args = importer.retrieve_args(node)
    x, weight = args[0], args[1]
    bias = _arg(node, 2, "bias")
    bias = importer.env[bias] if isinstance(bias, fx.Node) else None
    stride = _ints(_arg(node, 3, "stride", 1), nd)
    mode = _arg(node, 4, "padding", "valid")
    dilation = _ints(_arg(node, 5, "dilation", 1), nd)
    groups = int(_arg(node, 6, "groups", 1))
    kernel = [int(k) for k in list(weight.ty.shape.values)[2:]]
    if mode == "valid":
        begin = end = [0] * nd
    elif mode == "same":
        if any(s != 1 for s in stride):  # PyTorch refuses it too
            raise UnsupportedOpError(f"operator {node.target} (node {node.name!r}, from {source_location(node)}): "
                                     "padding='same' needs stride 1")
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        begin = [t // 2 for t in total]
        end = [t - b for t, b in zip(total, begin)]
    else:
        raise UnsupportedOpError(f"operator {node.target} (node {node.name!r}): unknown padding {mode!r}")
    impl = {1: importer._conv1d_impl, 2: importer._conv2d_impl, 3: importer._conv3d_impl}[nd]
    out = impl(x, weight, None, stride, begin + end, dilation, groups)
    bb = importer.block_builder
    if bias is not None:
        b = bb.emit(relax.op.astype(bias, "float32")) if str(bias.ty.dtype) != "float32" else bias
        out = bb.emit(relax.op.add(out, bb.emit(relax.op.reshape(b, [1, -1] + [1] * nd))))
    dtype = str(x.ty.dtype)
    return bb.emit(relax.op.astype(out, dtype)) if dtype != "float32" else out


for _nd in (1, 2, 3):  # conv{1,2,3}d(padding="same"/"valid")
    register_converter(f"conv{_nd}d.padding")(functools.partial(_conv_padding, nd=_nd))


@register_converter("var_mean.correction")
def var_mean(importer, node: fx.Node) -> relax.Expr:
    variance = importer.tvm_convert_map["var.correction"](node)
    x = importer.env[node.args[0]]
    dims = _arg(node, 1, "dim")
    keepdim = bool(node.kwargs.get("keepdim", False))
    mean = importer.block_builder.emit(relax.op.mean(x, axis=dims, keepdims=keepdim))
    return importer.block_builder.emit(relax.Tuple([variance, mean]))


@register_converter("cumsum.default")
def cumsum(importer, node: fx.Node) -> relax.Expr:
    """``cumsum`` accumulates in its output dtype: torch promotes bool and small integers to
    int64, which TVM's scan leaves to the caller (a bool scan fails to build)."""
    x = importer.env[node.args[0]]
    dim = int(_arg(node, 1, "dim"))
    out_dtype = str(node.meta["val"].dtype).replace("torch.", "")
    bb = importer.block_builder
    if str(x.ty.dtype) != out_dtype:
        x = bb.emit(relax.op.astype(x, out_dtype))
    return bb.emit(relax.op.cumsum(x, dim, out_dtype))


@register_converter("min.dim")
def min_dim(importer, node: fx.Node) -> relax.Expr:
    """``(values, indices)`` of the minimum along ``dim``, like the importer's ``max.dim``."""
    x = importer.env[node.args[0]]
    dim = int(node.args[1])
    keepdim = bool(_arg(node, 2, "keepdim", False))
    bb = importer.block_builder
    both = bb.emit(relax.op.topk(x, k=1, axis=dim, largest=False, ret_type="both", dtype="int64"))
    values, indices = bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))
    if not keepdim:
        values = bb.emit(relax.op.squeeze(values, axis=[dim]))
        indices = bb.emit(relax.op.squeeze(indices, axis=[dim]))
    return bb.emit(relax.Tuple([values, indices]))


@register_converter("any.default")
def any_all_elements(importer, node: fx.Node) -> relax.Expr:
    x = importer.env[node.args[0]]
    bb = importer.block_builder
    if str(x.ty.dtype) != "bool":
        x = bb.emit(relax.op.not_equal(x, relax.const(0, str(x.ty.dtype))))
    as_int = bb.emit(relax.op.astype(x, "int8"))
    return bb.emit(relax.op.astype(bb.emit(relax.op.max(as_int)), "bool"))


@register_converter("prod.dim_int")
def prod_dim(importer, node: fx.Node) -> relax.Expr:
    x = importer.env[node.args[0]]
    keepdim = bool(_arg(node, 2, "keepdim", False))
    return importer.block_builder.emit(relax.op.prod(x, axis=[int(node.args[1])], keepdims=keepdim))


@register_converter("div.Tensor_mode", fixes_importer=True)
def div_mode(importer, node: fx.Node) -> relax.Expr:
    if isinstance(node.args[1], fx.Node):
        return importer.tvm_convert_map["div.Tensor_mode"](node)
    return div_scalar_mode(importer, node)


@register_converter("div.Scalar_mode")
def div_scalar_mode(importer, node: fx.Node) -> relax.Expr:
    """``x / scalar`` with ``rounding_mode`` "trunc" or "floor" (the importer makes an integer scalar an
    int32 constant next to a float tensor, which Relax refuses)."""
    x = importer.env[node.args[0]]
    dtype = str(x.ty.dtype)
    mode = _arg(node, 2, "rounding_mode")
    divisor = relax.const(node.args[1], dtype)
    bb = importer.block_builder
    if not dtype.startswith(("float", "bfloat")):
        if mode == "floor":
            return bb.emit(relax.op.floor_divide(x, divisor))
        wide = bb.emit(relax.op.astype(x, "float64"))
        quotient = bb.emit(relax.op.divide(wide, relax.const(node.args[1], "float64")))
        return bb.emit(relax.op.astype(bb.emit(relax.op.trunc(quotient)), dtype))
    quotient = bb.emit(relax.op.divide(x, divisor))
    if mode is None:
        return quotient
    return bb.emit((relax.op.floor if mode == "floor" else relax.op.trunc)(quotient))


@register_converter("pixel_shuffle.default", fixes_importer=True)
def pixel_shuffle(importer, node: fx.Node) -> relax.Expr:
    """``(.., C*r*r, H, W) -> (.., C, H*r, W*r)`` as reshape, transpose, reshape (TVM 0.27's importer
    calls a topi function that no longer exists)."""
    x = importer.env[node.args[0]]
    r = int(node.args[1])
    *lead, c, h, w = list(x.ty.shape.values)
    bb = importer.block_builder
    n = len(lead)
    split = bb.emit(relax.op.reshape(x, [*lead, c // (r * r), r, r, h, w]))
    order = [*range(n), n, n + 3, n + 1, n + 4, n + 2]
    moved = bb.emit(relax.op.permute_dims(split, order))
    return bb.emit(relax.op.reshape(moved, [*lead, c // (r * r), h * r, w * r]))


def _new_filled(importer, node: fx.Node, fill: int) -> relax.Expr:
    """A tensor of ``fill`` with the shape and dtype torch recorded for ``node`` (``dtype=`` when
    given, else that of ``self``)."""
    val = node.meta["val"]
    dtype = str(val.dtype).removeprefix("torch.")
    shape = relax.ShapeExpr(importer._relax_shape(val))
    return importer.block_builder.emit(relax.op.full(shape, relax.const(fill, dtype), dtype))


for _name, _fill in (("new_ones.default", 1), ("new_zeros.default", 0)):
    register_converter(_name, fixes_importer=True)(functools.partial(_new_filled, fill=_fill))


@register_converter("slice.Tensor", fixes_importer=True)
def slice_to_a_size(importer, node: fx.Node) -> relax.Expr:
    """``x[start:size]`` with a symbolic end (``position_ids[:, :seq]``).

    The importer passes the end as given, and Relax's slice normalizes an end that might be
    negative as ``if_then_else(seq < 0, seq + n, seq)``, a shape FuseTIR cannot read inside a
    kernel. torch has already worked out how many elements the slice takes: with a constant start
    inside the dim and step 1 the end is ``start`` plus that length, in bounds by construction."""
    start, end, step = _arg(node, 2, "start") or 0, _arg(node, 3, "end"), _arg(node, 4, "step", 1)
    x = importer.env[node.args[0]]
    dim = _arg(node, 1, "dim", 0) % len(x.ty.shape.values)
    size = x.ty.shape.values[dim]
    start_in_bounds = isinstance(start, int) and (start == 0 or (isinstance(size, tirx.IntImm)
                                                                 and 0 <= start <= int(size)))
    if not isinstance(end, fx.Node) or step != 1 or not start_in_bounds:
        return importer.tvm_convert_map["slice.Tensor"](node)
    length = importer._relax_shape(node.meta["val"])[dim]
    return importer.block_builder.emit(relax.op.strided_slice(x, [dim], [start], [start + length], [1],
                                                              assume_inbound=True))


@register_converter("index_copy.default")
def index_copy(importer, node: fx.Node) -> relax.Expr:
    """``x.index_copy(dim, index, source)``: ``source``'s slice ``i`` along ``dim`` goes to slice
    ``index[i]`` of ``x``, as a scatter of ``source`` with ``index`` broadcast over the other dims;
    the indices are checked at run time like every write through an index (indexing.py)."""
    from graphopt.targets.frontend.indexing import checked_indices

    x, index, source = (importer.env[node.args[i]] for i in (0, 2, 3))
    rank = len(x.ty.shape.values)
    dim = int(node.args[1]) % max(rank, 1)
    bb = importer.block_builder
    index = checked_indices(importer, node, index, x.ty.shape.values[dim], False, f"dim {dim}")
    if len(index.ty.shape.values) == 0:  # one slice: index is a scalar, source has no dim there
        index = bb.emit(relax.op.reshape(index, [1]))
        source = bb.emit(relax.op.expand_dims(source, dim))
    index = bb.emit(relax.op.reshape(index, [1] * dim + [-1] + [1] * (rank - dim - 1)))
    index = bb.emit(relax.op.broadcast_to(index, source.ty.shape))
    return bb.emit(relax.op.scatter_elements(x, index, source, axis=dim))
