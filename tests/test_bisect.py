"""``graphopt.bisect`` names the first pass that breaks the numbers, and the node where it shows.

The wrong passes are registered only inside this file (and removed again), so no other
test or pipeline can see them.
"""

import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest

import graphopt
from graphopt.bisect import expand
from graphopt.passes_base import _REGISTRY, GraphPass, PassResult, register_pass
from graphopt.passes.utils import aten, is_op


@dataclass(frozen=True)
class ReluToSigmoid(GraphPass):
    """Deliberately wrong: claims to be exact but turns every relu into a sigmoid, in place."""

    name: ClassVar[str] = "test-wrong-relu"
    tolerance: ClassVar[str] = "exact"

    def run(self, graph):
        changed = 0
        for node in graph.call_nodes():
            if is_op(node, aten.relu):
                node.target = aten.sigmoid.default
                changed += 1
        return PassResult(changed > 0, {"changed": changed})


@dataclass(frozen=True)
class NudgeLinearBias(GraphPass):
    """Deliberately wrong by a little (1e-3): an 'algebraic' pass beyond its 1e-4 tolerance,
    done the way real passes do it: a new constant node feeding the linear."""

    name: ClassVar[str] = "test-nudge-bias"
    tolerance: ClassVar[str] = "algebraic"

    def run(self, graph):
        for node in list(graph.call_nodes()):
            if is_op(node, aten.linear) and len(node.args) > 2:
                bias = node.args[2]
                new = graph.add_constant(graph.constant(bias) + 1e-3, "nudged_bias", before=node)
                node.args = (*node.args[:2], new)
                graph.prune_unused_constants()
                return PassResult(True)
        return PassResult(False)


@dataclass(frozen=True)
class Explodes(GraphPass):
    """Deliberately broken: raises."""

    name: ClassVar[str] = "test-explodes"

    def run(self, graph):
        raise RuntimeError("boom")


@pytest.fixture(autouse=True)
def wrong_passes():
    added = [register_pass(cls) for cls in (ReluToSigmoid, NudgeLinearBias, Explodes)]
    yield
    for cls in added:
        _REGISTRY.pop(cls.name, None)


def test_expand_replaces_fold_by_its_parts():
    assert str(expand("fold,test-wrong-relu")) == "noop,fold-bn,fold-const,cse,dce,test-wrong-relu"
    assert str(expand("cse")) == "cse"


def test_bisect_names_the_wrong_pass_and_the_node(conv_bn_net):
    model, inputs = conv_bn_net
    result = graphopt.bisect(model, inputs, "fold,test-wrong-relu,dce")
    assert result.found
    assert result.culprit == "test-wrong-relu"
    assert result.culprit_index == 5  # after the five parts of fold
    assert [s.pass_text for s in result.steps] == ["noop", "fold-bn", "fold-const", "cse", "dce", "test-wrong-relu"]
    assert all(s.ok for s in result.steps[:5]) and not result.steps[5].ok
    assert result.steps[1].step_error < 1e-5  # fold-bn changed the numbers, within tolerance
    assert result.node == "relu" and result.node_op == "aten.sigmoid.default"
    assert result.node_error > 0.1
    assert "first failing pass: test-wrong-relu" in str(result)
    assert "error appears at node 'relu'" in str(result)


def test_bisect_catches_a_small_algebraic_error(conv_bn_net):
    model, inputs = conv_bn_net
    result = graphopt.bisect(model, inputs, "fold,test-nudge-bias")
    assert result.culprit == "test-nudge-bias"
    assert "exceeds" in result.message
    assert result.node == "linear"
    assert result.introduced == []  # the new constant is a get_attr, not a computing node
    assert 5e-4 < result.node_error < 2e-3


def test_bisect_names_a_crashing_pass(conv_bn_net):
    model, inputs = conv_bn_net
    result = graphopt.bisect(model, inputs, "noop,test-explodes,dce")
    assert result.culprit == "test-explodes"
    assert "boom" in result.message
    assert len(result.steps) == 2


def test_bisect_of_a_correct_pipeline_finds_nothing(conv_bn_net):
    model, inputs = conv_bn_net
    result = graphopt.bisect(model, inputs, "fold", target="x86")
    assert not result.found
    assert [s.pass_text for s in result.steps][-1] == "build:x86"
    assert all(s.ok for s in result.steps)
    assert "every pass stayed within its tolerance" in str(result)


CLI_MODEL = """
import torch
from dataclasses import dataclass
from typing import ClassVar
from graphopt.passes_base import GraphPass, PassResult, register_pass
from graphopt.passes.utils import aten, is_op


@register_pass  # registered in the CLI's process only, by importing this model file
@dataclass(frozen=True)
class ReluToSigmoid(GraphPass):
    name: ClassVar[str] = "test-wrong-relu"

    def run(self, graph):
        for node in graph.call_nodes():
            if is_op(node, aten.relu):
                node.target = aten.sigmoid.default
        return PassResult(True)


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return model, (torch.randn(2, 4),)
"""


def test_bisect_cli_names_the_culprit(tmp_path):
    (tmp_path / "wrong.py").write_text(CLI_MODEL)
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "bisect", f"{tmp_path / 'wrong.py'}:make",
                             "--pipeline", "fold,test-wrong-relu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr  # 1: a culprit was found
    assert "bisect of pipeline 'noop,fold-bn,fold-const,cse,dce,test-wrong-relu'" in result.stdout
    assert "first failing pass: test-wrong-relu" in result.stdout
    assert "error appears at node" in result.stdout and "aten.sigmoid.default" in result.stdout
