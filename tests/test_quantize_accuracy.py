"""Accuracy of int8 on real data (digits) and cosine similarity on the big reference models."""

import pytest
import torch

import graphopt
from graphopt.models import REFERENCE_MODELS, accuracy, digits_cnn, digits_mlp, load_digits_split, train_digits



def _cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("build,image", [(digits_mlp, False), pytest.param(digits_cnn, True, marks=pytest.mark.slow)],
                         ids=["mlp", "cnn"])
def test_digits_static_int8_compiled_within_half_a_point(build, image):
    model, fp32_acc = train_digits(build())
    xtr, _, xte, yte = load_digits_split(image=image)
    g = graphopt.capture(model, (xte[:2],), dynamic_shapes="batch")
    cm = graphopt.compile(g, "x86", pipeline="fold,quantize{mode=int8}", calibration_data=[xtr[:256]])
    assert cm.graph.annotations["quantize"]["float"] == []
    int8_acc = accuracy(lambda x: cm(x), xte, yte)
    assert int8_acc >= fp32_acc - 0.005, (fp32_acc, int8_acc)


def _big(name, pipeline, compiled):
    ref = REFERENCE_MODELS[name]
    model = ref.build()
    calib = [ref.example_input(1, seed=s) for s in range(1, 9)]
    held_out = [ref.example_input(1, seed=s) for s in range(100, 103)]
    if compiled:
        run = graphopt.compile(model, "x86", (calib[0],), pipeline, calibration_data=calib)
        outs = [run(x) for x in held_out]
    else:
        q = graphopt.optimize(model, (calib[0],), pipeline, calibration_data=calib)
        outs = [q(x)[0] for x in held_out]
    with torch.no_grad():
        return min(_cosine(o, model(x)) for o, x in zip(outs, held_out))


@pytest.mark.slow
def test_resnet18_static_int8_compiled_cosine():
    assert _big("resnet18", "fold,quantize{mode=int8}", compiled=True) >= 0.99


@pytest.mark.slow
def test_mobilenet_v2_static_int8_cosine():
    assert _big("mobilenet_v2", "fold,quantize{mode=int8}", compiled=False) >= 0.99


@pytest.mark.slow
def test_transformer_dynamic_int8_cosine():
    assert _big("transformer", "fold,quantize{mode=dynamic}", compiled=False) >= 0.99
