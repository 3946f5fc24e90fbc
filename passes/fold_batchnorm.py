"""``fold-bn``: fold inference BatchNorm into the conv or linear layer before it.

    y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
      = conv(x, W * s) + (b - mean) * s + beta,      s = gamma / sqrt(var + eps)

``s`` scales the conv's output channels (dim 0 of W; dim 1 for transposed convs). The
fold applies only when the conv/linear output feeds the BatchNorm alone (otherwise the
un-normalized value is still needed) and all its parameters are constants. The arithmetic
runs in float64 so the folded weights round once; still an algebraic rewrite: outputs
change within the ``algebraic`` tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.graph import Graph
from graphopt.passes_base import GraphPass, PassResult, register_pass
from graphopt.passes.utils import aten, arg, is_op, set_arg, single_user

_BN = (aten._native_batch_norm_legit_no_training, aten.batch_norm, aten._native_batch_norm_legit)


def _bn_output(bn: fx.Node) -> fx.Node | None:
    """The node carrying BN's normalized output (its getitem[0], or BN itself)."""
    if is_op(bn, aten.batch_norm):
        return bn
    users = list(bn.users)
    if all(u.target.__name__ == "getitem" for u in users):
        firsts = [u for u in users if u.args[1] == 0]
        if len(firsts) == 1 and len(users) == 1:
            return firsts[0]
    return None


def _bn_params(bn: fx.Node) -> tuple[fx.Node, ...]:
    """(gamma, beta, mean, var) nodes, and eps, for the three BN spellings."""
    if is_op(bn, aten.batch_norm):  # (input, weight, bias, mean, var, training, momentum, eps, cudnn)
        return bn.args[1], bn.args[2], bn.args[3], bn.args[4], bn.args[7]
    if is_op(bn, aten._native_batch_norm_legit):  # (input, weight, bias, mean, var, training, momentum, eps)
        return bn.args[1], bn.args[2], bn.args[3], bn.args[4], bn.args[7]
    return bn.args[1], bn.args[2], bn.args[3], bn.args[4], bn.args[6]


@register_pass
@dataclass(frozen=True)
class FoldBatchNorm(GraphPass):
    """Fold inference BatchNorm into the weights and bias of the preceding conv/linear."""

    name: ClassVar[str] = "fold-bn"
    tolerance: ClassVar[str] = "algebraic"

    def run(self, graph: Graph) -> PassResult:
        folded = 0
        for bn in list(graph.nodes):
            if not is_op(bn, *_BN) or bn not in graph.gm.graph.nodes:
                continue
            if is_op(bn, aten._native_batch_norm_legit, aten.batch_norm) and bn.args[5]:
                continue  # training-mode BN normalizes with batch statistics: not foldable
            producer = bn.args[0]
            out = _bn_output(bn)
            if out is None or single_user(producer) is not bn:
                continue
            if is_op(producer, aten.conv2d, aten.conv1d, aten.conv3d, aten.convolution):
                transposed = is_op(producer, aten.convolution) and bool(arg(producer, 6, "transposed"))
                channel_dim = 1 if transposed else 0
                if transposed and arg(producer, 8, "groups", 1) != 1:
                    continue
            elif is_op(producer, aten.linear):
                channel_dim = 0
            else:
                continue
            w_node, b_node = producer.args[1], arg(producer, 2, "bias")
            gamma, beta, mean, var, eps = _bn_params(bn)
            consts = [w_node, gamma, beta, mean, var] + ([b_node] if b_node is not None else [])
            if not all(c is None or graph.is_constant(c) for c in consts):
                continue
            if gamma is None or beta is None:
                continue
            W = graph.constant(w_node).double()
            mean_t, var_t = graph.constant(mean).double(), graph.constant(var).double()
            scale = graph.constant(gamma).double() / torch.sqrt(var_t + eps)
            b = graph.constant(b_node).double() if b_node is not None else torch.zeros_like(mean_t)
            shape = [1] * W.dim()
            shape[channel_dim] = -1
            dtype = graph.constant(w_node).dtype
            new_w = (W * scale.reshape(shape)).to(dtype)
            new_b = ((b - mean_t) * scale + graph.constant(beta).double()).to(dtype)
            producer.args = (producer.args[0], graph.add_constant(new_w, f"{w_node.target}_bn", before=producer),
                             *producer.args[2:])
            set_arg(producer, 2, graph.add_constant(new_b, f"{w_node.target}_bn_bias", before=producer))
            out.replace_all_uses_with(producer)
            for n in ([out, bn] if out is not bn else [bn]):
                graph.fx_graph.erase_node(n)
            folded += 1
        if folded:
            graph.prune_unused_constants()
        return PassResult(folded > 0, {"folded": folded})
