"""int8 dot-product kernels (targets/cpu/schedules/int8.py): packing, the schedule rule, the ISA.

Each rule test builds one Relax int8 op, runs the packing pass + fusion, checks that the
``Int8DotProduct`` rule schedules it with the target's intrinsic, and compares the built
kernel with a numpy integer reference (bit-exact: integer arithmetic). Model tests check
the instruction in the generated assembly (``vpdpbusd`` on this x86 host, ``sdot`` in an
aarch64 cross build) and the int8 model's numbers against its fake-quant eager graph.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import CalibrationError
from graphopt.targets.registry import resolve_target
from graphopt.testing import assert_close

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402

from graphopt.targets.cpu.schedules import cpu_layout_passes, schedule_primfunc  # noqa: E402
from graphopt.targets.cpu.schedules.int8 import (  # noqa: E402
    BLOCK_F,
    BLOCK_K,
    dot_instruction,
    pack_weight,
    shift_correction,
)

X86 = resolve_target("x86").tvm_target()
ARM = resolve_target("arm64-dotprod").tvm_target()
needs_vnni = pytest.mark.skipif(dot_instruction(X86) != "vnni", reason="host has no AVX-512 VNNI")


# ----------------------------------------------------------------------- helpers


def _module(x_shape, body, dtype="int8"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _fused(mod, target):
    with target:
        return tvm.transform.Sequential([*cpu_layout_passes(target), relax.transform.LegalizeOps(),
                                         relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
                                         relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)


def _scheduled_kernel(mod, target):
    """(rule name, scheduled PrimFunc) of the one int8 kernel in ``mod``."""
    funcs = [f for _, f in _fused(mod, target).functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(funcs) == 1, [f.script()[:200] for f in funcs]
    return schedule_primfunc(funcs[0], target)


def _run(mod, arrays):
    """Build ``mod`` with graphopt's CPU pipeline (packing pass + schedule rules) and run it."""
    from graphopt.targets.build import build

    vm = relax.VirtualMachine(build(mod, resolve_target("x86"), fusion="tvm"), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def _asm(executable) -> str:
    texts, stack = [], [executable.mod]
    while stack:
        mod = stack.pop()
        if mod.kind == "llvm":
            texts.append(mod.inspect_source("asm"))
        stack.extend(mod.imports)
    return "\n".join(texts)


def _conv_ref(x, w, stride, pad):
    out = torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                                     stride=stride, padding=pad)
    return out.round().to(torch.int64).numpy()


# ------------------------------------------------------------------ packing (numpy)


def test_weight_packing_puts_16_channels_by_4_inputs_contiguous():
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (20, 6, 3, 3)).astype("int8")  # neither dim a whole block
    p = pack_weight(w)
    assert p.shape == (2, 2, 3, 3, BLOCK_F, BLOCK_K) and p.dtype == np.int8
    # block (fo, co, ry, rx) holds W[fo*16 + i, co*4 + k, ry, rx] at [i, k], zero past the edges
    assert p[1, 1, 2, 0, 3, 1] == w[19, 5, 2, 0]
    assert p[0, 0, 1, 1, 7, 2] == w[7, 2, 1, 1]
    assert not p[1, :, :, :, 4:].any() and not p[:, 1, :, :, :, 2:].any()
    # VNNI reads activations as u8 = s8 + 128: the constant removes 128 * sum_k W
    # (the sums are computed in int64 and fit the kernel's int32)
    assert_close(shift_correction(w, "vnni"), (-128 * w.reshape(20, -1).astype(np.int64).sum(1)).astype(np.int32),
                 "exact")
    assert not shift_correction(w, "sdot").any()


def test_targets_pick_their_dot_instruction():
    assert dot_instruction(ARM) == "sdot"
    assert dot_instruction(resolve_target("arm64").tvm_target()) is None  # NEON without dotprod
    assert dot_instruction(resolve_target("x86-avx512").tvm_target()) == "vnni"  # cascadelake
    assert dot_instruction(resolve_target("x86-avx2").tvm_target()) == "avx2"  # tests/test_int8_tiers.py


# ------------------------------------------------------------------- the rule (x86)


@needs_vnni
@pytest.mark.parametrize("channels,stride,pad", [(32, 1, 1), (24, 2, 0)])
def test_conv_rule_tensorizes_with_vnni_and_is_exact(channels, stride, pad):
    # 32 channels: accumulator tiles computed inside the epilogue's tiles; 24 (not a
    # multiple of 16): the accumulator is its own buffer, the epilogue reads it
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (1, 6, 9, 9)).astype("int8")
    w = rng.integers(-127, 128, (channels, 6, 3, 3)).astype("int8")

    def body(bb, xv):
        acc = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), strides=[stride] * 2, padding=[pad] * 2,
                                         out_dtype="int32"))
        return relax.op.add(acc, relax.const(np.arange(channels, dtype="int32").reshape(1, -1, 1, 1)))

    mod = _module(x.shape, body)
    rule, func = _scheduled_kernel(mod, X86)
    assert rule == "Int8DotProduct"
    text = func.script()
    assert "vpdpbusd" in text and "int8_pack" in text
    out = _run(mod, [x])
    ref = _conv_ref(x, w, stride, pad) + np.arange(channels).reshape(1, -1, 1, 1)  # int64, fits int32
    assert_close(out, ref.astype(np.int32), "exact")


@needs_vnni
def test_dense_rule_tensorizes_with_vnni_and_is_exact():
    rng = np.random.default_rng(2)
    x = rng.integers(-128, 128, (1, 6, 20)).astype("int8")
    w = rng.integers(-127, 128, (20, 48)).astype("int8")  # [K, F], K not a multiple of 4

    def body(bb, xv):
        acc = bb.emit(relax.op.matmul(xv, relax.const(w), out_dtype="int32"))
        return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(0.5, "float32"))

    mod = _module(x.shape, body)
    rule, func = _scheduled_kernel(mod, X86)
    assert rule == "Int8DotProduct" and "vpdpbusd" in func.script()
    out = _run(mod, [x])
    assert_close(out, (x.astype(np.int64) @ w.astype(np.int64)).astype(np.float32) * 0.5, "exact")


def test_rule_leaves_float_and_unpacked_kernels_alone():
    def body(bb, xv):
        return relax.op.nn.conv2d(xv, relax.const(np.ones((16, 4, 1, 1), "float32")))

    rule, _ = _scheduled_kernel(_module((1, 4, 8, 8), body, "float32"), X86)
    assert rule != "Int8DotProduct"
    # a target without a dot instruction (SSE-only x86) keeps the plain int8 conv (no packing)
    sse = resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}).tvm_target()
    conv = _module((1, 4, 8, 8), lambda bb, xv: relax.op.nn.conv2d(
        xv, relax.const(np.ones((16, 4, 3, 3), "int8")), out_dtype="int32"))
    rule, func = _scheduled_kernel(conv, sse)
    assert rule != "Int8DotProduct" and "int8_pack" not in func.script()


# ------------------------------------------------------------------ models end to end


class SmallResNet(nn.Module):
    """resnet18's shapes in miniature: 7x7/2 stem, 3x3 blocks with a residual, a 1x1
    stride-2 projection, global pool, fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Conv2d(16, 32, 1, 2, bias=False)
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        x = torch.relu(self.b(x) + self.down(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def small_resnet_int8():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    calib = [torch.rand(1, 3, 32, 32, generator=g) for _ in range(4)]
    test = torch.rand(1, 3, 32, 32, generator=g)
    q = graphopt.optimize(model, (test,), "fold,quantize{mode=int8},fuse", calibration_data=calib)
    return q, test


@pytest.mark.parametrize("target, instruction", [pytest.param("x86", "vpdpbusd", marks=needs_vnni, id="avx512-vnni"),
                                                 pytest.param("x86-avx2", "vpmaddubsw", id="avx2")])
def test_int8_model_on_x86_matches_fake_quant(small_resnet_int8, target, instruction):
    """With AVX512-VNNI the int8 kernels are vpdpbusd zmm; on AVX2 (8 lanes, 16 registers)
    vpmaddubsw + vpmaddwd ymm, with the same integer result."""
    q, test = small_resnet_int8
    cm = graphopt.compile(q, target, pipeline="none")
    assert instruction in _asm(cm.executable)
    out, ref = cm(test), q(test)[0]
    # the int8 rung: integer kernels within one quantization step of the eager fake-quant reference
    assert_close(out, ref, "int8", fake_quant=True)


def test_int8_model_cross_compiled_for_arm_dotprod_uses_sdot(small_resnet_int8):
    from graphopt.targets.build import build
    from graphopt.targets.frontend.lower import lower_to_relax

    q, _ = small_resnet_int8
    executable = build(lower_to_relax(q), resolve_target("arm64-dotprod"), fusion="graph")
    asm = _asm(executable)
    assert "sdot" in asm and "vpdpbusd" not in asm


# ------------------------------------------------------------------ calibration data


def test_calibration_data_must_match_the_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    x, y = torch.randn(2, 8), torch.randn(2, 8)
    g = graphopt.capture(Two().eval(), (x, y))
    with pytest.raises(CalibrationError, match=r"item 0: expected 2 tensor\(s\) \(x, y\), got 3"):
        graphopt.calibrate(g, [(x, y, x)], progress=False)
    with pytest.raises(CalibrationError, match=r"item 1: expected 2 tensor\(s\) \(x, y\), got 1"):
        graphopt.calibrate(g, [(x, y), x], progress=False)
    with pytest.raises(CalibrationError, match=r"input 'y': expected shape \(batch, 8\), got \(2, 9\)"):
        graphopt.calibrate(g, [(x, torch.randn(2, 9))], progress=False)
    with pytest.raises(ValueError, match="expected dtype float32, got float64"):  # also a ValueError
        graphopt.calibrate(g, [(x, y.double())], progress=False)
    # another batch size is fine (the pass splits it), and so is a DataLoader's (x, label)
    ranges = graphopt.calibrate(g, [(torch.randn(4, 8), torch.randn(4, 8))], progress=False)
    assert ranges and all(lo <= hi for lo, hi in ranges.values())
    g1 = graphopt.capture(nn.Linear(8, 4).eval(), (x,))
    assert graphopt.calibrate(g1, [(x, torch.tensor([1, 0]))], progress=False)
