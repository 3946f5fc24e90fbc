"""The shuffle transpose of channel-blocked write-backs (targets/cpu/transpose.py): a loop marked
``graphopt.transpose`` that copies a (pixel, channel) tile to (channel, pixel) rows becomes
whole-vector loads, a shuffle network and one store per channel, and moves every value to
where the plain loop would have put it."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import tvm
from tvm.script import tirx as T

import graphopt
from graphopt.targets.cpu.tir_pipeline import TIR_PIPELINE
from graphopt.targets.build import fusion_mode, scheduled_module, tir_calls
from graphopt.targets.frontend.lower import lower_to_relax
from graphopt.targets.registry import resolve_target
from graphopt.targets.cpu.transpose import TRANSPOSE, lower_transposes
from graphopt.testing import assert_close, assert_matches_eager


def _tile_to_rows(width: int, lanes: int, tile_channels: int):
    """out[c, 0:width] = tile[0:width, c] for the first ``lanes`` of a tile's channels, as the
    scheduled, vectorized write-back leaves it."""
    @T.prim_func
    def copy(tile: T.Buffer((width * tile_channels,), "float32"), out: T.Buffer((lanes * width,), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for c in T.serial(lanes, annotations={TRANSPOSE: 1}):
            out[T.Ramp(c * width, 1, width)] = tile[T.Ramp(c, tile_channels, width)]
    return copy


@pytest.mark.parametrize("lanes, tile_channels", [(16, 16), (16, 32), (4, 4)])
@pytest.mark.parametrize("width", [2, 3, 7, 8, 14, 16, 17, 20, 28, 56])
def test_moves_every_value_like_the_strided_copy(width, lanes, tile_channels):
    func = _tile_to_rows(width, lanes, tile_channels)
    lowered = lower_transposes(tvm.IRModule({"main": func}))["main"].script()
    assert TRANSPOSE not in lowered and "T.Shuffle" in lowered
    # no strided read is left: every load of the tile is one whole vector of channels
    assert f"T.Ramp(c, {tile_channels}, {width})" not in lowered

    lib = tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("x86").tvm_target(),
                      tir_pipeline=TIR_PIPELINE)
    tile = np.random.default_rng(width).standard_normal(width * tile_channels).astype("float32")
    out = tvm.runtime.tensor(np.zeros(lanes * width, "float32"))
    lib["main"](tvm.runtime.tensor(tile), out)
    expected = tile.reshape(width, tile_channels)[:, :lanes].T
    assert_close(out.numpy().reshape(lanes, width), expected, "exact")  # values moved, never rounded


def test_a_loop_of_another_shape_keeps_its_plain_code():
    @T.prim_func
    def scalar_copy(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for c in T.serial(16, annotations={TRANSPOSE: 1}):
            b[c] = a[c * 4]

    lowered = lower_transposes(tvm.IRModule({"main": scalar_copy}))["main"].script()
    assert TRANSPOSE not in lowered and "T.Shuffle" not in lowered and "a[c * 4]" in lowered


@pytest.mark.parametrize("channels, size, stride", [(32, 14, 1), (48, 7, 1), (32, 28, 2), (64, 40, 2)])
def test_depthwise_kernels_write_back_through_shuffles_and_match_eager(channels, size, stride):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1, groups=channels), nn.ReLU6()).eval()
    x = torch.randn(1, channels, size, size)
    graph = graphopt.optimize(m, (x,), "fold,fuse")
    mod = scheduled_module(lower_to_relax(graph), resolve_target("x86"), fusion=fusion_mode(graph, None))
    (name, _), = tir_calls(mod)
    assert f'"{TRANSPOSE}": 1' in mod[name].script()
    assert_matches_eager(graphopt.compile(m, "x86", (x,))(x), m, (x,))


class ConvThenReshape(nn.Module):
    """Found by the fuzzer (seed 29): a reshape and a permutation fold into the conv's write-back,
    whose output rows then interleave between tasks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).reshape(1, 42, 2, 1).transpose(-1, -2)
        return torch.tanh(y) + torch.tanh(y)


def test_a_write_back_through_a_folded_reshape_stays_plain_and_matches_eager():
    torch.manual_seed(0)
    m, x = ConvThenReshape().eval(), torch.randn(1, 1, 6, 7)
    graph = graphopt.optimize(m, (x,), "fold,fuse")
    mod = scheduled_module(lower_to_relax(graph), resolve_target("x86"), fusion=fusion_mode(graph, None))
    (name, _), = tir_calls(mod)
    assert TRANSPOSE not in mod[name].script()
    assert_matches_eager(graphopt.compile(m, "x86", (x,))(x), m, (x,))
