"""A conv and the depthwise conv it feeds become one kernel when the tensor between them
would not stay in L2 (targets/cpu/schedules/blocked.py, conv_depthwise.py).

Specification: such a pair is one kernel in ``main`` (no tensor between them at all), one
parallel region whose tasks compute the rows of the intermediate they read into a task-local
buffer; the result matches eager PyTorch at every edge of the image (the windows are clipped
there), at stride 1 and 2, for 1x1 and padded 3x3 producers, at batch > 1; smaller tensors
keep two kernels.
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
from graphopt.targets.cpu.schedules.blocked import L2_BYTES  # noqa: E402
from graphopt.testing import assert_matches_eager  # noqa: E402

SPEC = resolve_target("x86")
LANES = simd_lanes(SPEC.tvm_target())


def _block(c_in: int, hidden: int, stride: int, producer_kernel: int = 1, producer_stride: int = 1):
    """producer conv (+BN, ReLU6) -> depthwise 3x3 (+BN, ReLU6) -> 1x1 project."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(c_in, hidden, producer_kernel, producer_stride, producer_kernel // 2, bias=False),
        nn.BatchNorm2d(hidden), nn.ReLU6(),
        nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
        nn.Conv2d(hidden, 8, 1)).eval()
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
    return m


def _kernels(m, x):
    g = graphopt.optimize(m, (x,), "fold,fuse")
    mod = scheduled_module(lower_to_relax(g), SPEC, fusion=fusion_mode(g, None))
    return mod, tir_calls(mod)


@pytest.mark.parametrize("c_in, hidden, size, stride, k, ps", [
    (16, 6 * LANES, 56, 2, 1, 1),   # expand 1x1 -> depthwise /2 (mobilenet_v2's second block)
    (8, 6 * LANES, 60, 1, 1, 1),    # stride 1: 60 rows, tasks of 12 (a window of 14 rows)
    (3, 2 * LANES, 182, 1, 3, 2),   # a padded 3x3 /2 producer (mobilenet_v2's stem), 91x91
])
def test_big_intermediate_makes_one_kernel_matching_eager(c_in, hidden, size, stride, k, ps):
    m, x = _block(c_in, hidden, stride, k, ps), torch.randn(1, c_in, size, size)
    out = (size + 2 * (k // 2) - k) // ps + 1
    assert 4 * hidden * out * out >= L2_BYTES
    mod, calls = _kernels(m, x)
    # chain + project: the intermediate never appears between kernels
    assert len(calls) == 2, [name for name, _ in calls]
    assert all(len(var.ty.shape.values) == 4 for _, var in calls)
    chain = mod[calls[0][0]].script()
    # one parallel region; the conv's sums are a register tile
    assert chain.count("T.parallel(") == 1, chain
    assert any('scope="local"' in ln and "conv2d_nchw" in ln for ln in chain.splitlines()), chain

    got = graphopt.compile(m, "x86", (x,))(x)
    assert_matches_eager(got, m, (x,))


def test_chain_at_batch_2_matches_eager():
    m, x = _block(16, 6 * LANES, 2), torch.randn(2, 16, 40, 40)
    assert len(_kernels(m, x)[1]) == 2
    assert_matches_eager(graphopt.compile(m, "x86", (x,))(x), m, (x,))


def test_small_intermediate_keeps_two_kernels():
    m, x = _block(16, 2 * LANES, 2), torch.randn(1, 16, 28, 28)  # 32x28x28: 100 KB
    _, calls = _kernels(m, x)
    assert len(calls) == 3, [name for name, _ in calls]


def test_chain_schedules_for_aarch64_neon():
    # 4-lane NEON vectors: the same chain, blocked by 4 channels, still one parallel region
    spec = resolve_target("arm64")
    lanes = simd_lanes(spec.tvm_target())
    m, x = _block(8, 16 * lanes, 2), torch.randn(1, 8, 64, 64)
    g = graphopt.optimize(m, (x,), "fold,fuse")
    mod = scheduled_module(lower_to_relax(g), spec, fusion=fusion_mode(g, None))
    calls = tir_calls(mod)
    assert len(calls) == 2, [name for name, _ in calls]
    assert mod[calls[0][0]].script().count("T.parallel(") == 1
