"""capture(): ATen-level graph with shape/dtype on every node; typed errors naming the cause."""

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.testing import assert_close, assert_matches_eager
from graphopt.errors import CaptureError
from graphopt.printer import op_name


def test_every_node_has_shape_and_dtype(conv_bn_net):
    m, (x,) = conv_bn_net
    g = graphopt.capture(m, x)
    for n in g.nodes:
        if n.op in ("placeholder", "get_attr") or (n.op == "call_function" and op_name(n) != "getitem"):
            assert isinstance(n.meta["val"], torch.Tensor) or isinstance(n.meta["val"], tuple), n.name
    conv = next(n for n in g.call_nodes() if op_name(n) == "conv2d")
    assert tuple(conv.meta["val"].shape) == (1, 8, 6, 6) and conv.meta["val"].dtype == torch.float32
    assert [s.name for s in g.input_specs] == ["x"] and g.output_specs[0].shape == (1, 4)


def test_parameters_become_constants_with_their_model_names(conv_bn_net):
    m, (x,) = conv_bn_net
    g = graphopt.capture(m, x)
    sources = {n.meta["source"] for n in g.nodes if n.op == "get_attr"}
    assert {"conv.weight", "conv.bias", "bn.running_mean", "fc.weight"} <= sources
    assert [n.op for n in g.nodes].count("placeholder") == 1


def test_graph_runs_like_the_model(conv_bn_net):
    m, (x,) = conv_bn_net
    assert_close(graphopt.capture(m, x)(x), m(x), "exact")


def test_capture_restores_training_mode():
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    graphopt.capture(m, torch.randn(1, 2))
    assert m.training


def test_dynamic_batch_dimension_is_symbolic():
    g = graphopt.capture(nn.Linear(4, 2), torch.randn(3, 4), dynamic_shapes="batch")
    batch = g.input_specs[0].shape[0]
    assert isinstance(batch, str) and g.output_specs[0].shape == (batch, 2)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # the line the error must point at
            return x * 2
        return x


def test_data_dependent_control_flow_names_the_line():
    with pytest.raises(CaptureError) as info:
        graphopt.capture(DataDependent(), torch.randn(3))
    msg = str(info.value)
    assert "cannot capture DataDependent: data-dependent" in msg
    assert "test_capture.py" in msg and "if x.sum() > 0:" in msg


def test_non_tensor_inputs_are_rejected():
    with pytest.raises(CaptureError, match="example input 1 is a str"):
        graphopt.capture(nn.Identity(), (torch.randn(1), "hello"))
    with pytest.raises(CaptureError, match="must be a tensor or a non-empty tuple"):
        graphopt.capture(nn.Identity(), [])


def test_non_module_is_rejected():
    with pytest.raises(CaptureError, match="expected a torch.nn.Module, got function"):
        graphopt.capture(lambda x: x, torch.randn(1))


class ScratchCache(nn.Module):
    """A static cache as module state, reset at the start of every call (a KV cache's first step)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(2, 8), persistent=False)

    def forward(self, x, at):
        self.cache.zero_()
        self.cache.index_copy_(1, at, x)
        return self.cache.cumsum(1)


class RunningSum(nn.Module):
    """State kept from call to call: each call adds to what the previous ones left."""

    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(4))

    def forward(self, x):
        self.total.add_(x)
        return self.total * 2


def test_a_buffer_overwritten_before_it_is_read_is_scratch_space():
    x, at = torch.randn(2, 3), torch.tensor([6, 1, 3])
    graph = graphopt.capture(ScratchCache(), (x, at))
    output = next(n for n in graph.fx_graph.nodes if n.op == "output")
    assert len(output.args[0]) == 1  # the user's output only, not the cache's final value
    compiled = graphopt.compile(ScratchCache(), "x86", (x, at))
    for _ in range(2):  # the cache is the call's own: a second call sees nothing of the first
        assert_matches_eager(compiled(x, at), ScratchCache(), (x, at))


def test_a_buffer_carrying_state_between_calls_is_a_capture_error_naming_it():
    with pytest.raises(CaptureError, match=r"buffer 'total'.*keeps no state between calls(.|\n)*test_capture.py"):
        graphopt.capture(RunningSum(), (torch.randn(4),))
