"""fold-const: subgraphs with only constant inputs are evaluated once; bit-exact."""

import torch
import torch.nn as nn

import graphopt
from graphopt.testing import assert_close
from graphopt.passes.fold_constants import FoldConstants
from graphopt.printer import op_name


def ops(graph):
    return [op_name(n) for n in graph.call_nodes()]


class ScaledWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        w = (self.w * self.scale).t().exp()  # only constants: computed at compile time
        return x @ w


def test_constant_subgraph_becomes_one_constant():
    m, x = ScaledWeights().eval(), torch.randn(2, 4)
    g = graphopt.capture(m, x)
    assert {"mul.Tensor", "t", "exp"} <= set(ops(g)) or {"mul.Tensor", "permute", "exp"} <= set(ops(g))
    out = graphopt.optimize(g, pipeline="fold-const")
    assert ops(out) == ["matmul"] or ops(out) == ["mm"]
    assert len(out.constants()) == 1
    assert_close(out(x), g(x), "exact")


def test_nothing_to_fold_when_every_op_reads_an_input():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    g = graphopt.capture(m, torch.randn(1, 4))
    assert not FoldConstants().run(g).changed


def test_max_bytes_keeps_large_results_unfolded():
    class Expand(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.ones(1))

        def forward(self, x):
            return x + self.c.expand(256, 256).exp()

    x = torch.randn(256, 256)
    out = graphopt.optimize(Expand(), x, pipeline="fold-const{max_bytes=1024}")
    assert "exp" in ops(out)  # 256 KiB result: over the limit
    assert_close(out(x), Expand()(x), "exact")
