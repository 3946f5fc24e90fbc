"""Winograd convolution (targets/cpu/schedules/winograd.py): which convs take it, and that the
kernel computes the same conv as PyTorch, epilogue included, at batch 1 and 2."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TVM_NUM_THREADS", "2")
tvm = pytest.importorskip("tvm")
from tvm import relax, te  # noqa: E402

import graphopt  # noqa: E402
from graphopt.targets.build import fusion_mode, scheduled_module  # noqa: E402
from graphopt.targets.frontend.lower import lower_to_relax  # noqa: E402
from graphopt.targets.registry import resolve_target  # noqa: E402
from graphopt.targets.cpu.schedules import schedule_primfunc  # noqa: E402
from graphopt.targets.cpu.schedules.elementwise import Fallback  # noqa: E402
from graphopt.targets.cpu.schedules.winograd import (  # noqa: E402
    choose_tile,
    transform_weight,
    winograd_conv2d_te,
    winograd_convs,
)
from graphopt.testing import assert_close, assert_matches_eager  # noqa: E402

X86 = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})
LANES = 16


@pytest.mark.parametrize("shape, channels_out, tile", [
    ((1, 64, 56, 56), 64, 4),    # resnet18 layer1: 196 tiles of 4x4
    ((1, 128, 28, 28), 128, 4),  # layer2: 49 tiles
    ((1, 256, 14, 14), 256, 2),  # layer3: 16 tiles of 4x4 are too few, 49 of 2x2 are not
    ((1, 512, 7, 7), 512, None),  # layer4: 16 tiles of 2x2 at most
    ((8, 512, 7, 7), 512, None),  # 2x2 tiles overhang 7x7 by 30%: a saving of 1.7x only
    ((8, 256, 14, 14), 256, 4),
    ((1, 32, 16, 16), 64, None),  # the small CNN at batch 1: 4.7M multiply-adds, too little work
    ((8, 32, 16, 16), 64, 4),     # ... at batch 8: 128 tiles of 4x4
    ((1, 8, 56, 56), 64, None),   # fewer input channels than a vector
    ((1, 64, 56, 56), 24, None),  # output channels not whole vectors
])
def test_tile_choice(shape, channels_out, tile):
    assert choose_tile(list(shape), channels_out, LANES) == tile


def _conv_module(x_shape, w):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, relax.const(w), padding=1))
        bb.emit_func_output(out)
    return bb.get()


def _called_kernels(mod) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_rewrite_replaces_only_convs_that_pay():
    rng = np.random.default_rng(0)
    big = winograd_convs(LANES)(_conv_module((1, 32, 28, 28), rng.standard_normal((64, 32, 3, 3)).astype("float32")))
    assert _called_kernels(big) == {"conv2d_winograd"}
    assert big["conv2d_winograd"].params[1].shape[0] == 6  # U is [6, 6, C, K]: 4x4 tiles
    small = winograd_convs(LANES)(_conv_module((1, 16, 8, 8), rng.standard_normal((32, 16, 3, 3)).astype("float32")))
    assert _called_kernels(small) == set()  # still a relax conv2d


def _run(func, arrays, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=X86)
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


@pytest.mark.parametrize("tile, size, batch", [(4, 28, 1), (2, 14, 1), (4, 30, 2), (2, 7, 2)])
@pytest.mark.parametrize("rule", ["WinogradConv2d", "Fallback"])
def test_kernel_matches_direct_conv(tile, size, batch, rule):
    """The scheduled kernel (or the fallback rule's, as when the Winograd rule fails) gives
    the conv; sizes include images the tiles overhang (30 = 7.5 tiles of 4)."""
    rng = np.random.default_rng(1)
    c, k = 16, 32
    x_np = rng.standard_normal((batch, c, size, size)).astype("float32")
    w_np = (rng.standard_normal((k, c, 3, 3)) * 0.2).astype("float32")
    x = te.placeholder(x_np.shape, "float32", "x")
    u = te.placeholder((tile + 2, tile + 2, c, k), "float32", "u")
    func = te.create_prim_func([x, u, winograd_conv2d_te(x, u, tile)])
    used, scheduled = schedule_primfunc(func, X86, None if rule == "WinogradConv2d" else [Fallback()])
    assert used == rule
    got = _run(scheduled, [x_np, transform_weight(w_np, tile)], (batch, k, size, size))
    ref = torch.nn.functional.conv2d(torch.from_numpy(x_np), torch.from_numpy(w_np), padding=1).numpy()
    truth = torch.nn.functional.conv2d(torch.from_numpy(x_np).double(), torch.from_numpy(w_np).double(), padding=1)
    assert_close(got, ref, truth=truth)
    if rule == "WinogradConv2d":
        text = scheduled.script()
        assert "T.parallel" in text and "T.vectorized" in text


class _ResidualBlock(torch.nn.Module):
    """conv-BN-relu-conv-BN + x, relu: the epilogue (BN affine, residual add, relu) is
    fused into the Winograd kernel's output stage."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_residual_block_matches_eager(batch):
    torch.manual_seed(0)
    model = _ResidualBlock(48).eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(batch, 48, 28, 28)
    graph = graphopt.optimize(model, (x,), "default")
    mod = scheduled_module(lower_to_relax(graph), resolve_target("x86"), fusion=fusion_mode(graph, None))
    winograd = [f for f in mod.functions.values()
                if isinstance(f, tvm.tirx.PrimFunc) and "winograd_bgemm" in f.script()]
    # the relu: targets/frontend/converters.py's NaN-keeping "clamp" kernel, inlined into the output transform
    assert len(winograd) == 2 and all(any(t in f.script() for t in ("T_relu", "T_maximum", "T_where", "clamp"))
                                      for f in winograd), "both convs, each with its epilogue"
    module = graphopt.compile(model, "x86", (x,))
    assert_matches_eager(module(x), model, (x,))
