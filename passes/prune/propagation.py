"""Per-op rules that carry channel *labels* through the graph.

Every element of every tensor gets a label: the id of the prunable *unit* it belongs to
(``FROZEN`` = 0 for elements no pruning may remove: graph inputs, outputs of ops we do not
model). Conv and linear layers create fresh units, one per output channel/feature. Labels
then flow forward, one op at a time:

* **data movement** (view, permute, flatten, cat, select, split, expand, ...) is executed
  on the label tensors themselves with the op's own ATen kernel, so concat offsets,
  flatten's spatial expansion and the reshapes of multi-head attention come out exactly
  as torch computes them — no hand-written index algebra;
* **pointwise** ops (``Tag.pointwise``: relu, add, mul, BN-free activations...) *couple*
  their inputs: along every axis two inputs share without broadcasting, the units of slice
  ``j`` of one are unioned with those of slice ``j`` of the other (a residual add prunes
  every branch identically; adding a graph input freezes the channels it meets);
* **consumers** (conv, linear, batch/layer norm, constant operands of pointwise ops) record
  a :class:`ParamSlice`: "slice axis ``a`` of this constant like these labels";
* **addmm** with a constant (in, out) weight (GPT-2's ``Conv1D``) is a transposed linear layer;
* **attention** (``scaled_dot_product_attention``) unions each head's q/k/v features into
  one unit, so only whole heads can go, consistently in q, k, v and the output projection;
* anything else freezes the units that reach it (safe, reported in ``unknown_ops``).

The union-find itself, the final consistency (rectangularity) fix-point and the grouping
live in dependency.py.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from graphopt.passes.utils import aten, is_op

FROZEN = 0


@dataclass
class ParamSlice:
    """Axis ``axis`` of the constant behind ``node`` is indexed by the units in ``labels``."""

    node: fx.Node
    axis: int
    labels: torch.Tensor  # 1-D raw unit ids, one per index along ``axis``
    role: str  # weight | bias | norm_scale | norm_shift | stat | operand | mask
    layer: str
    user: fx.Node | None = None  # the op reading the constant (a shared constant has several)


@dataclass(frozen=True)
class ConstRef:
    """A ``get_attr`` value as the propagation sees it: a constant that may get sliced."""

    node: fx.Node
    shape: tuple[int, ...]

    def zeros(self) -> torch.Tensor:
        return torch.zeros((1,) * len(self.shape), dtype=torch.long).expand(self.shape)


_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
_BATCH_NORMS = (aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit, aten.batch_norm)
_LAYER_NORMS = (aten.layer_norm, aten.native_layer_norm)
# Pure data movement: the op's own kernel, run on labels, moves them exactly like the data.
DATA_MOVEMENT = (aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.transpose, aten.t,
                 aten.flatten, aten.unflatten, aten.unsqueeze, aten.squeeze, aten.select, aten.slice,
                 aten.narrow, aten.cat, aten.stack, aten.expand, aten.split, aten.split_with_sizes,
                 aten.chunk, aten.unbind, aten.movedim, aten.alias, aten.contiguous, aten.clone,
                 aten.detach, aten.lift_fresh_copy, aten.repeat)
_IDENTITY = (aten.alias, aten.contiguous, aten.clone, aten.detach, aten.lift_fresh_copy)
_PASS_THROUGH = (aten._to_copy, aten.dropout, aten.native_dropout, aten.to)
# Elementwise ops torch does not tag ``pointwise``.
_UNTAGGED_ELEMENTWISE = (aten.hardswish, aten.hardswish_, aten.mul, aten.div, aten.add, aten.sub)
_POOLS = (aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices,
          aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d,
          aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
          aten.adaptive_max_pool2d, aten.upsample_nearest2d, aten.upsample_bilinear2d)
_REDUCTIONS = (aten.mean, aten.sum, aten.amax, aten.amin)
_SOFTMAX = (aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax)


def core(t: torch.Tensor) -> torch.Tensor:
    """The stored part of an expanded label tensor: size 1 on its broadcast (stride 0) axes."""
    for d in range(t.dim()):
        if t.shape[d] > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    return t


def compress(t: torch.Tensor) -> torch.Tensor:
    """Store labels with size 1 on every axis they are constant along (then expand: no copy)."""
    c = core(t)
    for d in range(c.dim()):
        if c.shape[d] > 1 and bool((c == c.narrow(d, 0, 1)).all()):
            c = c.narrow(d, 0, 1)
    return c.clone().expand(t.shape)


def varying_axes(t: torch.Tensor) -> list[int]:
    """Axes along which a compressed label tensor changes (its stride is not 0)."""
    return [d for d in range(t.dim()) if t.shape[d] > 1 and t.stride(d) != 0]


class Propagator:
    """Walks the graph once; ``unite(a, b)``/``fresh(n)`` come from the dependency graph."""

    def __init__(self, shapes: dict[fx.Node, Any], unite: Callable[..., bool],
                 fresh: Callable[[int], torch.Tensor], layer_of: Callable[[fx.Node], str],
                 excluded: Callable[[fx.Node], bool]):
        self.shapes = shapes
        self.unite = unite
        self.fresh = fresh
        self.layer_of = layer_of
        self.excluded = excluded
        self.env: dict[fx.Node, Any] = {}
        self.slices: list[ParamSlice] = []
        self.producers: dict[fx.Node, torch.Tensor] = {}  # conv/linear -> its fresh units
        self.depthwise: set[fx.Node] = set()
        self.unknown_ops: dict[str, int] = {}
        self.current: fx.Node | None = None
        # (labels, axis, op): that axis of those labels must keep its size
        self.fixed_axes: list[tuple[torch.Tensor, int, str]] = []

    # ------------------------------------------------------------ helpers
    def freeze(self, labels: Any, reason: str) -> None:
        """Make the units in ``labels`` unprunable; ``reason`` goes into the prune report."""
        for u in torch.unique(labels).tolist() if isinstance(labels, torch.Tensor) else ():
            if u != FROZEN:
                self.unite(u, FROZEN, f"{reason} ({self.current.name})" if self.current is not None else reason)

    def unite_many(self, a: torch.Tensor, b: torch.Tensor) -> None:
        pairs = torch.unique(torch.stack([a.reshape(-1), b.reshape(-1)], 1), dim=0)
        for x, y in pairs.tolist():
            if x != y:
                self.unite(x, y)

    def slice_units(self, labels: torch.Tensor, axis: int, constant_is_frozen: bool = False) -> torch.Tensor:
        """One unit per index along ``axis``; units sharing a slice are united first."""
        n = labels.shape[axis]
        if constant_is_frozen and axis not in varying_axes(labels):
            return torch.zeros(n, dtype=torch.long)
        if n > 1 and labels.stride(axis) == 0:
            return self.slice_units(core(labels), axis).expand(n).clone()
        rows = core(labels).movedim(axis, 0).reshape(n, -1)
        if rows.shape[1] and not bool((rows == rows[:, :1]).all()):
            for row in rows:
                first = int(row[0])
                for u in torch.unique(row).tolist():
                    if u != first:
                        self.unite(first, u)
        return rows[:, 0].clone() if rows.shape[1] else torch.zeros(n, dtype=torch.long)

    def record(self, const: Any, axis: int, labels: torch.Tensor, role: str, layer: str) -> None:
        if isinstance(const, ConstRef):
            self.slices.append(ParamSlice(const.node, axis, labels, role, layer, self.current))

    def labels_of(self, value: Any) -> torch.Tensor | None:
        if isinstance(value, ConstRef):
            return value.zeros()
        return value if isinstance(value, torch.Tensor) else None

    def zeros_like_output(self, node: fx.Node) -> Any:
        shape = self.shapes.get(node)
        if isinstance(shape, tuple) and shape and isinstance(shape[0], tuple):
            return tuple(torch.zeros((1,) * len(s), dtype=torch.long).expand(s) for s in shape)
        if isinstance(shape, tuple):
            return torch.zeros((1,) * len(shape), dtype=torch.long).expand(shape)
        return None

    # --------------------------------------------------------------- walk
    def run(self, graph_nodes, example_inputs) -> None:
        inputs = iter(example_inputs)
        for node in graph_nodes:
            if node.op == "placeholder":
                self.env[node] = torch.zeros((), dtype=torch.long).expand(next(inputs).shape)
            elif node.op == "get_attr":
                self.env[node] = ConstRef(node, tuple(self.shapes[node]))
            elif node.op == "output":
                self.current = None
                fx.node.map_aggregate(fx.node.map_arg(node.args, lambda n: self.env[n]),
                                      lambda v: self.freeze(self.labels_of(v), "reaches a graph output"))
            else:
                self.current = node
                self.env[node] = self.visit(node)

    def visit(self, node: fx.Node) -> Any:
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        if node.target is operator.getitem:
            container = args[0]
            return container[args[1]] if container is not None else None
        if not isinstance(self.shapes.get(node), tuple):  # symbolic-size arithmetic and friends
            return node.target(*fx.node.map_aggregate(args, self._as_tensor),
                               **fx.node.map_aggregate(kwargs, self._as_tensor))
        if is_op(node, *_CONVS):
            return self.conv(node, args)
        if is_op(node, aten.linear):
            return self.linear(node, args)
        if is_op(node, aten.addmm) and len(args) == 3 and not node.kwargs:
            return self.addmm(node, args)
        if is_op(node, *_BATCH_NORMS):
            return self.batch_norm(node, args)
        if is_op(node, *_LAYER_NORMS):
            return self.layer_norm(node, args)
        if is_op(node, aten.scaled_dot_product_attention):
            return self.attention(node, args, kwargs)
        if is_op(node, *DATA_MOVEMENT):
            return self.move(node, args, kwargs)
        if is_op(node, *_POOLS):
            return self.pool(node, args)
        if is_op(node, *_REDUCTIONS) and len(args) > 1:
            return self.reduce(node, args, kwargs)
        if is_op(node, *_SOFTMAX):
            return self.softmax(node, args)
        if is_op(node, *_PASS_THROUGH, *_UNTAGGED_ELEMENTWISE) or \
                torch.Tag.pointwise in getattr(node.target, "tags", ()):
            return self.pointwise(node, args, kwargs)
        return self.unknown(node, args, kwargs)

    def _as_tensor(self, v: Any) -> Any:
        return v.zeros() if isinstance(v, ConstRef) else v

    # ---------------------------------------------------------- producers
    def conv(self, node: fx.Node, args: tuple) -> Any:
        x, w = self.labels_of(args[0]), args[1]
        transposed = is_op(node, aten.convolution) and bool(args[6] if len(args) > 6 else False)
        groups = (args[8] if len(args) > 8 else 1) if is_op(node, aten.convolution) else \
            (args[6] if len(args) > 6 else 1)
        if not isinstance(w, ConstRef) or transposed:
            return self.unknown(node, args, {})
        bias = args[2] if len(args) > 2 else None
        layer = self.layer_of(node)
        cin = self.slice_units(x, 1)
        if self.excluded(node):
            self.freeze(cin, "excluded layer")
            return self.zeros_like_output(node)
        c_out, c_in = w.shape[0], x.shape[1]
        if groups == 1:
            self.record(w, 1, cin, "weight", layer)
            out = self.fresh(c_out)
            self.producers[node] = out
        elif groups == c_in:  # depthwise (channel multiplier c_out / c_in): no new units
            out = cin.repeat_interleave(c_out // c_in)
            self.depthwise.add(node)
        else:  # grouped: every group loses the same local indices, so groups stay equal
            per_group_in = cin.reshape(groups, -1)
            for col in per_group_in.T:
                self.unite_many(col[:1].expand_as(col), col)
            self.record(w, 1, per_group_in[0].clone(), "weight", layer)
            out = self.fresh(c_out)
            self.producers[node] = out
            per_group_out = out.reshape(groups, -1)
            for col in per_group_out.T:
                self.unite_many(col[:1].expand_as(col), col)
        self.record(w, 0, out, "weight", layer)
        self.record(bias, 0, out, "bias", layer)
        shape = self.shapes[node]
        return out.reshape(1, -1, *([1] * (len(shape) - 2))).expand(shape)

    def linear(self, node: fx.Node, args: tuple) -> Any:
        x, w = self.labels_of(args[0]), args[1]
        if not isinstance(w, ConstRef):
            return self.unknown(node, args, {})
        layer = self.layer_of(node)
        cin = self.slice_units(x, x.dim() - 1)
        if self.excluded(node):
            self.freeze(cin, "excluded layer")
            return self.zeros_like_output(node)
        self.record(w, 1, cin, "weight", layer)
        out = self.fresh(w.shape[0])
        self.producers[node] = out
        self.record(w, 0, out, "weight", layer)
        self.record(args[2] if len(args) > 2 else None, 0, out, "bias", layer)
        return out.expand(self.shapes[node])

    def addmm(self, node: fx.Node, args: tuple) -> Any:
        """``bias + x @ w`` with ``w`` stored (in, out): a linear layer with its weight
        transposed (HF's GPT-2 ``Conv1D``)."""
        bias, x, w = args[0], self.labels_of(args[1]), args[2]
        if not isinstance(w, ConstRef) or len(w.shape) != 2 or not isinstance(bias, (ConstRef, type(None))):
            return self.unknown(node, args, {})
        layer = self.layer_of(node)
        cin = self.slice_units(x, 1)
        if self.excluded(node):
            self.freeze(cin, "excluded layer")
            return self.zeros_like_output(node)
        self.record(w, 0, cin, "weight", layer)
        out = self.fresh(w.shape[1])
        self.producers[node] = out
        self.record(w, 1, out, "weight", layer)
        if isinstance(bias, ConstRef) and bias.shape[-1] > 1:
            self.record(bias, len(bias.shape) - 1, out, "bias", layer)
        return out.expand(self.shapes[node])

    # ---------------------------------------------------- per-channel ops
    def batch_norm(self, node: fx.Node, args: tuple) -> Any:
        x = self.labels_of(args[0])
        channels = self.slice_units(x, 1)
        layer = self.layer_of(node)
        for i, role in zip(range(1, 5), ("norm_scale", "norm_shift", "stat", "stat")):
            p = args[i] if len(args) > i else None
            if isinstance(p, ConstRef):
                self.record(p, 0, channels, role, layer)
            elif p is not None:
                self.freeze(channels, "batch norm with computed parameters")
        if is_op(node, aten.batch_norm):
            return x
        return (x, None, None)

    def layer_norm(self, node: fx.Node, args: tuple) -> Any:
        x, k = self.labels_of(args[0]), len(args[1])
        layer = self.layer_of(node)
        for i in range(k):
            units = self.slice_units(x, x.dim() - k + i)
            for j, role in ((2, "norm_scale"), (3, "norm_shift")):
                if len(args) > j:
                    self.record(args[j], i, units, role, layer)
        return x if is_op(node, aten.layer_norm) else (x, None, None)

    def attention(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        q, k, v = (self.labels_of(a) for a in args[:3])
        shape = self.shapes[node]
        if q.dim() < 3 or not (q.shape[-3] == k.shape[-3] == v.shape[-3]):
            for t in (q, k, v):
                self.freeze(t, "attention without a head axis")
            return self.zeros_like_output(node)
        heads = [self.slice_units(t, t.dim() - 3) for t in (q, k, v)]
        self.unite_many(heads[0], heads[1])
        self.unite_many(heads[0], heads[2])
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if isinstance(mask, ConstRef) and len(mask.shape) >= 3 and mask.shape[-3] > 1:
            self.record(mask, len(mask.shape) - 3, heads[0], "mask", self.layer_of(node))
        elif isinstance(mask, torch.Tensor):
            self.freeze(mask, "computed attention mask")
        return heads[0].reshape(-1, 1, 1).expand(shape)

    # -------------------------------------------------------- structural
    def move(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if is_op(node, *_IDENTITY):
            return self.labels_of(args[0])
        target = aten.reshape.default if is_op(node, aten.view, aten._unsafe_view) else node.target
        out = target(*fx.node.map_aggregate(args, self._as_tensor),
                     **fx.node.map_aggregate(kwargs, self._as_tensor))
        if isinstance(out, (tuple, list)):
            return tuple(compress(t) for t in out)
        return compress(out)

    def pool(self, node: fx.Node, args: tuple) -> Any:
        """Pooling and resampling keep axes 0 and 1 and mix only along spatial axes."""
        x = self.labels_of(args[0])
        if any(d >= 2 for d in varying_axes(x)):
            self.freeze(x, "pooled along an axis that carries channels")
        shape = self.shapes[node]
        shape = shape[0] if isinstance(shape[0], tuple) else shape
        out = x.narrow(0, 0, 1)
        for d in range(2, x.dim()):
            out = out.narrow(d, 0, 1)
        out = out.expand(shape)
        return (out, None) if is_op(node, aten.max_pool2d_with_indices, aten.adaptive_max_pool2d) else out

    def reduce(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        x = self.labels_of(args[0])
        dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        dims = sorted(d % x.dim() for d in dims) if dims else list(range(x.dim()))
        keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
        if any(d in dims for d in varying_axes(x)):  # a sum over channels changes when they go
            self.freeze(x, "reduced over channels")
        out = x
        for d in reversed(dims):
            out = out.narrow(d, 0, 1) if keepdim else out.select(d, 0)
        return out.expand(self.shapes[node])

    def softmax(self, node: fx.Node, args: tuple) -> Any:
        x = self.labels_of(args[0])
        if args[1] % x.dim() in varying_axes(x):
            self.freeze(x, "softmax over channels")
        return x

    def pointwise(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        shape = self.shapes[node]
        rank = len(shape)
        operands: list[Any] = [a for a in list(args) + list(kwargs.values())
                               if isinstance(a, (torch.Tensor, ConstRef))]
        labeled = [a for a in operands if isinstance(a, torch.Tensor)]
        if not labeled:
            return self.zeros_like_output(node)

        def aligned(t: torch.Tensor) -> torch.Tensor:
            return t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))

        views = [aligned(t) for t in labeled]
        first = views[0]
        for other in views[1:]:
            for axis in range(rank):
                if shape[axis] > 1 and first.shape[axis] == other.shape[axis] == shape[axis]:
                    fixed = [t for t in (first, other) if bool((core(t) == FROZEN).all())]
                    if len(fixed) == 1:
                        # Against a tensor no pruning can narrow (rotary cos/sin, a mask from
                        # the inputs) this axis must keep its size: decided in the fix-point,
                        # where whole heads may already be one unit and the axis not shrink.
                        self.fixed_axes.append((other if fixed[0] is first else first, axis, node.name))
                        continue
                    if self._unite_elementwise(first, other, shape):
                        break
                    self.unite_many(self.slice_units(first, axis, True), self.slice_units(other, axis, True))
        main = max(views, key=lambda t: (len(varying_axes(t)), t.numel()))
        for other in views:
            if any(other.shape[d] > 1 and main.shape[d] == 1 for d in varying_axes(other)):
                self.freeze(other, "broadcast against channels")  # not modelled
        out = main.expand(shape)
        for c in operands:
            if isinstance(c, ConstRef):
                offset = rank - len(c.shape)
                for axis, size in enumerate(c.shape):
                    if size > 1 and axis + offset in varying_axes(out):
                        self.record(c, axis, self.slice_units(out, axis + offset), "operand", self.layer_of(node))
        if isinstance(shape[0], tuple):  # native_dropout and friends return (out, mask)
            return (out, None)
        return out

    def _unite_elementwise(self, a: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...]) -> bool:
        """Operands that both vary along two or more shared axes (q and its rotated half in
        rotary embeddings vary along heads and head_dim): unite them element by element.
        Slice by slice would unite index ``j`` of head_dim across all heads and so every head
        with every other. Returns False (not applied) for the common one-axis case."""
        shared = [d for d in range(len(shape)) if shape[d] > 1 and a.shape[d] == b.shape[d] == shape[d]]
        if len([d for d in shared if d in varying_axes(a)]) < 2 or \
                len([d for d in shared if d in varying_axes(b)]) < 2:
            return False
        for d in range(len(shape)):
            if d not in shared:
                a, b = a.narrow(d, 0, 1), b.narrow(d, 0, 1)
        self.unite_many(a, b)
        return True

    def unknown(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        name = str(node.target)
        self.unknown_ops[name] = self.unknown_ops.get(name, 0) + 1
        fx.node.map_aggregate((args, kwargs), lambda v: self.freeze(v, f"read by {name}, which pruning does not model")
                              if isinstance(v, torch.Tensor) else None)
        return self.zeros_like_output(node)
