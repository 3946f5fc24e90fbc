"""What each ATen op is to fusion.

Kinds (a node has exactly one):

* ``anchor``      — a compute-bound op with a fusable epilogue: conv, linear, (batched) matmul;
* ``attention``   — ``scaled_dot_product_attention``, already one unit;
* ``reduction``   — softmax, log-softmax, layer/group norm, mean/sum/amax: a reduction
                    that can take an elementwise prologue and epilogue;
* ``elementwise`` — one output element from the same element of each input (plus scalars
                    and broadcasts): activations, arithmetic, clamps;
* ``layout``      — copies that move elements (transpose, permute, select, slice, expand);
* ``view``        — reinterpretations of the same memory (view, reshape, squeeze, flatten
                    and transposes that only move size-1 dims); the TVM backend emits no
                    kernel for them outside a group;
* ``opaque``      — everything else (pools, concatenation, ...): never fused.

Quantization nodes (see graphopt/qdq.py): ``quantize`` is elementwise (it joins its
producer's epilogue, so that kernel writes int8); a ``dequantize`` that the integer
lowering drops (all its users read the int8 values) is a view, any other one elementwise.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.fx as fx

from graphopt.qdq import DEQUANTIZE, QUANTIZE, elided_dequantize

aten = torch.ops.aten

Kind = Literal["anchor", "attention", "reduction", "elementwise", "layout", "view", "opaque"]

ANCHORS = {aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten.linear, aten.matmul,
           aten.mm, aten.bmm, aten.addmm, aten.baddbmm}
ATTENTION = {aten.scaled_dot_product_attention}
REDUCTIONS = {aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.layer_norm,
              aten.native_layer_norm, aten.group_norm, aten.mean, aten.sum, aten.amax, aten.rms_norm}
# Activations, spelled as ATen ops (relu6 is hardtanh(0, 6) after export).
ACTIVATIONS = {aten.relu, aten.relu6, aten.hardtanh, aten.gelu, aten.silu, aten.sigmoid, aten.hardswish,
               aten.hardsigmoid, aten.tanh, aten.leaky_relu, aten.elu, aten.mish}
ARITHMETIC = {aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.exp, aten.log, aten.sqrt, aten.rsqrt,
              aten.pow, aten.abs, aten.clamp, aten.clamp_min, aten.clamp_max, aten.clip, aten.reciprocal,
              aten.erf, aten.maximum, aten.minimum, aten.where, aten.square}
ELEMENTWISE = ACTIVATIONS | ARITHMETIC
LAYOUT = {aten.transpose, aten.permute, aten.t, aten.select, aten.slice, aten.expand, aten.contiguous, aten.unbind,
          aten.split, aten.split_with_sizes, aten.chunk}
VIEWS = {aten.view, aten._unsafe_view, aten.reshape, aten.squeeze, aten.unsqueeze, aten.flatten,
         aten.alias, aten.clone, aten.detach}


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", node.target)


def _moves_only_unit_dims(node: fx.Node) -> bool:
    """A transpose/permute that keeps the order of the dims larger than 1 moves no data."""
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    rank = src.dim()
    if _packet(node) is aten.permute:
        perm = [d % rank for d in node.args[1]]
    elif _packet(node) is aten.transpose:
        perm = list(range(rank))
        a, b = node.args[1] % rank, node.args[2] % rank
        perm[a], perm[b] = perm[b], perm[a]
    else:  # aten.t
        perm = list(range(rank))[::-1]
    try:
        kept = [d for d in perm if int(src.shape[d]) != 1]
    except (TypeError, RuntimeError):  # a symbolic dim: cannot prove it is 1
        return False
    return kept == sorted(kept)


def kind(node: fx.Node) -> Kind:
    """The fusion kind of ``node`` (see the module docstring)."""
    if node.op != "call_function":
        return "opaque"
    if getattr(node.target, "__name__", "") == "getitem":
        return "view"
    if node.target in QUANTIZE:
        return "elementwise"
    if node.target in DEQUANTIZE:
        return "view" if elided_dequantize(node) else "elementwise"
    op = _packet(node)
    if op in ANCHORS:
        return "anchor"
    if op in ATTENTION:
        return "attention"
    if op in REDUCTIONS:
        return "reduction"
    if op in ELEMENTWISE:
        return "elementwise"
    if op in VIEWS:
        return "view"
    if op in (aten.transpose, aten.permute, aten.t):
        return "view" if _moves_only_unit_dims(node) else "layout"
    if op in LAYOUT:
        return "layout"
    return "opaque"


def is_compute(node: fx.Node) -> bool:
    """Whether ``node`` becomes a kernel of its own when it is not in a fusion group."""
    return node.op == "call_function" and kind(node) != "view"


def is_scalar_scale(node: fx.Node) -> bool:
    """mul/div by a Python scalar or a one-element tensor: the ``scale`` of attention."""
    if _packet(node) not in (aten.mul, aten.div) or len(node.args) < 2:
        return False
    other = node.args[1]
    if isinstance(other, (int, float)):
        return True
    val = other.meta.get("val") if isinstance(other, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.numel() == 1


def is_softmax(node: fx.Node) -> bool:
    return node.op == "call_function" and _packet(node) in (aten.softmax, aten._softmax)


def is_matmul(node: fx.Node) -> bool:
    return node.op == "call_function" and _packet(node) in (aten.matmul, aten.bmm, aten.mm)


def is_pure(node: fx.Node) -> bool:
    """No side effects and no randomness: safe to dedupe, fold or drop."""
    if node.op != "call_function":
        return False
    t = node.target
    tags = getattr(t, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    schema = getattr(t, "_schema", None)
    if schema is not None and schema.is_mutable:
        return False
    return True
