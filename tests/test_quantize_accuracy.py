"""Accuracy of int8 on real data (digits) and, on the big reference models, compiled int8 against
eager float on the int8 rung (SQNR >= 20 dB, docs/TOLERANCES.md)."""

import pytest
import torch

import graphopt
from graphopt.models import REFERENCE_MODELS, accuracy, digits_cnn, digits_mlp, load_digits_split, train_digits
from graphopt.passes.quantize.fallback import integer_target
from graphopt.testing import assert_close


@pytest.mark.parametrize("build,image", [(digits_mlp, False), pytest.param(digits_cnn, True, marks=pytest.mark.slow)],
                         ids=["mlp", "cnn"])
def test_digits_static_int8_compiled_within_half_a_point(build, image):
    model, fp32_acc = train_digits(build())
    xtr, _, xte, yte = load_digits_split(image=image)
    # the whole test set as one static batch: the int8 kernels are sized at build time (with a
    # dynamic batch the layers would stay in float, see passes/quantize/fallback.py)
    cm = graphopt.compile(model, "x86", (xte,), "fold,quantize{mode=int8}", calibration_data=[xtr[:256]])
    report = cm.manifest["quantize"]
    if integer_target("x86").dot is None:  # no dot-product instruction: int8 would lose to float
        assert report["quantized"] == []
    else:
        assert report["float"] == [], report["float_why"]
    int8_acc = accuracy(lambda x: cm(x), xte, yte)
    assert int8_acc >= fp32_acc - 0.005, (fp32_acc, int8_acc)


def _assert_compiled_int8_on_the_int8_rung(name, pipeline):
    ref = REFERENCE_MODELS[name]
    model = ref.build()
    calib = [ref.example_input(1, seed=s) for s in range(1, 9)]
    held_out = [ref.example_input(1, seed=s) for s in range(100, 103)]
    module = graphopt.compile(model, "x86", (calib[0],), pipeline, calibration_data=calib)
    for x in held_out:
        with torch.no_grad():
            expected = model(x)
        assert_close(module(x), expected, "int8")


@pytest.mark.slow
def test_resnet18_static_int8_compiled_on_the_int8_rung():
    _assert_compiled_int8_on_the_int8_rung("resnet18", "fold,quantize{mode=int8}")


@pytest.mark.slow
def test_mobilenet_v2_static_int8_compiled_on_the_int8_rung():
    _assert_compiled_int8_on_the_int8_rung("mobilenet_v2", "fold,quantize{mode=int8}")


@pytest.mark.slow
def test_transformer_dynamic_int8_compiled_on_the_int8_rung():
    _assert_compiled_int8_on_the_int8_rung("transformer", "fold,quantize{mode=dynamic}")


class _MobileBlocks(torch.nn.Module):
    """The int8 corners of MobileNetV3, ShuffleNetV2, RegNetY and EfficientNet in one small
    net: hardswish before a quantized conv, a squeeze-excitation gate (hardsigmoid x
    activation), a depthwise and a grouped conv, a channel shuffle and a concat of branches."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.squeeze, self.excite = torch.nn.Conv2d(16, 8, 1), torch.nn.Conv2d(8, 16, 1)
        self.grouped = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.branch = torch.nn.Conv2d(16, 16, 1)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.nn.functional.hardswish(self.stem(x))
        y = self.depthwise(x)
        gate = torch.nn.functional.hardsigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        y = y * gate
        n, c, h, w = y.shape
        y = y.reshape(n, 4, c // 4, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        y = torch.cat([torch.relu(self.grouped(y)), self.branch(x)], dim=1)
        return self.head(y.mean((2, 3)))


def test_compiled_int8_mobile_blocks_match_their_fake_quant_graph():
    # every conv quantized (fallback=false): the depthwise and grouped ones lower to the
    # generic integer form, the rest to the dot-product kernels where the host has them
    torch.manual_seed(0)
    model = _MobileBlocks().eval()
    calib = [torch.randn(1, 3, 12, 12) for _ in range(4)]
    x = torch.randn(1, 3, 12, 12)
    cm = graphopt.compile(model, "x86", (x,), "fold,quantize{mode=int8,fallback=false},fuse", calibration_data=calib)
    assert cm.manifest["quantize"]["float"] == [] and len(cm.manifest["quantize"]["quantized"]) == 7
    assert_close(cm(x), cm.graph.forward(x), "int8", fake_quant=True, what="against its fake-quant graph")
