"""fp16/bf16: conv and linear build with half weights and match eager fp32 at the 1e-2 rung."""

import pytest
import torch

import graphopt
from graphopt.models import cnn, transformer


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
@pytest.mark.parametrize("build", [cnn, transformer], ids=["cnn", "transformer"])
def test_half_modes_compile_and_match_eager(mode, build):
    model = build()
    x = torch.randn(1, 3, 32, 32) if build is cnn else torch.randn(1, 16, 256)
    module = graphopt.compile(model, "x86", (x,), f"fold,quantize{{mode={mode}}},fuse")
    out = module(x)
    with torch.no_grad():
        ref = model(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 1e-2 * max(scale, 1.0)
