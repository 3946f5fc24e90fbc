"""dce: unused nodes and constants go; used ones stay; bit-exact."""

import torch
import torch.nn as nn

import graphopt
from graphopt.testing import assert_close
from graphopt.passes.dce import DeadCodeElimination
from graphopt.printer import op_name


def test_removes_dead_chain_and_its_constants():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(1, 4)
    g = graphopt.capture(m, x)
    live = next(n for n in g.call_nodes() if op_name(n) == "relu")
    with g.fx_graph.inserting_after(live):
        dead = g.fx_graph.call_function(torch.ops.aten.sigmoid.default, (live,))
        dead2 = g.fx_graph.call_function(torch.ops.aten.mul.Tensor, (dead, g.add_constant(torch.ones(4), "unused")))
    dead.meta["val"] = dead2.meta["val"] = live.meta["val"]
    n_consts = len(g.constants())
    result = DeadCodeElimination().run(g)
    assert result.changed and result.stats == {"nodes": 2, "constants": 1}
    assert [op_name(n) for n in g.call_nodes()] == ["linear", "relu"]
    assert len(g.constants()) == n_consts - 1
    g.recompile()
    assert_close(g(x), m(x), "exact")


def test_live_graph_is_unchanged():
    g = graphopt.capture(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), torch.randn(2, 3))
    assert not DeadCodeElimination().run(g).changed
