"""Index-reading and index-writing ops with their indices checked at run time.

TVM lowers ``take`` (behind embedding, index_select, ``x[idx]``) in its fast mode, and
``gather_elements`` / ``scatter_elements`` / ``index_put`` read and write wherever an index
points: an id past the end of an embedding table returns the memory after it, and a huge
one crashes the process. PyTorch raises instead. So every such op first passes its index
tensor through a small check kernel, ``check_indices``, which copies the indices and stops
the call with an ``IndexOutOfRangeError`` (graphopt.errors; a TIR assert of that kind, which
tvm-ffi raises as that class) when one lies outside the indexed dim. The check is part of
the compiled module, so a saved and loaded artifact checks too, and it covers indices the
model computes as well as those it is given.

Negative indices wrap where PyTorch wraps them (``x[idx]``, ``index_put``, ``torch.take``:
``-1`` is the last row) and are errors where PyTorch refuses them (embedding,
``index_select``, ``gather``, ``scatter``): the kernel returns the wrapped, in-range indices,
and the op after it reads them with TVM's unchecked take.

The ops themselves are TVM's importer's; the converters here hand them the checked indices
in place of the original ones (``_with_checked``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch.fx as fx
from tvm import relax, tirx
from tvm.script import tirx as T

from graphopt.errors import IndexOutOfRangeError, UnsupportedOpError
from graphopt.targets.frontend.lower import register_converter, source_location

# The error kind of the TIR assert: tvm-ffi raises the class registered under this name.
ERROR_KIND = IndexOutOfRangeError.__name__
# Marks a PrimFunc whose buffers have a length of their own (``n``) where the tensor it is called
# on has a computed one (``2 * seq``): FuseTIR cannot unify the two, so the build runs it unfused.
OWN_SHAPES_ATTR = "graphopt.own_shapes"


def check_indices_func(dtype: str, wrap_negative: bool, message: str, length: int | None) -> tirx.PrimFunc:
    """A PrimFunc ``(idx[n], bound, out[n])``: ``out = idx`` (plus ``bound`` where negative and
    ``wrap_negative``), asserting every index lies in ``[0, bound)`` (``[-bound, bound)`` when
    wrapping). One serial pass over the indices: they are few next to the rows they select.

    The loop's block iterates an *opaque* axis: a vectorized or parallel loop cannot hold an
    assert (LLVM rejects the vector of conditions), and the schedule rules, which see this
    block again once FuseTIR has merged it into the kernel of the op it feeds, leave loops over
    opaque axes serial. ``n`` is ``length`` when the number of indices is static: FuseTIR
    unifies the buffer with the one the op before it writes, and needs their types equal; a
    dynamic ``n`` is marked ``OWN_SHAPES_ATTR``."""
    parts = [message]

    @T.macro
    def check_one(idx, out, vi, bound):
        if wrap_negative:
            with T.Assert(T.Cast("int64", idx[vi]) < bound and T.Cast("int64", idx[vi]) >= -bound,
                          parts, ERROR_KIND):
                out[vi] = T.Select(idx[vi] < T.Cast(dtype, 0), idx[vi] + T.Cast(dtype, bound), idx[vi])
        else:
            with T.Assert(T.Cast("int64", idx[vi]) < bound and T.Cast("int64", idx[vi]) >= T.int64(0),
                          parts, ERROR_KIND):
                out[vi] = idx[vi]

    if length is not None:
        @T.prim_func(private=True, s_tir=True)
        def check_static(idx: T.Buffer((T.int64(length),), dtype), bound: T.int64,
                         out: T.Buffer((T.int64(length),), dtype)):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for i in T.serial(T.int64(length)):
                with T.sblock("check_index"):
                    vi = T.axis.opaque(T.int64(length), i)
                    check_one(idx, out, vi, bound)

        return check_static

    @T.prim_func(private=True, s_tir=True)
    def check_dynamic(var_idx: T.handle, bound: T.int64, var_out: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, OWN_SHAPES_ATTR: True})
        n = T.int64()
        idx = T.match_buffer(var_idx, (n,), dtype)
        out = T.match_buffer(var_out, (n,), dtype)
        for i in T.serial(n):
            with T.sblock("check_index"):
                vi = T.axis.opaque(n, i)
                check_one(idx, out, vi, bound)

    return check_dynamic


def checked_indices(importer, node: fx.Node, indices: relax.Expr, bound, wrap_negative: bool,
                    what: str) -> relax.Expr:
    """``indices`` after the check kernel: every one in ``[0, bound)`` (negative ones wrapped when
    ``wrap_negative``), or the call raises IndexOutOfRangeError naming ``node`` and ``what`` it indexes."""
    dtype = str(indices.ty.dtype)
    if dtype == "bool" or not dtype.startswith(("int", "uint")):  # masks select, they do not point
        return indices
    bb = importer.block_builder
    bound = tirx.IntImm("int64", bound) if isinstance(bound, int) else bound
    bound = bound if str(bound.ty) == "int64" else tirx.Cast("int64", bound)
    lo = "-size" if wrap_negative else "0"
    size = f" (size {int(bound)})" if isinstance(bound, tirx.IntImm) else ""
    message = (f"index out of range in {node.target} (node {node.name!r}, from {source_location(node)}): "
               f"every index into {what}{size} must lie in [{lo}, size)")
    flat_len = _static_numel(indices)
    func = check_indices_func(dtype, wrap_negative, message, flat_len)
    gvar = bb.add_func(func, f"check_indices_{_identifier(node.name)}")
    shape = indices.ty.shape
    flat = bb.emit(relax.op.reshape(indices, [-1]))
    checked = bb.emit(relax.call_tir(gvar, [flat, relax.prim_value(bound)], flat.ty))
    return bb.emit(relax.op.reshape(checked, shape))


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _dim_size(data: relax.Expr, dim: int):
    shape = data.ty.shape
    if shape is None:
        raise UnsupportedOpError("indexing a tensor of unknown rank cannot be bounds-checked")
    dims = list(shape.values)
    return dims[dim % len(dims)]


@contextlib.contextmanager
def _with_checked(importer, checked: dict[fx.Node, relax.Expr]) -> Iterator[None]:
    """Within the block, the importer reads ``checked``'s expressions for those index nodes."""
    saved = {n: importer.env[n] for n in checked}
    importer.env.update(checked)
    try:
        yield
    finally:
        importer.env.update(saved)


def _convert_with_checked(importer, node: fx.Node, checks: list[tuple[fx.Node, object, bool, str]]) -> relax.Expr:
    """TVM's conversion of ``node`` with each ``(index node, bound, wrap_negative, what)`` checked first."""
    seen: set[fx.Node] = set()
    checked: dict[fx.Node, relax.Expr] = {}
    for index, bound, wrap, what in checks:
        if index in seen:  # one tensor indexing two dims would need two different checked copies
            raise UnsupportedOpError(f"operator {node.target} (node {node.name!r}, from {source_location(node)}): "
                                     "the same index tensor indexes two dims; the TVM backend cannot check it")
        seen.add(index)
        checked[index] = checked_indices(importer, node, importer.env[index], bound, wrap, what)
    with _with_checked(importer, checked):
        return importer.tvm_convert_map[node.target.__name__](node)


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


@register_converter("embedding.default", fixes_importer=True)
def embedding(importer, node: fx.Node) -> relax.Expr:
    weight, ids = node.args[0], node.args[1]
    rows = _dim_size(importer.env[weight], 0)
    return _convert_with_checked(importer, node, [(ids, rows, False, "the embedding table's rows")])


@register_converter("index_select.default", fixes_importer=True)
def index_select(importer, node: fx.Node) -> relax.Expr:
    x, dim, index = node.args[0], node.args[1], node.args[2]
    size = _dim_size(importer.env[x], dim)
    return _convert_with_checked(importer, node, [(index, size, False, f"dim {dim}")])


@register_converter("take.default", fixes_importer=True)
def take(importer, node: fx.Node) -> relax.Expr:
    """``torch.take``: indices into the input flattened (TVM's importer passes the input unflattened,
    which Relax's take refuses for more than one dim)."""
    x = importer.env[node.args[0]]
    checked = checked_indices(importer, node, importer.env[node.args[1]], _numel(x), True, "the flattened input")
    bb = importer.block_builder
    return bb.emit(relax.op.take(bb.emit(relax.op.reshape(x, [-1])), checked, axis=0))


def _static_numel(data: relax.Expr) -> int | None:
    dims = list(data.ty.shape.values)
    if not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _numel(data: relax.Expr):
    out = tirx.IntImm("int64", 1)
    for d in data.ty.shape.values:
        out = out * d
    return out


@register_converter("gather.default", fixes_importer=True)
def gather(importer, node: fx.Node) -> relax.Expr:
    x, dim, index = node.args[0], _arg(node, 1, "dim"), _arg(node, 2, "index")
    size = _dim_size(importer.env[x], dim)
    return _convert_with_checked(importer, node, [(index, size, False, f"dim {dim}")])


def _scatter(importer, node: fx.Node) -> relax.Expr:
    x, dim, index = node.args[0], _arg(node, 1, "dim"), _arg(node, 2, "index")
    size = _dim_size(importer.env[x], dim)
    return _convert_with_checked(importer, node, [(index, size, False, f"dim {dim}")])


@register_converter("scatter.src", fixes_importer=True)
def scatter_src(importer, node: fx.Node) -> relax.Expr:
    return _scatter(importer, node)


@register_converter("scatter.value", fixes_importer=True)
def scatter_value(importer, node: fx.Node) -> relax.Expr:
    return _scatter(importer, node)


def _advanced_index_checks(importer, node: fx.Node) -> list[tuple[fx.Node, object, bool, str]]:
    """``x[i0, i1, ...]`` with index tensors (None = the whole dim): each checked against its dim,
    negative indices wrapping as in Python."""
    data = importer.env[node.args[0]]
    return [(index, _dim_size(data, dim), True, f"dim {dim}")
            for dim, index in enumerate(_arg(node, 1, "indices")) if isinstance(index, fx.Node)]


@register_converter("index.Tensor", fixes_importer=True)
def index_tensor(importer, node: fx.Node) -> relax.Expr:
    return _convert_with_checked(importer, node, _advanced_index_checks(importer, node))


@register_converter("index_put.default", fixes_importer=True)
def index_put(importer, node: fx.Node) -> relax.Expr:
    return _convert_with_checked(importer, node, _advanced_index_checks(importer, node))


@register_converter("index_put_.default", fixes_importer=True)
def index_put_inplace(importer, node: fx.Node) -> relax.Expr:
    return _convert_with_checked(importer, node, _advanced_index_checks(importer, node))
