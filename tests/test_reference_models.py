"""The five reference models, optimized and compiled for x86, match eager PyTorch.

Tolerance: the compiled-fp32 rung (rtol 1e-4, atol 1e-5) with the float64 fallback of
graphopt.testing.assert_matches_eager.
"""

import pytest

import graphopt
from graphopt.models import REFERENCE_MODELS
from graphopt.testing import assert_close, assert_matches_eager

FIVE = ["mlp", "cnn", "resnet18", "mobilenet_v2", "transformer"]


@pytest.mark.parametrize("name", FIVE)
def test_default_pipeline_keeps_outputs(name):
    ref = REFERENCE_MODELS[name]
    model, x = ref.build(), ref.example_input()
    graph = graphopt.optimize(model, (x,), "fold", verify=True)
    assert_close(graph(x), model(x), "algebraic")
    assert "_native_batch_norm_legit_no_training" not in graph.summary().op_counts


@pytest.mark.parametrize("name", FIVE)
def test_x86_build_matches_eager(name):
    ref = REFERENCE_MODELS[name]
    model, x = ref.build(), ref.example_input()
    module = graphopt.compile(model, "x86", (x,))
    out = module(x)
    x2 = ref.example_input(seed=1)  # a second, unseen input through the same module
    assert_matches_eager(out, model, (x,))
    assert_matches_eager(module(x2), model, (x2,))
