"""``torch.compile(model, backend="graphopt")``.

Specification: the backend is found by name (the package's ``torch_dynamo_backends`` entry
point); every graph Dynamo cuts from a model with a graph break (a ``print``, an ``.item()``
branching on data) is compiled by graphopt, and the whole model matches eager, output
structure included; a second shape is served by one dynamic build; a graph graphopt cannot
capture or build runs eagerly with a warning naming the reason; weights changed after
compiling are not served stale.
"""

import logging

import pytest
import torch

from graphopt.dynamo_backend import CompiledSubgraph, graphopt_backend
from graphopt.testing import assert_matches_eager


class GraphBreak(torch.nn.Module):
    """Two graphs: the data-dependent branch in the middle breaks Dynamo's trace."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(8, 16)
        self.norm = torch.nn.BatchNorm1d(16)
        self.second = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.norm(self.first(x)))
        scale = 2.0 if h.mean().item() > 0 else 1.0  # a Python float from a tensor: a graph break
        return {"logits": self.second(h) * scale, "hidden": h}


def _recording_backend(results, **options):
    def backend(gm, example_inputs):
        compiled = graphopt_backend(gm, example_inputs, options=options or None)
        results.append(compiled)
        return compiled
    return backend


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_model_with_a_graph_break_matches_eager_with_each_graph_compiled_by_graphopt():
    model, results = GraphBreak().eval(), []
    compiled = torch.compile(model, backend=_recording_backend(results, pipeline="fold"))
    x = torch.randn(4, 8)
    with torch.no_grad():
        out = compiled(x)
    assert isinstance(out, dict) and list(out) == ["logits", "hidden"]
    assert_matches_eager(out, model, (x,))
    assert sum(isinstance(r, CompiledSubgraph) for r in results) == 2


def test_the_backend_is_found_by_name_and_a_second_batch_size_is_served():
    model = GraphBreak().eval()
    compiled = torch.compile(model, backend="graphopt", options={"pipeline": "fold"})
    with torch.no_grad():
        for batch in (4, 7, 3):  # the second size makes Dynamo ask for dynamic graphs
            x = torch.randn(batch, 8)
            assert_matches_eager(compiled(x), model, (x,))


class Unsupported(torch.nn.Module):
    def forward(self, x):
        y = torch.sin(x)
        print("between the graphs")
        return torch.fft.rfft(y).abs() + 1  # complex intermediate: graphopt captures no complex tensors


def test_a_graph_graphopt_cannot_build_runs_eagerly_with_a_warning(caplog):
    model, results = Unsupported(), []
    compiled = torch.compile(model, backend=_recording_backend(results, pipeline="fold"))
    x = torch.randn(2, 16)
    with caplog.at_level(logging.WARNING, logger="graphopt.dynamo"):
        out = compiled(x)
    assert_matches_eager(out, model, (x,))
    assert any(isinstance(r, CompiledSubgraph) for r in results)  # the sin graph
    assert any(not isinstance(r, CompiledSubgraph) for r in results)  # the rfft graph
    assert any("running a" in r.message and "eagerly" in r.message for r in caplog.records)


def test_weights_changed_after_compiling_are_not_served_stale(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    compiled = torch.compile(model, backend=_recording_backend([], pipeline="fold"))
    x = torch.randn(2, 8)
    with torch.no_grad():
        compiled(x)
        model[0].weight.mul_(2)
        with caplog.at_level(logging.WARNING, logger="graphopt.dynamo"):
            out = compiled(x)
    assert_matches_eager(out, model, (x,))
    assert any("weights changed" in r.message for r in caplog.records)
