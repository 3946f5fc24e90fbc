"""Pruned graphs build for every target family: x86, aarch64 (NEON, dot-product) and CUDA."""

import pytest
import torch

import graphopt
from graphopt.models import cnn


@pytest.fixture(scope="module")
def pruned():
    model, x = cnn(), torch.randn(1, 3, 32, 32)
    graph = graphopt.optimize(model, (x,), "fold,prune{ratio=0.5}")
    assert graph.summary().params < 0.5 * sum(p.numel() for p in model.parameters())
    return graph, x


@pytest.mark.parametrize("target", ["x86", "arm64", "arm64-dotprod", "cuda"])
def test_pruned_graph_compiles_for_target(pruned, target):
    graph, x = pruned
    module = graphopt.compile(graph, target, pipeline="fuse")
    assert module.manifest["target"]["name"] == target
    assert module.outputs[0].shape == (1, 10)
    if target == "x86":  # the one this machine can run
        assert torch.allclose(module(x), graph(x)[0], rtol=1e-4, atol=1e-5)
