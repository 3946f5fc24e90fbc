"""int4 weight-only quantization of linear layers (``quantize{mode=int4, group=128}``).

Every float32 ``linear`` with a constant weight (and every ``mm``/``matmul`` by a constant
2-d weight, as the linear of its transpose) becomes one ``graphopt::linear_int4`` op::

    y = linear_int4(x, packed, scales, group, bias)

* ``packed``: uint8 ``(out_features, ceil(in_features / 2))``, two weights per byte along
  the input dimension, the even input index in the low nibble. A weight ``q`` in [-8, 7] is
  stored as ``q + 8``; a padding nibble (odd ``in_features``) holds 8, the weight 0.
* ``scales``: float32 ``(out_features, ceil(in_features / group))``, one per group of
  ``group`` consecutive input features (the last group may be shorter). Weights are
  symmetric: ``scale = max|w| / 7`` over the group, ``q = round(w / scale)``, so ``q``
  stays in [-7, 7] and ``w ~= q * scale``.
* activations stay float32.

A ``conv2d`` becomes ``linear_int4`` where that pays: a 1x1 conv (no padding, one group) over
a 1x1 image is a linear layer of its channels (squeeze-excitation blocks, conv classifiers),
a GEMV bound by its weight's memory traffic. Every other conv stays float, and the build log
says why (``int4_candidates``): over H x W pixels a conv is a GEMM of H*W rows per image,
compute-bound, where unpacking the nibbles costs more than reading fewer weight bytes saves
(a 1x1 conv 960-1280 over 3x3 pixels ran 3-5x slower as int4 than fp32 on an AVX-512 host;
a k x k conv as im2col adds the patch copy on top).

The op is a ``torch.library`` custom op whose CPU implementation unpacks, dequantizes and
calls ``linear``: the graph still runs eagerly and is the numerical reference of the TVM
kernel (targets/frontend/quantized_int4.py), which unpacks in registers and never materializes the
float weight. Its gradient reaches the input, the scales and the bias, so ``graphopt.finetune``
trains an int4 graph as it will run: the codes stay, the scales learn.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from graphopt.graph import Graph
from graphopt.passes.quantize.insert_qdq import QuantOp

aten = torch.ops.aten

GROUPS = (32, 64, 128)
QMAX = 7  # symmetric: q in [-7, 7]; the stored nibble is q + OFFSET
OFFSET = 8


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 in [-7, 7] of ``weight``'s shape, scales (out, n_groups) float32), per group of
    ``group`` input features of a ``(out_features, in_features)`` weight."""
    out_features, in_features = weight.shape
    n_groups = -(-in_features // group)
    padded = torch.zeros(out_features, n_groups * group, dtype=torch.float32)
    padded[:, :in_features] = weight.detach().float()
    grouped = padded.view(out_features, n_groups, group)
    scales = grouped.abs().amax(dim=2) / QMAX
    # an all-zero group quantizes to zeros with any scale; 1 keeps the division finite
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(grouped / safe.unsqueeze(2)).clamp(-QMAX, QMAX).to(torch.int8)
    return q.view(out_features, -1)[:, :in_features].contiguous(), scales.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two int4 values per byte along the last dim (even index in the low nibble), offset by 8."""
    out_features, in_features = q.shape
    nibbles = torch.full((out_features, in_features + in_features % 2), OFFSET, dtype=torch.uint8)
    nibbles[:, :in_features] = (q.to(torch.int16) + OFFSET).to(torch.uint8)
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The int8 values in [-8, 7] that ``pack_int4`` packed, ``(out_features, in_features)``."""
    low = (packed & 0x0F).to(torch.int8) - OFFSET
    high = (packed >> 4).to(torch.int8) - OFFSET
    return torch.stack((low, high), dim=2).view(packed.shape[0], -1)[:, :in_features].contiguous()


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """The float32 weight ``q * scale`` of a packed int4 weight."""
    q = unpack_int4(packed, in_features).float()
    return q * scales.repeat_interleave(group, dim=1)[:, :in_features]


@torch.library.custom_op("graphopt::linear_int4", mutates_args=())
def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``linear(x, dequantize_int4(packed, scales, group), bias)``."""
    weight = dequantize_int4(packed, scales, group, x.shape[-1])
    return torch.nn.functional.linear(x, weight, bias)


@linear_int4.register_fake
def _linear_int4_shape(x, packed, scales, group, bias=None):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _save_for_backward(ctx, inputs, output):
    x, packed, scales, group, bias = inputs
    ctx.save_for_backward(x, packed, scales)
    ctx.group, ctx.has_bias = group, bias is not None


def _linear_int4_backward(ctx, grad):
    """Gradients for the input, the scales and the bias; the int4 codes are fixed integers.

    With ``w[o, k] = q[o, k] * s[o, k // group]``: ``dL/ds[o, g] = sum_{k in g} dL/dw[o, k] * q[o, k]``.
    Fine-tuning an int4 graph (graphopt.finetune) therefore trains exactly what the kernel
    runs: the per-group scales, the biases and the layers left in float."""
    x, packed, scales = ctx.saved_tensors
    group, in_features, out_features = ctx.group, x.shape[-1], packed.shape[0]
    q = unpack_int4(packed, in_features).float()
    grad_x = grad_scales = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ (q * scales.repeat_interleave(group, dim=1)[:, :in_features])
    if ctx.needs_input_grad[2]:
        grad_w = grad.reshape(-1, out_features).t() @ x.reshape(-1, in_features)
        per_weight = torch.zeros(out_features, scales.shape[1] * group, dtype=grad_w.dtype)
        per_weight[:, :in_features] = grad_w * q
        grad_scales = per_weight.view(out_features, -1, group).sum(2)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, out_features).sum(0)
    return grad_x, None, grad_scales, None, grad_bias


linear_int4.register_autograd(_linear_int4_backward, setup_context=_save_for_backward)

LINEAR_INT4 = torch.ops.graphopt.linear_int4.default


def int4_weight(graph: Graph, op: QuantOp) -> tuple[torch.Tensor, Optional[fx.Node]]:
    """(the ``(out_features, in_features)`` float weight of a linear, 1x1 conv or constant-weight
    matmul, its bias node)."""
    w = graph.constant(op.node.args[op.weight_index]).detach()
    if op.kind in ("linear", "conv"):
        bias = op.node.args[2] if len(op.node.args) > 2 else op.node.kwargs.get("bias")
        return w.flatten(1), bias
    return w.t(), None  # x @ W with W (in, out)


def _conv_option(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def conv_float_reason(op: QuantOp) -> Optional[str]:
    """Why the conv of ``op`` stays float under int4, or None when it is a linear layer of its channels."""
    node = op.node
    weight = node.args[1].meta["val"]
    image = node.args[0].meta["val"].shape[2:]
    padding = _conv_option(node, 4, "padding", 0)
    if tuple(weight.shape[2:]) != (1, 1) or _conv_option(node, 6, "groups", 1) != 1:
        return "int4: a k x k or grouped conv is a GEMM over its pixels, compute-bound; float is faster"
    if any(int(p) != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding])):
        return "int4: a padded 1x1 conv is not a linear layer of its channels"
    if tuple(image) != (1, 1):
        return (f"int4: a 1x1 conv over {image[0]}x{image[1]} pixels is a GEMM of {image[0] * image[1]} rows, "
                "compute-bound; int4 pays only on a 1x1 image (a GEMV)")
    return None


def int4_candidates(ops: list[QuantOp]) -> tuple[list[QuantOp], list[tuple[QuantOp, str]]]:
    """(the ops int4 applies to: linears and matmuls by a constant 2-d weight, 1x1 convs over a 1x1
    image; the convs that stay float, each with the reason for the build log)."""
    chosen, kept = [], []
    for op in ops:
        if op.weight_index is None:
            continue
        reason = conv_float_reason(op) if op.kind == "conv" else None
        if reason is None:
            chosen.append(op)
        else:
            kept.append((op, reason))
    return chosen, kept


def apply_int4(graph: Graph, ops: list[QuantOp], group: int) -> int:
    """Replace each of ``ops`` (see ``int4_candidates``) by ``linear_int4``; returns how many."""
    packed_of: dict[str, tuple[fx.Node, fx.Node]] = {}  # a weight shared by several ops is packed once
    for op in ops:
        node = op.node
        w_node = node.args[op.weight_index]
        weight, bias = int4_weight(graph, op)
        key = f"{w_node.target}:{op.kind}"
        if key not in packed_of:
            q, scales = quantize_int4(weight, group)
            packed_of[key] = (graph.add_constant(pack_int4(q), f"{w_node.target}_int4", before=node),
                              graph.add_constant(scales, f"{w_node.target}_int4_scale", before=node))
        packed, scales_node = packed_of[key]
        fxg = graph.fx_graph
        with fxg.inserting_before(node):
            if op.kind == "conv":  # (N, C, 1, 1) -> (N, C) -> linear -> (N, O) -> (N, O, 1, 1)
                x = fxg.call_function(aten.view.default, (node.args[0], [-1, weight.shape[1]]))
                linear = fxg.call_function(LINEAR_INT4, (x, packed, scales_node, group, bias))
                added = [x, linear, fxg.call_function(aten.view.default, (linear, [-1, weight.shape[0], 1, 1]))]
            else:
                added = [fxg.call_function(LINEAR_INT4, (node.args[0], packed, scales_node, group, bias))]
        for new in added:
            new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(added[-1])
        graph.fx_graph.erase_node(node)
    graph.prune_unused_constants()
    graph.recompile()
    return len(ops)
