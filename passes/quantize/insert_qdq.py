"""Explicit quantize/dequantize (QDQ) structure in the fx graph.

The quantized graph keeps float ops and wraps their operands in
``torch.ops.quantized_decomposed`` nodes, the representation PyTorch's own PT2E flow uses::

    %q   = quantize_per_tensor(%x, s_x, zp_x, -128, 127, int8)        # shared by all users of %x
    %dq  = dequantize_per_tensor(%q, s_x, zp_x, -128, 127, int8)      # one per consumer
    %dqw = dequantize_per_channel(@w_int8, @w_scale, @w_zp, 0, -127, 127, int8)
    %y   = conv2d(%dq, %dqw, @bias, ...)

so the graph still runs in eager PyTorch as the *fake-quant reference*, stores int8
weights (the float weight is gone) and tells the backend exactly which tensors are int8
with which scale: targets/frontend/quantized.py rewrites each ``op(DQ(int8), DQ(int8 weight))``
into int8 x int8 -> int32 compute.

Conventions: weights are symmetric (zero point 0) in [-127, 127] (so a product pair never
saturates int16 intermediates of VNNI-style instructions), per output channel by default;
activations are int8 in [-128, 127], asymmetric unless ``symmetric`` is asked for. Both
operands of an activation x activation matmul are symmetric. ``dynamic`` mode computes
the activation scale at run time (``choose_qparams_symmetric.tensor`` per batch).
``fp16``/``bf16`` modes are not QDQ: the op runs in half precision between two casts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed
import torch.fx as fx

from graphopt.graph import Graph
from graphopt.passes.utils import aten, is_op, module_path

qd = torch.ops.quantized_decomposed

ACT_QMIN, ACT_QMAX = -128, 127
W_QMAX = 127
EPS = 1e-12

Q_OPS = (qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor)
DQ_OPS = (qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor, qd.dequantize_per_channel.default)


@dataclass(frozen=True)
class QuantOp:
    """A conv/linear/matmul the quantizer can rewrite, and which of its operands are what."""

    node: fx.Node
    kind: str  # "conv" | "linear" | "matmul"
    act_indices: tuple[int, ...]  # positional args that are activations
    weight_index: int | None  # positional arg that is a constant weight, if any
    weight_axis: int  # output-channel axis of that weight
    layer: str  # the model's name for the layer (module path), or the node name

    @property
    def activations(self) -> list[fx.Node]:
        return [self.node.args[i] for i in self.act_indices]

    def matches(self, pattern: str) -> bool:
        from fnmatch import fnmatchcase

        return fnmatchcase(self.layer, pattern) or fnmatchcase(self.node.name, pattern)


def _is_float(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32


def quantizable_ops(graph: Graph) -> list[QuantOp]:
    """Every float32 conv2d / linear / matmul in graph order (already-quantized ones excluded)."""
    ops = []
    for n in graph.call_nodes():
        if not _is_float(n) or not _is_float(n.args[0]):
            continue
        layer = module_path(n) or n.name
        w = n.args[1] if len(n.args) > 1 else None
        if is_op(n, aten.conv2d, aten.linear):
            if graph.is_constant(w) and _is_float(w):
                ops.append(QuantOp(n, "conv" if is_op(n, aten.conv2d) else "linear", (0,), 1, 0, layer))
        elif is_op(n, aten.mm, aten.matmul, aten.bmm):
            if graph.is_constant(w) and _is_float(w) and w.meta["val"].dim() == 2:
                ops.append(QuantOp(n, "matmul", (0,), 1, 1, layer))
            elif isinstance(w, fx.Node) and not graph.is_constant(w) and _is_float(w):
                ops.append(QuantOp(n, "matmul", (0, 1), None, 0, layer))
    return ops


# ----------------------------------------------------------------------------- parameters


def activation_qparams(lo: float, hi: float, symmetric: bool) -> tuple[float, int]:
    """(scale, zero_point) covering [lo, hi] with int8 [-128, 127]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        return max(max(-lo, hi) / ACT_QMAX, EPS), 0
    scale = max((hi - lo) / (ACT_QMAX - ACT_QMIN), EPS)
    zp = int(round(ACT_QMIN - lo / scale))
    return scale, min(max(zp, ACT_QMIN), ACT_QMAX)


def quantize_weight(w: torch.Tensor, axis: int, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weight and its float32 scale(s): one per channel along ``axis``, or one."""
    w64 = w.detach().double()
    if per_channel:
        dims = [d for d in range(w.dim()) if d != axis]
        amax = w64.abs().amax(dim=dims) if dims else w64.abs()
        shape = [1] * w.dim()
        shape[axis] = -1
        scale = (amax / W_QMAX).clamp(min=EPS)
        q = torch.round(w64 / scale.reshape(shape))
    else:
        scale = (w64.abs().max() / W_QMAX).clamp(min=EPS).reshape(1)
        q = torch.round(w64 / scale)
    return q.clamp(-W_QMAX, W_QMAX).to(torch.int8), scale.float()


# ----------------------------------------------------------------------------- rewriting


class QDQBuilder:
    """Inserts QDQ (or half-precision casts) around chosen ops of one graph."""

    def __init__(self, graph: Graph, per_channel: bool = True, symmetric: bool = False):
        self.graph = graph
        self.per_channel = per_channel
        self.symmetric = symmetric
        self._quantized: dict[tuple, fx.Node] = {}  # (activation, params) -> shared Q node
        self._weights: dict[tuple, fx.Node] = {}  # (weight name, axis) -> int8 weight DQ inputs
        self._half_ops: dict[fx.Node, torch.dtype] = {}  # ops now computing in fp16/bf16 (meta is stale)

    def _call(self, before: fx.Node, op, args: tuple, kwargs: dict | None = None) -> fx.Node:
        with self.graph.fx_graph.inserting_before(before):
            return self.graph.fx_graph.call_function(op, args, kwargs or {})

    # ---- static int8
    def static(self, op: QuantOp) -> None:
        for i in op.act_indices:
            act = op.node.args[i]
            if "qrange" not in act.meta:
                from graphopt.errors import GraphInvariantError

                raise GraphInvariantError(f"activation {act.name!r} of {op.node.name!r} has no calibrated "
                                          "range (node.meta['qrange']); run graphopt.calibrate first")
            lo, hi = act.meta["qrange"]
            scale, zp = activation_qparams(lo, hi, self.symmetric or op.weight_index is None)
            key = (act, scale, zp)
            q = self._quantized.get(key)
            if q is None:
                q = self._call(op.node, qd.quantize_per_tensor.default,
                               (act, scale, zp, ACT_QMIN, ACT_QMAX, torch.int8))
                q.meta["qrange"] = (lo, hi)
                self._quantized[key] = q
            dq = self._call(op.node, qd.dequantize_per_tensor.default, (q, scale, zp, ACT_QMIN, ACT_QMAX, torch.int8))
            op.node.update_arg(i, dq)
        self._weight(op)

    # ---- dynamic int8
    def dynamic(self, op: QuantOp) -> None:
        for i in op.act_indices:
            act = op.node.args[i]
            key = (act, "dynamic")
            q = self._quantized.get(key)
            if q is None:
                qp = self._call(op.node, qd.choose_qparams_symmetric.tensor, (act, ACT_QMIN, ACT_QMAX, EPS, torch.int8))
                scale = self._call(op.node, operator.getitem, (qp, 0))
                zp = self._call(op.node, operator.getitem, (qp, 1))
                q = self._call(op.node, qd.quantize_per_tensor.tensor, (act, scale, zp, ACT_QMIN, ACT_QMAX, torch.int8))
                self._quantized[key] = q
            scale, zp = q.args[1], q.args[2]
            dq = self._call(op.node, qd.dequantize_per_tensor.tensor, (q, scale, zp, ACT_QMIN, ACT_QMAX, torch.int8))
            op.node.update_arg(i, dq)
        self._weight(op)

    def _weight(self, op: QuantOp) -> None:
        if op.weight_index is None:
            return
        w_node = op.node.args[op.weight_index]
        key = (w_node.target, op.weight_axis)
        if key not in self._weights:
            wq, scale = quantize_weight(self.graph.constant(w_node), op.weight_axis, self.per_channel)
            wq_node = self.graph.add_constant(wq, f"{w_node.target}_int8", before=op.node)
            if self.per_channel:
                s_node = self.graph.add_constant(scale, f"{w_node.target}_scale", before=op.node)
                zp_node = self.graph.add_constant(torch.zeros(scale.shape, dtype=torch.int64),
                                                  f"{w_node.target}_zp", before=op.node)
                self._weights[key] = (qd.dequantize_per_channel.default,
                                      (wq_node, s_node, zp_node, op.weight_axis, -W_QMAX, W_QMAX, torch.int8))
            else:
                self._weights[key] = (qd.dequantize_per_tensor.default,
                                      (wq_node, float(scale), 0, -W_QMAX, W_QMAX, torch.int8))
        fn, args = self._weights[key]
        op.node.update_arg(op.weight_index, self._call(op.node, fn, args))

    # ---- half precision
    def half(self, op: QuantOp, dtype: torch.dtype) -> None:
        node = op.node
        for i, a in enumerate(node.args):
            # nodes this builder made have no meta yet: they are the f32 casts out of half ops
            if not isinstance(a, fx.Node) or not (_is_float(a) or "val" not in a.meta):
                continue
            if self.graph.is_constant(a):
                cast = self.graph.constant(a).to(dtype)
                node.update_arg(i, self.graph.add_constant(cast, f"{a.target}_{dtype_tag(dtype)}", before=node))
            else:
                node.update_arg(i, self._call(node, aten._to_copy.default, (a,), {"dtype": dtype}))
        with self.graph.fx_graph.inserting_after(node):
            back = self.graph.fx_graph.call_function(aten._to_copy.default, (node,), {"dtype": torch.float32})
        node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        self._half_ops[node] = dtype

    def finish(self) -> None:
        """Drop cast pairs ``half -> f32 -> half`` (exact) and the float weights no longer used."""
        for n in list(self.graph.call_nodes()):
            if not is_op(n, aten._to_copy) or n.kwargs.get("dtype") not in (torch.float16, torch.bfloat16):
                continue
            src = n.args[0]
            if is_op(src, aten._to_copy) and src.kwargs.get("dtype") == torch.float32:
                inner = src.args[0]
                if self._half_ops.get(inner) == n.kwargs["dtype"]:
                    n.replace_all_uses_with(inner)
                    self.graph.fx_graph.erase_node(n)
        for n in reversed(list(self.graph.call_nodes())):
            if not n.users and (is_op(n, aten._to_copy) or n.target in Q_OPS + DQ_OPS):
                self.graph.fx_graph.erase_node(n)
        self.graph.prune_unused_constants()


def dtype_tag(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def apply_quantization(graph: Graph, ops: list[QuantOp], mode: str, per_channel: bool = True,
                       symmetric: bool = False) -> int:
    """Rewrite ``ops`` of ``graph`` for ``mode`` (int8 | dynamic | fp16 | bf16); returns how many."""
    builder = QDQBuilder(graph, per_channel=per_channel, symmetric=symmetric)
    for op in ops:
        if mode == "int8":
            builder.static(op)
        elif mode == "dynamic":
            builder.dynamic(op)
        else:
            builder.half(op, torch.float16 if mode == "fp16" else torch.bfloat16)
    builder.finish()
    return len(ops)
