"""A conv kernel hands the depthwise conv after it NCHW[L]c (targets/cpu/schedules/blocked.py).

Specification: in ``main`` the tensor between the two kernels becomes 5-D with the SIMD
width innermost, only for that pair and only where it pays (strided or short rows, or a
producer that is not a pixel-vectorized 1x1 conv); the producer's schedule stores whole
channel vectors, the depthwise one reads them in place (no unblocking or padding copy of
its input, the weight packed at compile time); the compiled model matches eager PyTorch.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("TVM_NUM_THREADS", "2")
tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
from graphopt.targets.build import fusion_mode, scheduled_module, tir_calls  # noqa: E402
from graphopt.targets.frontend.lower import lower_to_relax  # noqa: E402
from graphopt.targets.registry import resolve_target  # noqa: E402
from graphopt.targets.cpu.schedules import simd_lanes  # noqa: E402
from graphopt.testing import assert_matches_eager  # noqa: E402

SPEC = resolve_target("x86")
LANES = simd_lanes(SPEC.tvm_target())


class InvertedResidual(nn.Module):
    """mobilenet_v2's block: expand 1x1 -> depthwise 3x3 -> project 1x1 (+ residual)."""

    def __init__(self, c_in: int, hidden: int, stride: int, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.expand = nn.Sequential(nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Conv2d(hidden, c_in, 1)

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


def _model(c_in, hidden, stride, residual=False):
    torch.manual_seed(0)
    m = InvertedResidual(c_in, hidden, stride, residual).eval()
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
    return m


def _scheduled(m, x):
    g = graphopt.optimize(m, (x,), "fold,fuse")
    return scheduled_module(lower_to_relax(g), SPEC, fusion=fusion_mode(g, None))


def _shapes_between_kernels(mod):
    return [[int(d) for d in var.ty.shape.values] for _, var in tir_calls(mod)]


@pytest.mark.parametrize("hidden, size, stride", [
    (2 * LANES, 28, 2),   # strided rows
    (4 * LANES, 7, 1),    # rows shorter than two vectors
])
def test_depthwise_input_arrives_channel_blocked(hidden, size, stride):
    m, x = _model(8, hidden, stride), torch.randn(1, 8, size, size)
    mod = _scheduled(m, x)
    shapes = _shapes_between_kernels(mod)
    # expand writes NCHW[L]c; depthwise and project outputs stay NCHW
    assert shapes[0] == [1, hidden // LANES, size, size, LANES], shapes
    assert all(len(s) == 4 for s in shapes[1:]), shapes

    (expand_name, _), (dw_name, _) = tir_calls(mod)[:2]
    expand, dw = mod[expand_name].script(), mod[dw_name].script()
    # expand: the write-back stores channel vectors straight into the 5-D output
    store = next(ln for ln in expand.splitlines() if ln.strip().startswith("T.writes(") and "layout_transform" in ln)
    assert f"% T.int64({LANES})]" in store, store
    # depthwise: reads the 5-D input in place, the padding a bounds check on each load; its
    # only buffers are the register tile and the epilogue's (pixel, channel) tile that the
    # shuffle transpose reads (targets/cpu/transpose.py), and the weight arrives packed as
    # (rc, ry, rx, f)
    allocs = [ln for ln in dw.splitlines() if "T.sblock_alloc_buffer" in ln]
    assert len(allocs) == 2 and all('scope="local"' in a for a in allocs), allocs
    assert '"graphopt.transpose": 1' in dw
    assert "T.if_then_else" in dw
    weight = mod[dw_name].params[1]
    assert [int(d) for d in weight.shape] == [1, 3, 3, hidden], weight.shape

    got = graphopt.compile(m, "x86", (x,))(x)
    assert_matches_eager(got, m, (x,))


def test_wide_stride_one_rows_and_shared_tensors_stay_nchw():
    # wide stride-1 rows after a 1x1 conv (pixel-vectorized, NCHW for free) stay NCHW
    wide = _model(8, 2 * LANES, 1)
    x = torch.randn(1, 8, 64, 64)
    assert all(len(s) == 4 for s in _shapes_between_kernels(_scheduled(wide, x)))

    class TwoReaders(nn.Module):
        """The expand output also feeds a second op: its layout must not change."""

        def __init__(self):
            super().__init__()
            self.block = _model(8, 2 * LANES, 2)

        def forward(self, x):
            hidden = self.block.expand(x)
            return self.block.project(self.block.depthwise(hidden)), hidden.mean()

    m, x = TwoReaders().eval(), torch.randn(1, 8, 28, 28)
    assert all(len(s) == 4 for s in _shapes_between_kernels(_scheduled(m, x)) if s)
    got = graphopt.compile(m, "x86", (x,))(x)
    assert_matches_eager(got, m, (x,))


def test_wide_stride_one_rows_after_a_3x3_conv_arrive_blocked():
    # mobilenet_v2's stem: 3x3 stride-2 conv -> depthwise 3x3 stride 1 on wide rows.  The
    # conv's channel-vectorized tile is stored as it is instead of transposed to NCHW.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 2 * LANES, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * LANES), nn.ReLU6(),
                      nn.Conv2d(2 * LANES, 2 * LANES, 3, 1, 1, groups=2 * LANES, bias=False),
                      nn.BatchNorm2d(2 * LANES), nn.ReLU6(), nn.Conv2d(2 * LANES, 8, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    shapes = _shapes_between_kernels(_scheduled(m, x))
    assert shapes[0] == [1, 2, 32, 32, LANES], shapes
    assert_matches_eager(graphopt.compile(m, "x86", (x,))(x), m, (x,))


def test_blocked_layout_with_residual_block_matches_eager_at_batch_3():
    m, x = _model(LANES, 4 * LANES, 2), torch.randn(3, LANES, 14, 14)
    got = graphopt.compile(m, "x86", (x,))(x)
    assert_matches_eager(got, m, (x,))
    m, x = _model(LANES, 4 * LANES, 1, residual=True), torch.randn(3, LANES, 14, 14)
    got = graphopt.compile(m, "x86", (x,))(x)
    assert_matches_eager(got, m, (x,))
