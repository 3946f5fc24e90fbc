"""ATen ops TVM's importer lacks compile and match eager: by a graphopt converter (amax/amin,
padded convolutions, var_mean) or by PyTorch's core-ATen decomposition applied to just that op
before lowering (diff, where with a scalar)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.testing import assert_matches_eager


def compile_and_compare(model: nn.Module, *inputs: torch.Tensor, pipeline: str = "default") -> None:
    model = model.eval()
    compiled = graphopt.compile(model, "x86", inputs, pipeline=pipeline)
    assert_matches_eager(compiled(*inputs), model, inputs)


class Diff(nn.Module):
    def forward(self, x):
        # the causal-mask idiom of transformers' GPT-2 / Llama code, and a plain diff
        return torch.diff(x, dim=-1), torch.diff(x, n=2, dim=0), torch.diff(x, dim=1, prepend=x[:, :1])


def test_diff():
    compile_and_compare(Diff(), torch.randn(4, 6))


class WhereScalar(nn.Module):
    def forward(self, x):
        positive = x > 0
        return (torch.where(positive, x, 0.5),  # ScalarOther (T5's attention bias)
                torch.where(positive, -1.0, x),  # ScalarSelf
                torch.where(positive, 1.0, 0.0))  # Scalar


def test_where_with_scalars():
    compile_and_compare(WhereScalar(), torch.randn(3, 5))


class AmaxAmin(nn.Module):
    def forward(self, x):
        return (torch.amax(x, dim=(1, 3)), torch.amin(x, dim=1, keepdim=True), torch.amax(x, dim=-1),
                torch.amin(x, dim=[]))


def test_amax_amin_match_eager_and_propagate_nan():
    x = torch.randn(2, 3, 4, 5)
    x[0, 1, 2, 3] = float("nan")
    compile_and_compare(AmaxAmin(), x)


def test_amax_of_integers():
    compile_and_compare(AmaxAmin(), torch.randint(-50, 50, (2, 3, 4, 5), dtype=torch.int32))


@pytest.mark.parametrize("padding,kernel,dilation", [("same", 3, 1), ("same", 4, 1), ("same", 3, 2),
                                                     ("valid", 3, 1)])
def test_conv2d_string_padding(padding, kernel, dilation):
    model = nn.Sequential(nn.Conv2d(3, 8, kernel, padding=padding, dilation=dilation), nn.ReLU(),
                          nn.Conv2d(8, 4, 2, padding=padding, bias=False))
    compile_and_compare(model, torch.randn(2, 3, 12, 12))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv1d_and_conv3d_string_padding(padding):
    compile_and_compare(nn.Conv1d(3, 5, 4, padding=padding), torch.randn(2, 3, 16), pipeline="fold")
    compile_and_compare(nn.Conv3d(2, 3, (2, 3, 3), padding=padding), torch.randn(1, 2, 5, 6, 6), pipeline="fold")


class VarMean(nn.Module):
    def forward(self, x):
        var, mean = torch.var_mean(x, dim=1, keepdim=True)
        unbiased_var, all_mean = torch.var_mean(x, dim=(0, 2), correction=0)
        return var, mean, unbiased_var, all_mean


def test_var_mean():
    compile_and_compare(VarMean(), torch.randn(3, 4, 5))


class MaskFromNewOnes(nn.Module):
    """transformers' BERT builds its padding mask as ``ids.new_ones((), dtype=torch.bool) & ...`` from
    integer tensors: the result is a bool mask, which attention applies as a mask, not as a bias."""

    def forward(self, q, k, v, keep):
        mask = keep.new_ones((), dtype=torch.bool) & keep.bool()[:, None, None, :]
        offsets = keep.new_zeros((2, keep.shape[1]), dtype=torch.float32) + 0.5
        attended = nn.functional.scaled_dot_product_attention(q, k, v, mask.expand(-1, -1, q.shape[2], -1))
        return attended, mask, offsets


def test_new_ones_and_new_zeros_take_the_dtype_they_are_given():
    keep = torch.ones(1, 9, dtype=torch.long)
    keep[0, 6:] = 0
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    compile_and_compare(MaskFromNewOnes(), q, k, v, keep, pipeline="fold")


class LoopKernels(nn.Module):
    """Ops whose TOPI kernels are plain loops without compute blocks (scan, sort, top-k, scatter),
    next to a convolution whose packed weights the build splits out of its kernel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x, index, src, cells):
        y = self.conv(x).flatten(2)  # (1, 8, 36)
        ordered, order = torch.sort(y, dim=-1, descending=True)
        top = torch.topk(y, 3, dim=-1)
        low, low_at = torch.min(y, dim=-1)
        rows = y[0]
        scattered = rows.scatter(1, index, src)
        put = torch.index_put(rows, (cells[:, 0], cells[:, 1]), src[:3, 0])
        return torch.cumsum(ordered, dim=-1), order, top.values, top.indices, low, low_at, scattered, put


@pytest.mark.parametrize("pipeline", ["default", "fold"])
def test_sort_topk_cumsum_min_scatter_and_index_put_build_next_to_a_convolution(pipeline):
    index = torch.stack([torch.randperm(36)[:3] for _ in range(8)])
    cells = torch.tensor([[0, 5], [3, 7], [7, 35]])
    compile_and_compare(LoopKernels(), torch.randn(1, 4, 6, 6), index, torch.randn(8, 3), cells, pipeline=pipeline)


class MaskPositions(nn.Module):
    def forward(self, mask):
        # transformers' position ids from a padding mask: a running count of the kept tokens
        return torch.cumsum(mask, -1), (torch.cumsum(mask, -1) <= 3) & mask, torch.cumsum(mask.int(), 0)


def test_cumsum_of_a_mask_counts_in_int64():
    mask = torch.tensor([[True] * 10 + [False] * 6, [True] * 4 + [False] * 12])
    compile_and_compare(MaskPositions(), mask)


class IndexCopy(nn.Module):
    def forward(self, cache, rows, at, one, one_at):
        # a static KV cache's update: new positions written along the sequence dim
        return cache.index_copy(2, at, rows), cache.index_copy(0, one_at, one)


def test_index_copy_writes_slices_along_a_dim_and_checks_its_indices():
    from graphopt.errors import IndexOutOfRangeError

    cache, rows, one = torch.randn(2, 3, 8, 4), torch.randn(2, 3, 3, 4), torch.randn(1, 3, 8, 4)
    at, one_at = torch.tensor([5, 0, 2]), torch.tensor([1])
    compile_and_compare(IndexCopy(), cache, rows, at, one, one_at)
    compiled = graphopt.compile(IndexCopy().eval(), "x86", (cache, rows, at, one, one_at))
    with pytest.raises(IndexOutOfRangeError, match="index_copy"):
        compiled(cache, rows, torch.tensor([5, 8, 2]), one, one_at)


class ScaledBySequenceLength(nn.Module):
    def forward(self, x, ids):
        n = x.shape[1]
        return x * n, x / n, n - x, ids + n  # a size in tensor arithmetic, float and integer


def test_a_dynamic_size_in_tensor_arithmetic_takes_the_tensors_dtype():
    from torch.export import Dim

    seq = Dim("seq", max=64)
    model, x, ids = ScaledBySequenceLength().eval(), torch.randn(2, 9), torch.randint(0, 9, (2, 9))
    compiled = graphopt.compile(model, "x86", (x, ids), dynamic_shapes=({1: seq}, {1: seq}))
    for n in (3, 40):
        x, ids = torch.randn(2, n), torch.randint(0, 9, (2, n))
        assert_matches_eager(compiled(x, ids), model, (x, ids))
