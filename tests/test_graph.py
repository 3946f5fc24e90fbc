"""Graph: summary numbers, networkx view, pictures, IR text, runnable module."""

import networkx as nx
import torch

import graphopt
from graphopt.testing import assert_close
from graphopt.models import cnn


def test_summary_counts_ops_params_and_flops():
    m, x = cnn(), torch.randn(1, 3, 32, 32)
    s = graphopt.optimize(m, x, "fold").summary()
    assert s.op_counts["conv2d"] == 2 and s.op_counts["linear"] == 2 and s.op_counts["max_pool2d"] == 2
    assert s.params == sum(p.numel() for p in m.parameters())
    assert s.bytes == 4 * s.params
    # conv1: 32x32x32 outputs x 3*3*3 MACs; conv2: 64x16x16 x 32*9; fc1: 128x4096; fc2: 10x128
    macs = 32 * 32 * 32 * 27 + 64 * 16 * 16 * 288 + 128 * 4096 + 10 * 128
    assert s.macs == macs and s.flops == 2 * macs
    per_node = {c.name: c.macs for c in s.nodes}
    assert per_node["conv2d"] == 32 * 32 * 32 * 27
    text = str(s)
    assert "| conv2d | 2 |" in text and "MACs" in text


def test_networkx_view_is_the_dataflow():
    m, x = cnn(), torch.randn(1, 3, 32, 32)
    g = graphopt.optimize(m, x, "fold")
    G = g.to_networkx()
    assert nx.is_directed_acyclic_graph(G)
    assert G.in_degree("x") == 0 and G.nodes["conv2d"]["op"] == "conv2d"
    assert nx.has_path(G, "x", "linear_1")
    assert G.edges["conv2d", "relu"]["bytes"] == 32 * 32 * 32 * 4


def test_pictures(tmp_path):
    g = graphopt.optimize(cnn(), torch.randn(1, 3, 32, 32), "fold")
    dot = g.draw(str(tmp_path / "g.dot"))
    assert open(dot).read().startswith('digraph "SmallCNN"')
    for ext in ("svg", "png"):
        path = g.draw(str(tmp_path / f"g.{ext}"))
        assert (tmp_path / f"g.{ext}").stat().st_size > 1000, path
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_ir_text_and_module():
    m, x = cnn(), torch.randn(1, 3, 32, 32)
    g = graphopt.optimize(m, x, "fold")
    text = str(g)
    assert text.startswith("graph SmallCNN(x: f32[1, 3, 32, 32]) -> (f32[1, 10])")
    assert "%conv2d: f32[1, 32, 32, 32] = conv2d(%x, @p_conv1_weight, @p_conv1_bias" in text
    module = g.module()
    assert isinstance(module, torch.nn.Module)
    assert_close(module(x), g(x), "exact")
