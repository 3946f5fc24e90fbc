"""noop: dropout/identity/same-shape views and neutral arithmetic disappear; outputs bit-identical."""

import torch
import torch.nn as nn

import graphopt
from graphopt.testing import assert_close
from graphopt.passes.noop import RemoveNoOps
from graphopt.printer import op_name


def ops(graph):
    return [op_name(n) for n in graph.call_nodes()]


class Plumbing(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.ident = nn.Identity()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        y = self.ident(self.drop(x)).contiguous()
        y = y.reshape(2, 6) * 1.0 + 0.0
        y = y.permute(0, 1).to(torch.float32)
        return self.fc(y)


def test_removes_plumbing_and_keeps_values_bit_identical():
    m, x = Plumbing().eval(), torch.randn(2, 6)
    g = graphopt.capture(m, x)
    assert any(o in ("clone", "mul.Tensor", "add.Tensor", "permute") for o in ops(g))
    out = graphopt.optimize(g, pipeline="noop")
    assert ops(out) == ["linear"]
    assert_close(out(x), g(x), "exact")


def test_keeps_ops_that_do_work():
    class Work(nn.Module):
        def forward(self, x):
            return (x.reshape(3, 4) * 2.0 + 1.0).permute(1, 0)

    x = torch.randn(4, 3)
    g = graphopt.capture(Work(), x)
    before = ops(g)
    result = RemoveNoOps().run(g)
    assert not result.changed
    assert ops(g) == before


def test_graph_output_that_is_a_noop_of_the_input():
    class Alias(nn.Module):
        def forward(self, x):
            return x.clone()

    x = torch.randn(3)
    out = graphopt.optimize(graphopt.capture(Alias(), x), pipeline="noop")
    assert ops(out) == []
    assert_close(out(x), x, "exact")


def test_each_removal_is_counted_under_its_rule():
    g = graphopt.capture(Plumbing().eval(), torch.randn(2, 6))
    result = RemoveNoOps().run(g)
    stats = {k: v for k, v in result.stats.items() if k.startswith("pattern.")}
    assert stats["pattern.times-one"] == 1 and stats["pattern.plus-zero"] == 1
    assert stats["pattern.identity-permute"] == 1 and stats["pattern.copy"] >= 1
    assert result.stats["removed"] == sum(stats.values())
