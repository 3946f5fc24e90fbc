"""The declared-rewrite driver: named rules, first match wins, hits counted per rule.

The same ``Rewrite`` rules drive graph passes (torch.fx, ``rewrite_fx``) and the backend's
compile-time Relax rewrites (``CallRewriter``: weight re-layout, Winograd, int8 packing).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from tvm import relax

from graphopt.rewrite import ERASE, KEEP, Rewrite, counter_stats, first_match, rewrite_fx
from graphopt.targets.cpu.schedules.layout import CONV_WEIGHT_TO_HWIO, CallRewriter
from graphopt.targets.cpu.schedules.winograd import _winograd_rule
from graphopt.testing import assert_close


def _traced(fn) -> fx.GraphModule:
    return fx.symbolic_trace(fn)


def test_first_matching_rule_wins_and_each_hit_is_counted():
    def f(x):
        return torch.neg(torch.neg(x)) + torch.relu(x)

    gm = _traced(f)
    negs = lambda n: n if n.op == "call_function" and n.target is torch.neg else None  # noqa: E731
    rules = [
        Rewrite("neg-neg", lambda n: n.args[0] if negs(n) and negs(n.args[0]) else None,
                lambda n, inner: inner.args[0]),
        Rewrite("any-neg", negs, lambda n, _: KEEP),  # matches the inner neg only: the outer one went first
    ]
    counts = rewrite_fx(gm.graph, rules)
    gm.recompile()
    assert counter_stats(counts) == {"pattern.neg-neg": 1, "pattern.any-neg": 1}
    x = torch.randn(5)
    assert_close(gm(x), x + torch.relu(x), "exact")


def test_erase_removes_a_node_without_users_and_none_declines():
    def f(x):
        torch.sin(x)  # dead
        return x * 2

    gm = _traced(f)
    dead = lambda n: n if n.op == "call_function" and not n.users else None  # noqa: E731
    rules = [Rewrite("decline", dead, lambda n, _: None), Rewrite("dead", dead, lambda n, _: ERASE)]
    counts = rewrite_fx(gm.graph, rules)
    assert counts == {}  # the first rule matched and declined: nothing else is tried on that node
    assert first_match([Rewrite("dead", dead, lambda n, _: ERASE)], next(n for n in gm.graph.nodes
                                                                          if n.target is torch.sin)) is not None


def _conv_module(x_shape, w):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1))
            out = bb.emit_output(relax.op.nn.conv2d(a, relax.const(w[:, :, :1, :1].copy())))
        bb.emit_func_output(out)
    return bb.get()


def test_relax_call_rules_are_counted_per_rule():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 32, 3, 3)).astype("float32")
    mod = _conv_module((8, 32, 28, 28), w)
    rewriter = CallRewriter(mod, [_winograd_rule(16), CONV_WEIGHT_TO_HWIO])
    out = rewriter.transform()
    # the 3x3 conv takes Winograd (the first rule); the 1x1 one is re-laid out
    assert rewriter.counts == {"conv2d-winograd": 1, "conv2d-weight-hwio": 1}
    text = out.script()
    assert "conv2d_winograd" in text and 'kernel_layout="HWIO"' in text
