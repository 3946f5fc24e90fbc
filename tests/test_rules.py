"""The schedule rules as a whole (targets/cpu/schedules/rules.py, base.py, registry.vector_isa).

* A target's vector ISA (lanes, registers, int8 dot instruction) comes from its TVM
  attributes through LLVM's feature tables, for presets, custom dicts and cross targets.
* Register tiles are sized from it: accumulators + weight vectors + broadcast fit the
  register file, 16 registers on AVX2 and 32 on AVX-512 and NEON.
* Dispatch: the first rule that matches schedules a func and stamps its name on it; a rule
  that raises fails a strict run (the test suite) and warns, naming rule and PrimFunc, in a
  build, whose func the next rule then takes.
* Every rule family schedules and matches eager PyTorch at 8 (AVX2) and 16 (AVX-512) lanes on
  this host, and at 4 (NEON) cross-compiled and run under qemu-aarch64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.testing import assert_matches_eager
from graphopt.targets.registry import resolve_target, vector_isa

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from graphopt.targets.build import build, scheduled_module  # noqa: E402
from graphopt.targets.cpu.schedules import (  # noqa: E402
    RULE_ATTR,
    RULES,
    ScheduleRuleWarning,
    cpu_schedule_pass,
    dispatch,
    rule_of,
    schedule_primfunc,
)
from graphopt.targets.cpu.schedules import base  # noqa: E402
from graphopt.targets.cpu.schedules.conv2d import ConvShape, channel_vectorized_tile  # noqa: E402
from graphopt.targets.cpu.schedules.conv_depthwise import conv_pixel_tile  # noqa: E402
from graphopt.targets.cpu.schedules.depthwise import TILE_VECTORS  # noqa: E402
from graphopt.targets.cpu.schedules.elementwise import Fallback  # noqa: E402
from graphopt.targets.cpu.schedules.int8 import dot_instruction  # noqa: E402
from graphopt.targets.cpu.schedules.matmul import gemm_i_tile, gemm_j_tile  # noqa: E402
from graphopt.targets.frontend.lower import lower_to_relax  # noqa: E402

# ------------------------------------------------------------------------ vector ISA


@pytest.mark.parametrize("target, name, lanes, registers, dot", [
    ("x86-avx2", "avx2", 8, 16, "vpmaddubsw-256"),
    ("x86-avx512", "avx512", 16, 32, "vnni-512"),
    ("arm64", "neon", 4, 32, "none"),
    ("arm64-dotprod", "neon", 4, 32, "sdot"),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"}, "avx2", 8, 16, "vpmaddubsw-256"),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake"}, "avx2", 8, 16, "avx-vnni-256"),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids", "mattr": ["-avx512f"]},
     "avx2", 8, 16, "avx-vnni-256"),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mattr": ["+avx512f", "+avx512vnni"]},
     "avx512", 16, 32, "vnni-512"),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}, "sse", 4, 16, "none"),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"]}, "neon", 4, 32, "i8mm"),
])
def test_vector_isa_comes_from_the_targets_features(target, name, lanes, registers, dot):
    """No list of CPU names: an mcpu counts through the features LLVM gives it, and an
    mattr that switches a feature off (the host preset does that) is honoured."""
    isa = vector_isa(target)
    assert (isa.name, isa.lanes(), isa.registers, isa.int8_dot) == (name, lanes, registers, dot)
    assert isa.lanes(8) == 4 * lanes
    assert base.simd_lanes(resolve_target(target).tvm_target()) == lanes


def test_int8_rule_tensorizes_with_what_the_isa_offers():
    assert dot_instruction(resolve_target("x86-avx512").tvm_target()) == "vnni"
    assert dot_instruction(resolve_target("arm64-dotprod").tvm_target()) == "sdot"
    assert dot_instruction(resolve_target("x86-avx2").tvm_target()) == "avx2"
    assert dot_instruction(resolve_target("x86-avx-vnni").tvm_target()) == "avx-vnni"
    assert dot_instruction(resolve_target("arm64").tvm_target()) is None


def test_cpu_preset_describes_its_isa():
    assert str(resolve_target("x86-avx2").isa) == "avx2 (8 fp32 lanes, 16 vector registers, int8 dot: vpmaddubsw-256)"
    assert resolve_target("cuda").isa is None


# ------------------------------------------------------------------- register tiles

ISAS = {name: vector_isa(name) for name in ("x86-avx2", "x86-avx512", "arm64")}


@pytest.mark.parametrize("isa", ISAS.values(), ids=ISAS.keys())
@pytest.mark.parametrize("f, x", [(64, 56), (32, 28), (128, 14), (256, 7), (24, 112), (1280, 7)])
def test_conv_register_tile_fits_the_register_file(isa, f, x):
    """Accumulators (pixels x channel vectors), the tile's weight vectors and one broadcast
    input: at most the architectural registers (a spill in the inner loop costs 2-3x)."""
    shape = ConvShape(1, f, x, x, 64, 3, 3)
    tile = channel_vectorized_tile(shape, isa.lanes(), 2, isa.accumulators, True, False)
    vectors = -(-tile.channels // isa.lanes())
    assert tile.pixels * vectors <= isa.accumulators
    assert tile.pixels * vectors + vectors + 1 <= isa.registers


def test_avx2_tiles_are_their_own_not_avx512_tiles_at_half_width():
    avx2, avx512 = ISAS["x86-avx2"], ISAS["x86-avx512"]
    assert (avx2.accumulators, avx512.accumulators) == (12, 24)
    # conv 64 channels x 56 pixels: 2 vectors of channels x 4 pixels on AVX2 (8 accumulators
    # of 12: 56 has no divisor 6), 2 x 8 on AVX-512
    shape = ConvShape(1, 64, 56, 56, 64, 3, 3)
    t2 = channel_vectorized_tile(shape, 8, 2, avx2.accumulators, True, False)
    t16 = channel_vectorized_tile(shape, 16, 2, avx512.accumulators, True, False)
    assert (t2.channels, t2.pixels) == (16, 4) and (t16.channels, t16.pixels) == (32, 8)
    # GEMM with 96 rows: 6 x 2 vectors on AVX2 (Haswell's classic 6x16), 12 x 2 on AVX-512
    assert (gemm_i_tile(96, gemm_j_tile(256, 8, 96), 8, avx2.accumulators), gemm_j_tile(256, 8, 96)) == (6, 16)
    assert (gemm_i_tile(96, gemm_j_tile(256, 16, 96), 16, avx512.accumulators), gemm_j_tile(256, 16, 96)) == (12, 32)
    # the merged conv -> depthwise kernel: 12 pixels of 112 would not divide, 8 do; 16 on AVX-512
    assert conv_pixel_tile(112, avx2.accumulators) == 8 and conv_pixel_tile(112, avx512.accumulators) == 16


@pytest.mark.parametrize("isa", ISAS.values(), ids=ISAS.keys())
@pytest.mark.parametrize("m, n", [(1, 1000), (6, 48), (96, 256), (128, 64), (49, 10)])
def test_gemm_register_tile_fits_the_register_file(isa, m, n):
    lanes = isa.lanes()
    ji = gemm_j_tile(n, lanes, m)
    vectors = -(-ji // lanes)
    ii = gemm_i_tile(m, ji, lanes, isa.accumulators)
    assert ii * vectors + vectors + 1 <= isa.registers or ii == 1


@pytest.mark.parametrize("isa", ISAS.values(), ids=ISAS.keys())
def test_depthwise_and_merged_conv_tiles_fit_the_register_file(isa):
    # accumulators, the tap's input vector (or weight vector) and one broadcast
    assert TILE_VECTORS + 2 <= isa.registers
    for width in (7, 14, 28, 56, 112):
        assert conv_pixel_tile(width, isa.accumulators) + 2 <= isa.registers


# ------------------------------------------------------------------------ dispatch

X86 = resolve_target("x86-avx512").tvm_target()


def _relu_func():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(x))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    return next(f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


class _Raises(base.CPURule):
    def match(self, info, target):
        return True

    def schedule(self, info, match, target):
        raise ValueError("tile does not divide")


class _Declines(base.CPURule):
    def match(self, info, target):
        return None


def test_the_first_matching_rule_schedules_and_is_stamped_on_the_func():
    chosen = dispatch(_relu_func(), X86)
    assert chosen.rule == "Injective"
    func = chosen.func
    assert str(func.attrs[RULE_ATTR]) == "Injective" == rule_of(func) and base.is_scheduled(func)
    assert [r.name for r in RULES][-1] == "Fallback"
    assert schedule_primfunc(_relu_func(), X86, [_Declines(), Fallback()])[0] == "Fallback"
    assert rule_of(_relu_func()) is None


def test_rules_are_for_cpu_targets_only():
    assert dispatch(_relu_func(), resolve_target("cuda").tvm_target()) is None


def test_a_rule_that_raises_fails_a_strict_run(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_STRICT_RULES", "1")
    with pytest.raises(ValueError, match="tile does not divide") as err:
        dispatch(_relu_func(), X86, [_Raises(), Fallback()], name="fused_relu")
    assert "schedule rule _Raises on PrimFunc fused_relu" in "".join(err.value.__notes__)


def test_a_rule_that_raises_in_a_build_warns_and_the_next_rule_schedules(monkeypatch):
    monkeypatch.setenv("GRAPHOPT_STRICT_RULES", "0")
    mod = tvm.IRModule({"fused_relu": _relu_func()})
    with pytest.warns(ScheduleRuleWarning,
                      match=r"rule _Raises failed on PrimFunc fused_relu \(tile does not divide\)"):
        out = cpu_schedule_pass(X86, [_Raises(), Fallback()])(mod)
    assert rule_of(out["fused_relu"]) == "Fallback"


# ------------------------------------------------------- every rule, at 4, 8 and 16 lanes


class EveryRule(nn.Module):
    """Kernels for each float rule: an expand conv feeding a strided depthwise conv (merged
    into one kernel where the tensor between them outgrows L2), a 3x3 conv with enough tiles
    for Winograd, pools, a depthwise conv, 1x1 convs, a linear layer and a softmax."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(16, 96, 1)
        self.dw_strided = nn.Conv2d(96, 96, 3, stride=2, padding=1, groups=96)
        self.conv3 = nn.Conv2d(96, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.project = nn.Conv2d(32, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        y = self.dw_strided(torch.nn.functional.relu6(self.expand(x)))
        y = torch.max_pool2d(torch.relu(self.conv3(y)), 2)
        y = self.project(torch.relu(self.dw(y)))
        y = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1)
        return torch.softmax(self.fc(y), dim=-1)


FLOAT_RULES = {"Conv2dNCHW", "DepthwiseConv2dNCHW", "WinogradConv2d", "ConvThenDepthwise", "Pooling",
               "Matmul", "RowReduction"}


@pytest.fixture(scope="module")
def every_rule():
    torch.manual_seed(0)
    model = EveryRule().eval()
    x = torch.randn(1, 16, 56, 56)
    return model, x, graphopt.optimize(model, (x,), "fold,fuse")


def _rules_of(graph, spec) -> set:
    mod = scheduled_module(lower_to_relax(graph), spec, fusion="graph")
    return {rule_of(f) for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("target", ["x86-avx2", "x86-avx512"])
def test_every_rule_at_8_and_16_lanes_matches_eager(every_rule, target):
    model, x, graph = every_rule
    rules = _rules_of(graph, resolve_target(target))
    assert FLOAT_RULES <= rules, rules
    module = graphopt.compile(model, target, (x,), "fold,fuse")
    assert_matches_eager(module(x), model, (x,))


@pytest.mark.emulated
def test_every_rule_at_4_lanes_runs_on_emulated_neon(every_rule, aarch64_env, tmp_path):
    from graphopt.targets.aarch64 import emulation

    model, x, graph = every_rule
    rules = _rules_of(graph, resolve_target("arm64"))
    assert FLOAT_RULES <= rules, rules
    path = graphopt.compile(model, "arm64", (x,), "fold,fuse").save(str(tmp_path / "every-rule-arm64"))
    (out,) = emulation.run_artifact_emulated(path, [x.numpy()], timeout=600, env=aarch64_env)
    assert_matches_eager(torch.from_numpy(out), model, (x,))


@pytest.mark.parametrize("target", ["x86-avx2", "x86-avx512", "arm64"])
def test_attention_rules_at_each_vector_width(target):
    """A transformer layer: the GEMMs (Matmul), layer norms (RowReduction), and the attention
    group, copies around two batch matmuls and a softmax (Fallback, with GEMM tiles inside)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0).eval()
    x = torch.randn(16, 2, 32)
    graph = graphopt.optimize(layer, (x,), "fold,fuse")
    spec = resolve_target(target)
    mod = scheduled_module(lower_to_relax(graph), spec, fusion="graph")
    rules = {rule_of(f) for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert {"Matmul", "RowReduction", "Fallback"} <= rules, rules
    if spec.arch == "aarch64":
        build(lower_to_relax(graph), spec, fusion="graph")
        return
    module = graphopt.compile(layer, target, (x,), "fold,fuse")
    assert_matches_eager(module(x), layer, (x,))
