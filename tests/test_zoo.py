"""Models as people bring them (graphopt.zoo: torchvision, timm, HF transformers, random
weights, nothing downloaded) compile with the default pipeline and match eager PyTorch on
every output at the fp32 rung (docs/TOLERANCES.md).

The ``fast`` entries run on every test run; the whole zoo (hours on 2 cores) carries the
``zoo`` marker, which pytest deselects unless asked for: ``python -m pytest -m zoo
tests/test_zoo.py``. ``benchmarks/zoo.py`` runs the same zoo with timings and a pass rate.
A model that a missing ATen converter stops is an expected failure naming the op, and only
that error is expected (any other failure fails the test); once the converter exists it
shows as XPASS and its entry in ``MISSING_CONVERTER`` goes.
"""

import pytest
import torch

import graphopt
from graphopt.errors import UnsupportedOpError
from graphopt.models import import_torchvision
from graphopt.testing import assert_matches_eager
from graphopt.zoo import ZooModel, zoo

# zoo name -> the ATen op the TVM backend has no converter for yet (none in the zoo today: a model
# listed here must fail with UnsupportedOpError naming it, and shows as XPASS once it lowers)
MISSING_CONVERTER: dict[str, str] = {}


def _param(entry: ZooModel, *marks):
    marks = list(marks)
    if entry.name in MISSING_CONVERTER:
        marks.append(pytest.mark.xfail(raises=UnsupportedOpError, strict=False,
                                       reason=f"no converter for {MISSING_CONVERTER[entry.name]}"))
    return pytest.param(entry, id=entry.name, marks=marks)


ENTRIES = zoo()


def _compiles_and_matches_eager(entry: ZooModel) -> None:
    model, inputs = entry.build()
    module = graphopt.compile(model, "x86", example_inputs=inputs)
    actual = module(*inputs)
    with torch.no_grad():
        expected = model(*inputs)
    if isinstance(actual, torch.Tensor) and isinstance(expected, tuple):
        actual = (actual,)  # a one-field tuple comes back as its tensor
    assert_matches_eager(actual, model, inputs)


@pytest.mark.parametrize("entry", [_param(e) for e in ENTRIES if e.fast])
def test_zoo_model_compiles_and_matches_eager(entry):
    _compiles_and_matches_eager(entry)


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("entry", [_param(e) for e in ENTRIES if not e.fast])
def test_whole_zoo_compiles_and_matches_eager(entry):
    _compiles_and_matches_eager(entry)


def test_zoo_spans_the_libraries_people_use():
    names = {e.name for e in ENTRIES}
    tv = import_torchvision()
    assert {f"torchvision/{n}" for n in tv.models.list_models(module=tv.models)} <= names
    assert sum(e.family == "timm" for e in ENTRIES) >= 20
    hf = {"bert", "distilbert", "gpt2", "llama", "llama_static_cache", "t5_encoder", "vit", "whisper_encoder",
          "swin", "convnext", "deit"}
    assert {f"hf/{n}" for n in hf} <= names
    assert 8 <= sum(e.fast for e in ENTRIES) <= 12
