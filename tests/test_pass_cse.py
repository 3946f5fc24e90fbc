"""cse: duplicate computations merge, different ones do not; bit-exact."""

import torch
import torch.nn as nn

import graphopt
from graphopt.testing import assert_close
from graphopt.passes.cse import CommonSubexpressionElimination
from graphopt.printer import op_name


class Duplicates(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        a = torch.relu(self.fc(x))
        b = torch.relu(self.fc(x))  # same op, same inputs
        return a + b


def test_merges_duplicate_chains():
    m, x = Duplicates().eval(), torch.randn(2, 4)
    g = graphopt.capture(m, x)
    assert [op_name(n) for n in g.call_nodes()].count("linear") == 2
    out = graphopt.optimize(g, pipeline="cse")
    assert [op_name(n) for n in out.call_nodes()] == ["linear", "relu", "add.Tensor"]
    assert_close(out(x), g(x), "exact")


def test_different_arguments_do_not_merge():
    class Different(nn.Module):
        def forward(self, x):
            return torch.softmax(x, 0) + torch.softmax(x, 1) + x * 2.0 + x * 3.0

    g = graphopt.capture(Different(), torch.randn(3, 3))
    assert not CommonSubexpressionElimination().run(g).changed


def test_random_ops_are_never_merged():
    class Noisy(nn.Module):
        def forward(self, x):
            return torch.rand_like(x) + torch.rand_like(x)

    g = graphopt.capture(Noisy(), torch.randn(3))
    if any("rand" in op_name(n) for n in g.call_nodes()):
        assert not CommonSubexpressionElimination().run(g).changed
