"""Compiled models keep PyTorch's NaN / inf semantics.

LLVM lowers TVM's ``max``/``min`` (relu as ``max(x, 0)``, clamps, the max reduction of a
pool) to maxnum/minnum, which return the *non*-NaN operand: a NaN input silently became a
number. targets/frontend/converters.py replaces those lowerings by compare-and-select forms and a max pool
with a NaN-propagating reduction (1-d, 2-d, 3-d and adaptive). Each case feeds NaN, +inf and -inf through one op and
asserts the compiled output has the same NaN/inf pattern and the same values as eager.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.testing import assert_matches_eager

NAN, INF = float("nan"), float("inf")


class Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=-1)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.clamp(x, -0.5, 0.5)


class ClampMin(nn.Module):
    def forward(self, x):
        return torch.clamp_min(x, 0.1)


class ClampMax(nn.Module):
    def forward(self, x):
        return torch.clamp_max(x, 0.1)


class MaximumFlipped(nn.Module):
    """NaN on either side: the flip puts the input's NaN on the right-hand side of some pairs."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x, x.flip(-1))


class Reduce(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x)


class PoolValues(nn.Module):
    """A max pool called with return_indices=True whose indices are dropped (max_poolNd_with_indices)."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return self.pool(x, 2, return_indices=True)[0]


def _with_specials(shape: tuple[int, ...]) -> torch.Tensor:
    """Random values with a NaN, a +inf and a -inf in different rows / windows."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    flat = x.view(-1)
    flat[0], flat[flat.numel() // 2 + 3], flat[-1] = NAN, INF, -INF
    return x


CASES = {
    "maxpool": (lambda: nn.MaxPool2d(2), (1, 2, 6, 6)),
    "maxpool_padded_ceil": (lambda: nn.MaxPool2d(3, 2, 1, ceil_mode=True), (2, 3, 8, 8)),
    "maxpool1d": (lambda: nn.MaxPool1d(2), (1, 2, 8)),
    "maxpool1d_padded_ceil": (lambda: nn.MaxPool1d(3, 2, 1, ceil_mode=True), (2, 3, 9)),
    "maxpool3d": (lambda: nn.MaxPool3d(2), (1, 2, 4, 4, 4)),
    "maxpool3d_padded_ceil_dilated": (lambda: nn.MaxPool3d(3, 2, (1, 0, 1), dilation=(1, 2, 1), ceil_mode=True),
                                      (1, 2, 5, 7, 5)),
    "adaptive_maxpool1d": (lambda: nn.AdaptiveMaxPool1d(3), (2, 3, 8)),
    "adaptive_maxpool2d": (lambda: nn.AdaptiveMaxPool2d((2, 3)), (1, 2, 6, 7)),
    "adaptive_maxpool2d_global": (lambda: nn.AdaptiveMaxPool2d(1), (1, 2, 5, 5)),
    "adaptive_maxpool3d": (lambda: nn.AdaptiveMaxPool3d((2, 3, 2)), (1, 2, 5, 4, 3)),
    "maxpool2d_with_indices": (lambda: PoolValues(nn.functional.max_pool2d), (1, 2, 6, 6)),
    "maxpool3d_with_indices": (lambda: PoolValues(nn.functional.max_pool3d), (1, 2, 4, 4, 4)),
    "clamp_min": (lambda: ClampMin(), (2, 8)),
    "clamp_max": (lambda: ClampMax(), (2, 8)),
    "maximum": (lambda: MaximumFlipped(torch.maximum), (2, 8)),
    "minimum": (lambda: MaximumFlipped(torch.minimum), (2, 8)),
    "max_other": (lambda: MaximumFlipped(torch.max), (2, 8)),
    "max_all": (lambda: Reduce(torch.max), (2, 8)),
    "min_all": (lambda: Reduce(torch.min), (2, 8)),
    "relu": (lambda: nn.ReLU(), (2, 8)),
    "relu6": (lambda: nn.ReLU6(), (2, 8)),
    "clamp": (lambda: Clamp(), (2, 8)),
    "softmax": (lambda: Softmax(), (4, 8)),
    "linear": (lambda: nn.Linear(8, 4), (3, 8)),
    "conv": (lambda: nn.Conv2d(2, 3, 3, padding=1), (1, 2, 6, 6)),
}


@pytest.mark.parametrize("pipeline", ["none", "fuse"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_nan_and_inf_match_eager(case, pipeline):
    make, shape = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    x = _with_specials(shape)
    with torch.no_grad():
        assert model(x).isnan().any()  # the case really exercises NaN
    compiled = graphopt.compile(model, "x86", (x,), pipeline)
    # the algebraic rung: NaN, +inf and -inf in the same places as eager, then the finite values
    assert_matches_eager(compiled(x), model, (x,))


def test_maxpool_nan_in_every_position_of_a_window():
    # a reduction that drops NaN can still return it when the NaN comes last: try each tap
    model = nn.MaxPool2d(2).eval()
    compiled = graphopt.compile(model, "x86", (torch.zeros(1, 1, 2, 2),), "none")
    for i in range(4):
        x = torch.arange(4.0).reshape(1, 1, 2, 2)
        x.view(-1)[i] = NAN
        assert torch.isnan(compiled(x)).all(), i
    x = torch.tensor([[[[-INF, 1.0], [INF, 2.0]]]])
    assert float(compiled(x)) == INF


def test_maxpool_stays_one_kernel_and_matches_the_pooling_schedule():
    from tvm import tirx

    from graphopt.passes.fuse import expected_kernels
    from graphopt.targets.build import kernel_launches
    from graphopt.targets.frontend.lower import lower_to_relax
    from graphopt.targets.registry import resolve_target
    from graphopt.targets.cpu.schedules import schedule_primfunc

    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    x = torch.randn(1, 2, 8, 8)
    spec = resolve_target("x86")
    fused = graphopt.optimize(model, (x,), "fuse")
    assert len(kernel_launches(lower_to_relax(fused), spec, "graph")) == expected_kernels(fused)
    # op by op, the pool is still one launch (no encode/decode kernels around it)
    launches = kernel_launches(lower_to_relax(graphopt.optimize(model, (x,), "none")), spec, "none")
    assert launches[-1][0].startswith("max_pool2d") and launches[-2][0] == "clamp", launches
    mod = lower_to_relax(graphopt.optimize(nn.MaxPool2d(3, 2, 1).eval(), (x,), "none"))
    pools = [f for g, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
    assert len(pools) == 1
    rule, _ = schedule_primfunc(pools[0], spec.tvm_target())
    assert rule == "Pooling"


@pytest.mark.parametrize("pool", [nn.functional.adaptive_max_pool2d, nn.functional.max_pool2d])
def test_pool_indices_are_unsupported_not_wrong(pool):
    # the backend computes only the pooled values (TVM's own max_pool2d_with_indices returned float
    # zeros as indices); a graph reading the indices must say so
    from graphopt.errors import UnsupportedOpError

    class WithIndices(nn.Module):
        def forward(self, x):
            values, indices = pool(x, 2, return_indices=True)
            return values, indices

    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(UnsupportedOpError, match="indices output is used"):
        graphopt.compile(WithIndices().eval(), "x86", (x,), "none")


def test_no_max_or_min_lowering_of_the_importer_is_left_unfixed():
    # every max/min op the importer lowers to maxnum/minnum is replaced by a NaN-propagating converter
    from graphopt.targets.frontend.lower import EXTRA_CONVERTERS, FIX_CONVERTERS, _load_converter_modules

    _load_converter_modules()
    assert {"max_pool1d.default", "max_pool2d.default", "max_pool3d.default", "max_pool2d_with_indices.default",
            "max_pool3d_with_indices.default", "max.default", "min.default", "maximum.default", "minimum.default",
            "clamp_min.default", "clamp_max.default"} <= set(FIX_CONVERTERS)
    assert {f"adaptive_max_pool{n}d.default" for n in (1, 2, 3)} <= set(EXTRA_CONVERTERS)
