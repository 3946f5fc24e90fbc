"""Pipelines: text round-trips, typed errors listing valid names, instruments."""

import os

import pytest
import torch

import graphopt
from graphopt.compare import compare
from graphopt.errors import GraphoptError, PassError, PassOptionError, PipelineError, VerificationError
from graphopt.graph import Graph
from graphopt.instruments import IRDumpInstrument, TimingInstrument, VerifyInstrument
from graphopt.passes_base import GraphPass, PassResult, _REGISTRY, option, register_pass
from graphopt.pipeline import Pipeline
from dataclasses import dataclass
from typing import ClassVar


@pytest.mark.parametrize("text", [
    "fold",
    "noop,fold-bn,fold-const,cse,dce",
    "fold-const{max_bytes=1024},dce",
    "fold,fold-const{max_bytes=0}",
])
def test_canonical_text_round_trips(text):
    p = Pipeline.parse(text)
    assert str(p) == text
    assert Pipeline.parse(str(p)) == p


def test_whitespace_and_default():
    assert str(Pipeline.parse(" fold ,  dce ")) == "fold,dce"
    assert str(Pipeline.parse("default")) == str(Pipeline.parse(graphopt.pipeline.DEFAULT_PIPELINE))
    assert str(Pipeline.parse("none")) == "none" and len(Pipeline.parse("none")) == 0


def test_unknown_pass_lists_valid_ones():
    with pytest.raises(PipelineError, match=r"unknown pass 'fsue'.*valid passes: .*cse.*dce.*fold"):
        Pipeline.parse("fold,fsue")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(PipelineError, match=r"pass 'fold-const' has no option 'size'; valid options: max_bytes"):
        Pipeline.parse("fold-const{size=3}")


@pytest.mark.parametrize("text, message", [
    ("fold,,dce", "expected a value at column 6"),
    ("fold{", "unexpected end|expected a value"),
    ("fold-const{max_bytes=1", "expected '}'"),
    ("", "empty pipeline"),
    ("fold dce", "expected ','"),
])
def test_malformed_text_points_at_the_column(text, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline.parse(text)


def test_option_type_and_range_errors_are_typed():
    with pytest.raises(PassOptionError, match="not a valid int"):
        Pipeline.parse("fold-const{max_bytes=big}")
    with pytest.raises(PassOptionError, match=r"out of range \[0, "):
        Pipeline.parse("fold-const{max_bytes=-5}")
    assert issubclass(PipelineError, ValueError) and issubclass(PipelineError, GraphoptError)


# A pass registered only for these tests: scales every output of linear layers.
@dataclass(frozen=True)
class _Scale(GraphPass):
    """Multiply every linear weight by a factor (test-only; wrong on purpose when factor != 1)."""

    name: ClassVar[str] = "test-scale"
    tolerance: ClassVar[str] = "exact"
    factor: float = option(1.0, "scale", range=(0.0, 10.0, "[]"))
    names: tuple[str, ...] = option((), "unused list option")

    def run(self, graph: Graph) -> PassResult:
        for n in graph.call_nodes():
            if "linear" in str(n.target):
                w = n.args[1]
                graph.set_constant(w, graph.constant(w) * self.factor)
        return PassResult(self.factor != 1.0, {"scaled": 1})


@dataclass(frozen=True)
class _Crash(GraphPass):
    """Raises (test-only)."""

    name: ClassVar[str] = "test-crash"

    def run(self, graph: Graph) -> PassResult:
        raise KeyError("boom")


@dataclass(frozen=True)
class _ScaleInt8(_Scale):
    """_Scale on the int8 rung (test-only)."""

    name: ClassVar[str] = "test-scale-int8"
    tolerance: ClassVar[str] = "int8"


@dataclass(frozen=True)
class _Poison(GraphPass):
    """Puts a NaN into every linear weight, on the lossy rung (test-only)."""

    name: ClassVar[str] = "test-poison"
    tolerance: ClassVar[str] = "lossy"

    def run(self, graph: Graph) -> PassResult:
        for n in graph.call_nodes():
            if "linear" in str(n.target):
                w = graph.constant(n.args[1]).clone()
                w[0, 0] = float("nan")
                graph.set_constant(n.args[1], w)
        return PassResult(True)


@pytest.fixture
def test_passes():
    for p in (_Scale, _Crash, _ScaleInt8, _Poison):
        register_pass(p)
    yield
    for p in (_Scale, _Crash, _ScaleInt8, _Poison):
        _REGISTRY.pop(p.name)


def test_list_and_float_options_round_trip(test_passes):
    p = Pipeline.parse("test-scale{factor=2.5,names=[fc1,fc2]}")
    assert p.passes[0].names == ("fc1", "fc2") and p.passes[0].factor == 2.5
    assert str(p) == "test-scale{factor=2.5,names=[fc1,fc2]}"


def test_verify_names_the_pass_that_breaks_numerics(test_passes):
    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(VerificationError, match=r"after pass 'test-scale\{factor=3.0\}'.*not bit-identical"):
        graphopt.optimize(m, torch.randn(1, 4), "fold,test-scale{factor=3.0}", verify=True)


def test_verify_checks_the_int8_and_lossy_rungs(test_passes):
    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    x = torch.randn(2, 4)
    # int8: SQNR against the graph before the pass (a 1% change is 40 dB, a factor 3 is -6 dB)
    graphopt.optimize(m, x, "test-scale-int8{factor=1.01}", verify=True)
    with pytest.raises(VerificationError, match=r"'test-scale-int8\{factor=3.0\}' \(int8 rung\).*SQNR -\d"):
        graphopt.optimize(m, x, "test-scale-int8{factor=3.0}", verify=True)
    # lossy: numbers may change, but no NaN/inf may appear
    with pytest.raises(VerificationError, match=r"'test-poison' \(lossy rung\).*NaN/inf where the reference is finite"):
        graphopt.optimize(m, x, "test-poison", verify=True)


def test_verify_passes_real_quantize_and_prune(conv_bn_net):
    m, (x,) = conv_bn_net
    calib = [torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    g = graphopt.optimize(m, (x,), "fold,prune{ratio=0.5},quantize{mode=int8}", verify=True,
                          calibration_data=calib)
    assert "| quantize{mode=int8} | int8 |" in g.annotations["verify"]


def test_failing_pass_is_reported_with_pipeline_context(test_passes):
    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(PassError,
                       match=r"pass 'test-crash' \(after fold\) in pipeline 'fold,test-crash,dce' failed: KeyError"):
        graphopt.optimize(m, torch.randn(1, 4), "fold,test-crash,dce")


def test_instruments_time_dump_and_verify(tmp_path, conv_bn_net):
    m, (x,) = conv_bn_net
    g = graphopt.capture(m, x)
    timing, verify = TimingInstrument(), VerifyInstrument()
    out = Pipeline.parse("noop,fold-bn,cse,dce").run(g, [timing, verify, IRDumpInstrument(str(tmp_path))])
    assert [r[0] for r in timing.rows] == ["noop", "fold-bn", "cse", "dce"]
    assert "| 1 | fold-bn |" in timing.table()
    # dumps only where the graph changed: the input, noop (dropout) and fold-bn
    assert sorted(os.listdir(tmp_path)) == ["000_input.txt", "001_noop.txt", "002_fold-bn.txt"]
    assert "conv2d" in (tmp_path / "002_fold-bn.txt").read_text()
    assert [r.tolerance for r in verify.records] == ["exact", "algebraic", "exact", "exact"]
    assert verify.records[0].step_error == 0.0 and 0.0 < verify.records[1].total_error < 1e-5
    assert out.history == ["noop", "fold-bn", "cse", "dce"]


def test_pipeline_does_not_modify_its_input(conv_bn_net):
    m, (x,) = conv_bn_net
    g = graphopt.capture(m, x)
    before = str(g)
    graphopt.optimize(g, pipeline="fold")
    assert str(g) == before


def test_verify_judges_an_ill_conditioned_algebraic_pass_by_float64(test_passes):
    # LayerNorm over nearly constant values amplifies fp32 rounding, in eager too: nudging the
    # weights by 1e-4 moves the outputs by more than the algebraic rung's 1e-4, and verify lets it
    # through because the graph before the pass, run in float64, is no closer; a real change is not
    class NearlyConstantNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x):
            return torch.nn.functional.layer_norm(100.0 + 1e-2 * self.fc(x), (64,), eps=1e-12)

    @dataclass(frozen=True)
    class Nudge(_Scale):
        name: ClassVar[str] = "test-nudge"
        tolerance: ClassVar[str] = "algebraic"

    torch.manual_seed(0)
    m, x = NearlyConstantNorm().eval(), torch.randn(1, 64)
    register_pass(Nudge)
    try:
        g = graphopt.optimize(m, x, "test-nudge{factor=1.0001}", verify=True)
        assert not compare(m(x), g(x)[0], "algebraic").ok  # beyond the rung without the judge
        with pytest.raises(VerificationError, match="vs float64"):
            graphopt.optimize(m, x, "test-nudge{factor=0.5}", verify=True)
    finally:
        _REGISTRY.pop("test-nudge")


def test_verify_holds_each_quantize_mode_to_its_own_rung():
    """int8 on the int8 rung, weight-only int4 on the int4 rung, fp16/bf16 on half."""
    from graphopt.passes.quantize import Quantize

    assert [Quantize(mode=m).rung() for m in ("int8", "dynamic", "int4", "fp16", "bf16")] == \
        ["int8", "int8", "int4", "half", "half"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64)).eval()
    x = torch.randn(4, 256)
    graph = graphopt.optimize(model, (x,), "fold,quantize{mode=int4,group=64}", verify=True)
    assert any("linear_int4" in str(n.target) for n in graph.nodes)
