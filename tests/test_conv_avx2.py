"""The direct conv kernel's register tile on 16-register (AVX2) and 32-register (AVX-512) targets.

With 12 accumulators, a 2-vector channel tile leaves room for 6 pixels of a row; a 7- or
14-wide row (resnet's and mobilenet's last stages) has no divisor near 6, so such a tile
would shrink to 1-2 pixels, too few accumulators to hide the FMA latency.  One vector of
channels x 7 pixels is taken instead; AVX-512, with room for 7 pixels x 2 vectors, keeps
its 2-vector tile.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TVM_NUM_THREADS", "2")
tvm = pytest.importorskip("tvm")
torch = pytest.importorskip("torch")
from tvm import relax  # noqa: E402

from graphopt.targets.cpu.schedules import cpu_layout_passes, schedule_primfunc  # noqa: E402
from graphopt.targets.cpu.schedules.base import analyze  # noqa: E402
from graphopt.targets.cpu.schedules.conv2d import Conv2dNCHW  # noqa: E402
from graphopt.testing import assert_close  # noqa: E402

AVX512 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids", "num-cores": 2})
AVX2 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "num-cores": 2})

rng = np.random.default_rng(0)


def _conv_func(x_shape, w, padding, target):
    """The fused conv + bias + relu PrimFunc of a one-conv module, weight relaid out as HWIO."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    b = relax.Var("b", relax.TensorType((1, w.shape[0], 1, 1), "float32"))
    with bb.function("main", [x, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=padding))
            out = bb.emit_output(relax.op.nn.relu(relax.op.add(y, b)))
        bb.emit_func_output(out)
    seq = [*cpu_layout_passes(target), relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
           relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    mod = tvm.transform.Sequential(seq)(bb.get())
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


# (input channels, output channels, rows = columns, kernel): a 3x3 and a 1x1 conv whose rows
# are 7 and 14 pixels wide.
SHAPES = [pytest.param(16, 64, 7, 3, id="3x3-at-7x7"), pytest.param(32, 32, 14, 1, id="1x1-at-14x14")]


@pytest.mark.parametrize("c, f, hw, k", SHAPES)
@pytest.mark.parametrize("target, channels, pixels", [
    pytest.param(AVX2, 8, 7, id="avx2"),  # 1 vector x 7 pixels: 7 of 12 accumulators
    pytest.param(AVX512, 32, 7, id="avx512"),  # 2 vectors x 7 pixels: 14 of 24
])
def test_register_tile_keeps_enough_accumulators_on_short_rows(c, f, hw, k, target, channels, pixels):
    w = rng.standard_normal((f, c, k, k), dtype=np.float32)
    func = _conv_func((1, c, hw, hw), w, k // 2, target)
    tile = Conv2dNCHW().match(analyze(func), target).tile
    assert (tile.channels, tile.pixels) == (channels, pixels)

    rule, scheduled = schedule_primfunc(func, target)
    assert rule == "Conv2dNCHW"
    x = rng.standard_normal((1, c, hw, hw), dtype=np.float32)
    b = rng.standard_normal((1, f, 1, 1), dtype=np.float32)
    lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target)
    out = tvm.runtime.tensor(np.zeros((1, f, hw, hw), np.float32))
    w_hwio = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, w_hwio, b)], out)

    def eager(x, w, b):
        return torch.relu(torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), padding=k // 2)
                          + torch.tensor(b)).numpy()

    truth = eager(*(np.asarray(a, np.float64) for a in (x, w, b)))
    assert_close(out.numpy(), eager(x, w, b), "algebraic", truth=truth)
