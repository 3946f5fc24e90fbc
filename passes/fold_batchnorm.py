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
from graphopt.rewrite import ERASE, Rewrite, counter_stats, rewrite_fx
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


@dataclass(frozen=True)
class _Fold:
    """What a conv/linear -> BatchNorm match binds."""

    producer: fx.Node
    out: fx.Node  # the node carrying BN's normalized output
    channel_dim: int  # the weight dimension of the output channels


def _bn_after(producers, channel_dim):
    """Match an inference BN whose input is ``producers`` feeding it alone, with constant parameters."""
    def match(bn: fx.Node, graph: Graph) -> _Fold | None:
        if not is_op(bn, *_BN):
            return None
        if is_op(bn, aten._native_batch_norm_legit, aten.batch_norm) and bn.args[5]:
            return None  # training-mode BN normalizes with batch statistics: not foldable
        producer, out = bn.args[0], _bn_output(bn)
        if out is None or not producers(producer) or single_user(producer) is not bn:
            return None
        gamma, beta, mean, var, _eps = _bn_params(bn)
        b_node = arg(producer, 2, "bias")
        consts = [producer.args[1], gamma, beta, mean, var] + ([b_node] if b_node is not None else [])
        if gamma is None or beta is None or not all(c is None or graph.is_constant(c) for c in consts):
            return None
        return _Fold(producer, out, channel_dim)
    return match


def _is_conv(node: fx.Node) -> bool:
    if is_op(node, aten.conv1d, aten.conv2d, aten.conv3d):
        return True
    return is_op(node, aten.convolution) and not arg(node, 6, "transposed")


def _is_transposed_conv(node: fx.Node) -> bool:
    # a grouped transposed conv keeps its output channels in groups along dim 1: not a plain scale
    if is_op(node, aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d):
        return arg(node, 6, "groups", 1) == 1
    return (is_op(node, aten.convolution) and bool(arg(node, 6, "transposed"))
            and arg(node, 8, "groups", 1) == 1)


def _fold(graph: Graph, bn: fx.Node, m: _Fold) -> object:
    """conv(x, W) * s + (b - mean) * s + beta  ->  conv(x, W * s) + ((b - mean) * s + beta)."""
    producer = m.producer
    w_node, b_node = producer.args[1], arg(producer, 2, "bias")
    gamma, beta, mean, var, eps = _bn_params(bn)
    W = graph.constant(w_node).double()
    mean_t, var_t = graph.constant(mean).double(), graph.constant(var).double()
    scale = graph.constant(gamma).double() / torch.sqrt(var_t + eps)
    b = graph.constant(b_node).double() if b_node is not None else torch.zeros_like(mean_t)
    shape = [1] * W.dim()
    shape[m.channel_dim] = -1
    dtype = graph.constant(w_node).dtype
    new_w = (W * scale.reshape(shape)).to(dtype)
    new_b = ((b - mean_t) * scale + graph.constant(beta).double()).to(dtype)
    producer.args = (producer.args[0], graph.add_constant(new_w, f"{w_node.target}_bn", before=producer),
                     *producer.args[2:])
    set_arg(producer, 2, graph.add_constant(new_b, f"{w_node.target}_bn_bias", before=producer))
    if m.out is bn:
        return producer
    m.out.replace_all_uses_with(producer)
    graph.fx_graph.erase_node(m.out)
    return ERASE


def fold_rewrites(graph: Graph) -> tuple[Rewrite, ...]:
    """The BN folds, as pattern -> replacement rules over ``graph``'s nodes."""
    def rule(name, producers, channel_dim):
        match = _bn_after(producers, channel_dim)
        return Rewrite(name, lambda bn: match(bn, graph), lambda bn, m: _fold(graph, bn, m))

    return (rule("conv-bn", _is_conv, 0),
            rule("conv-transpose-bn", _is_transposed_conv, 1),
            rule("linear-bn", lambda n: is_op(n, aten.linear), 0))


@register_pass
@dataclass(frozen=True)
class FoldBatchNorm(GraphPass):
    """Fold inference BatchNorm into the weights and bias of the preceding conv/linear."""

    name: ClassVar[str] = "fold-bn"
    tolerance: ClassVar[str] = "algebraic"

    def run(self, graph: Graph) -> PassResult:
        counts = rewrite_fx(graph.fx_graph, fold_rewrites(graph))
        folded = sum(counts.values())
        if folded:
            graph.prune_unused_constants()
        return PassResult(folded > 0, {"folded": folded, **counter_stats(counts)})
