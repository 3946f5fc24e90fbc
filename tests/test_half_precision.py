"""fp16/bf16: conv and linear build with half weights and match eager fp32 on the half rung."""

import pytest
import torch

import graphopt
from graphopt.models import cnn, transformer
from graphopt.testing import assert_matches_eager


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
@pytest.mark.parametrize("build", [cnn, transformer], ids=["cnn", "transformer"])
def test_half_modes_compile_and_match_eager(mode, build):
    model = build()
    x = torch.randn(1, 3, 32, 32) if build is cnn else torch.randn(1, 16, 256)
    module = graphopt.compile(model, "x86", (x,), f"fold,quantize{{mode={mode}}},fuse")
    assert_matches_eager(module(x), model, (x,), "half")
