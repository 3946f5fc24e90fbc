"""Which ATen ops the TVM backend lowers.

* the sweep over ATen's core op set (``torch.Tag.core``): each op is converted by a converter,
  decomposed by PyTorch's core decomposition before lowering, or unsupported — and the
  unsupported ones are exactly the list below (backward, random, FFT and out= ops, and a few
  scatter/reduction forms), so a new gap shows up here first;
* ops that HF/timm/torchvision models use compile and match eager;
* what stays unsupported fails with UnsupportedOpError naming the op and the user's line, and
  ``graphopt inspect --support`` lists it before any build.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.errors import UnsupportedOpError
from graphopt.targets.frontend.support import core_aten_support, graph_support
from graphopt.testing import assert_matches_eager

UNSUPPORTED_CORE_OPS = {
    "aten._adaptive_avg_pool2d_backward.default", "aten._cdist_forward.default", "aten._embedding_bag.default",
    "aten._fft_c2r.default", "aten._fft_r2c.default", "aten._native_batch_norm_legit.default",
    "aten._pdist_forward.default", "aten.atan2.out", "aten.avg_pool2d_backward.default",
    "aten.convolution_backward.default", "aten.empty_strided.default", "aten.masked_scatter.default",
    "aten.max_pool2d_with_indices_backward.default", "aten.nonzero.default", "aten.rand.default",
    "aten.randperm.default", "aten.resize_.default", "aten.scatter_add.default", "aten.scatter_reduce.two",
    "aten.sym_numel.default",
    "aten.sym_storage_offset.default",
}


def test_core_aten_sweep_lists_every_core_op():
    support = core_aten_support()
    assert len(support) > 150 and set(support.values()) <= {"converted", "decomposed", "unsupported"}
    for op in ("aten.convolution.default", "aten.amax.default", "aten.amin.default",
               "aten.min.dim", "aten.any.default", "aten.prod.dim_int", "aten.div.Scalar_mode"):
        assert support[op] == "converted", op
    assert {op for op, s in support.items() if s == "unsupported"} == UNSUPPORTED_CORE_OPS


class Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


x4 = lambda *shape: torch.randn(*shape)  # noqa: E731

COMMON_OPS = {
    "erf": (lambda x: torch.erf(x), (x4(3, 8),)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), (x4(3, 8),)),
    "cumsum": (lambda x: torch.cumsum(x, dim=1), (x4(3, 8),)),
    "topk": (lambda x: torch.topk(x, 3, dim=-1), (x4(3, 8),)),
    "sort": (lambda x: torch.sort(x, dim=-1, descending=True), (x4(3, 8),)),
    "argmax": (lambda x: torch.argmax(x, dim=1), (x4(3, 8),)),
    "min_dim": (lambda x: torch.min(x, dim=1), (x4(3, 8),)),
    "masked_fill": (lambda x: x.masked_fill(x > 0.5, -1e4), (x4(3, 8),)),
    "roll": (lambda x: torch.roll(x, shifts=2, dims=1), (x4(3, 8),)),
    "unfold": (lambda x: F.unfold(x, kernel_size=2, stride=2), (x4(1, 2, 6, 6),)),
    "pixel_shuffle": (lambda x: F.pixel_shuffle(x, 2), (x4(1, 8, 3, 3),)),
    "upsample_nearest": (lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), (x4(1, 2, 4, 4),)),
    "upsample_bilinear": (lambda x: F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=False),
                          (x4(1, 2, 4, 4),)),
    "full_like": (lambda x: x + torch.full_like(x, 3.0), (x4(3, 8),)),
    "bitwise": (lambda a: (a & 6) | (a ^ 3), (torch.randint(0, 16, (3, 8)),)),
    "logical": (lambda x: torch.logical_and(x > 0, torch.logical_not(x > 1)) | torch.logical_xor(x > 0, x < -1),
                (x4(3, 8),)),
    "group_norm": (nn.GroupNorm(2, 4), (x4(2, 4, 5, 5),)),
    "var_mean": (lambda x: torch.var_mean(x, dim=-1, keepdim=True), (x4(3, 8),)),
    "any": (lambda x: torch.any(x > 2.5), (x4(3, 8),)),
    "prod": (lambda x: torch.prod(x, dim=1), (x4(3, 4),)),
    "div_floor_scalar": (lambda x: torch.div(x, 3, rounding_mode="floor"), (x4(3, 8) * 10,)),
    "div_trunc_int": (lambda a: torch.div(a, 4, rounding_mode="trunc"), (torch.randint(-20, 20, (3, 8)),)),
}


# Ops that lower but do not build yet, each for the reason given; strict, so a fix shows up as XPASS.
KNOWN_BUILD_FAILURES = {
    "unfold": "im2col's decomposition indexes with broadcast index tensors, which the importer's index.Tensor "
              "lowers to a tensor of the wrong rank",
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUILD_FAILURES[n]))
                                  if n in KNOWN_BUILD_FAILURES else n for n in sorted(COMMON_OPS)])
def test_common_op_compiles_and_matches_eager(name):
    fn, inputs = COMMON_OPS[name]
    model = (fn if isinstance(fn, nn.Module) else Op(fn)).eval()
    compiled = graphopt.compile(model, "x86", inputs, pipeline="fold")
    assert_matches_eager(compiled(*inputs), model, inputs)


class CumMax(nn.Module):
    def forward(self, x):
        return torch.cummax(x, dim=1).values  # no converter, no core decomposition


def test_unsupported_op_names_the_op_and_the_users_line():
    with pytest.raises(UnsupportedOpError, match=r"aten\.cummax\.default.*test_op_support\.py"):
        graphopt.compile(CumMax(), "x86", (torch.randn(2, 5),))


def test_graph_support_sorts_ops_into_converted_decomposed_unsupported():
    class Mixed(nn.Module):
        def forward(self, x):
            y = torch.diff(torch.relu(x), dim=-1)
            return torch.cummax(y, dim=1).values

    rows = {r.op: r for r in graph_support(graphopt.capture(Mixed(), (torch.randn(2, 5),)))}
    assert rows["aten.relu.default"].status == "converted"
    assert rows["aten.diff.default"].status == "decomposed"
    assert rows["aten.cummax.default"].status == "unsupported"
    assert "test_op_support.py" in rows["aten.cummax.default"].source


def test_inspect_support_lists_unsupported_ops_with_their_line(tmp_path, capsys):
    from graphopt.cli import main

    model_file = tmp_path / "model.py"
    model_file.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.cummax(torch.diff(x), dim=1).values\n"
        "def make():\n"
        "    return M()\n")
    code = main(["inspect", f"{model_file}:make", "--input-shape", "2,6", "--support", "--pipeline", "fold",
                 "--picture", str(tmp_path / "g.dot")])
    out = capsys.readouterr().out
    assert code == 1
    assert "1 unsupported" in out and "1 decomposed" in out
    line = next(ln for ln in out.splitlines() if "aten.cummax.default" in ln)
    assert "unsupported" in line and "model.py" in line and "line 4" in line
