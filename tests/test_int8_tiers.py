"""int8 kernels on every x86 tier: AVX2 (vpmaddubsw) and AVX-VNNI (ymm vpdpbusd).

This host runs AVX-512, so both narrower tiers' code runs here. Each kernel test builds one
Relax int8 op for the tier's target, checks the ``Int8DotProduct`` rule tensorized it with the
tier's instruction (in the TIR and in the assembly), and compares the result with an integer
reference, bit-exact, on operands at the extremes where a u8 x s8 pair sum leaves int16.
The model test compiles a small quantized CNN + linear for each tier and compares it with its
fake-quant eager graph on the int8 rung.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.targets.registry import resolve_target, vector_isa
from graphopt.testing import assert_close

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402

from graphopt.targets.build import build  # noqa: E402
from graphopt.targets.cpu.schedules import cpu_layout_passes, schedule_primfunc  # noqa: E402
from graphopt.targets.cpu.schedules.int8 import dot_instruction, weight_fits  # noqa: E402

# tier -> (preset, what the TIR calls, what the assembly shows)
TIERS = {
    "avx2": ("x86-avx2", "llvm.x86.avx2.pmadd.ub.sw", "vpmaddubsw"),
    "avx-vnni": ("x86-avx-vnni", "llvm.x86.avx512.vpdpbusd.256", "vpdpbusd"),
}
tiers = pytest.mark.parametrize("tier", list(TIERS))


def _module(x_shape, body):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _kernel_script(mod, target) -> str:
    """(rule, TIR script) of the one scheduled kernel of ``mod``."""
    with target:
        fused = tvm.transform.Sequential([*cpu_layout_passes(target), relax.transform.LegalizeOps(),
                                          relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
                                          relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    (func,) = [f for _, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)]
    rule, scheduled = schedule_primfunc(func, target)
    return rule, scheduled.script()


def _asm(executable) -> str:
    texts, stack = [], [executable.mod]
    while stack:
        mod = stack.pop()
        if mod.kind == "llvm":
            texts.append(mod.inspect_source("asm"))
        stack.extend(mod.imports)
    return "\n".join(texts)


def _build_and_run(mod, preset, x):
    executable = build(mod, resolve_target(preset), fusion="tvm")
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    return out, _asm(executable)


def _extreme_operands(rng, x_shape, w_shape):
    """Random int8 operands with runs of the extremes: activations -128 and 127 (u8 0 and 255
    after vpdpbusd's shift), weights -127 and 127 (the quantizer's symmetric range)."""
    x = rng.integers(-128, 128, x_shape).astype("int8")
    w = rng.integers(-127, 128, w_shape).astype("int8")
    x.reshape(-1)[: x.size // 3] = 127
    x.reshape(-1)[x.size // 3: x.size // 2] = -128
    w.reshape(w.shape[0], -1)[: w.shape[0] // 2] = 127
    w.reshape(w.shape[0], -1)[w.shape[0] // 2:: 3] = -127
    return x, w


def _saturating_pair_sums(a_u8: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What a plain ``vpmaddubsw`` on u8 activations computes for rows a . w (K a multiple of
    2): each pair sum clamped to int16. The reference the exact kernels must *not* match."""
    pairs = (a_u8.astype(np.int64)[..., None, :] * w.astype(np.int64)).reshape(*a_u8.shape[:-1], w.shape[0], -1, 2)
    return np.clip(pairs.sum(-1), -(1 << 15), (1 << 15) - 1).sum(-1)


# ------------------------------------------------------------------------- the tiers


def test_each_tier_gets_its_own_int8_instruction():
    assert dot_instruction(resolve_target("x86-avx2").tvm_target()) == "avx2"
    assert dot_instruction(resolve_target("x86-avx-vnni").tvm_target()) == "avx-vnni"
    assert dot_instruction(resolve_target("x86-avx512").tvm_target()) == "vnni"
    # from features, not names: haswell plus AVX-VNNI in mattr is the AVX-VNNI tier
    custom = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "mattr": ["+avxvnni"]}
    assert vector_isa(custom).int8_dot == "avx-vnni-256"
    assert dot_instruction(resolve_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}).tvm_target()) is None
    # the AVX2 kernel negates weights: a -128 weight (not from our quantizer) keeps the plain form
    assert weight_fits(np.array([-127, 127], "int8"), "avx2")
    assert not weight_fits(np.array([-128, 5], "int8"), "avx2") and weight_fits(np.array([-128], "int8"), "vnni")


# ---------------------------------------------------------------------- the kernels


@tiers
def test_conv_kernel_is_exact_where_pair_sums_leave_int16(tier):
    preset, intrinsic, mnemonic = TIERS[tier]
    rng = np.random.default_rng(3)
    x, w = _extreme_operands(rng, (1, 8, 9, 9), (32, 8, 3, 3))

    def body(bb, xv):
        acc = bb.emit(relax.op.nn.conv2d(xv, relax.const(w), padding=[1, 1], out_dtype="int32"))
        return relax.op.add(acc, relax.const(np.arange(32, dtype="int32").reshape(1, -1, 1, 1)))

    mod = _module(x.shape, body)
    rule, script = _kernel_script(mod, resolve_target(preset).tvm_target())
    assert rule == "Int8DotProduct" and intrinsic in script
    out, asm = _build_and_run(mod, preset, x)
    assert mnemonic in asm and "zmm" not in asm
    ref = torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                                     padding=1).round().to(torch.int64).numpy() + np.arange(32).reshape(1, -1, 1, 1)
    assert_close(out, ref.astype(np.int32), "exact")


@tiers
def test_dense_kernel_is_exact_where_pair_sums_leave_int16(tier):
    preset, intrinsic, mnemonic = TIERS[tier]
    rng = np.random.default_rng(4)
    x, w_fk = _extreme_operands(rng, (1, 5, 36), (40, 36))  # 40 channels: not whole 16-blocks

    def body(bb, xv):
        return relax.op.matmul(xv, relax.const(np.ascontiguousarray(w_fk.T)), out_dtype="int32")

    mod = _module(x.shape, body)
    rule, script = _kernel_script(mod, resolve_target(preset).tvm_target())
    assert rule == "Int8DotProduct" and intrinsic in script
    out, asm = _build_and_run(mod, preset, x)
    assert mnemonic in asm
    exact = x.astype(np.int64) @ w_fk.T.astype(np.int64)
    assert_close(out, exact.astype(np.int32), "exact")
    # the operands are ones a saturating vpmaddubsw gets wrong: the check above means something
    shifted = (x.astype(np.int64) + 128).astype(np.uint8)
    naive = _saturating_pair_sums(shifted, w_fk) - 128 * w_fk.astype(np.int64).sum(1)
    assert (naive != exact).any()


# ------------------------------------------------------------------------ a model


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(32 * 8 * 8, 64)

    def forward(self, x):
        return self.fc(torch.flatten(self.body(x), 1))


@pytest.fixture(scope="module")
def convnet_int8():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    calib = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(4)]
    # fallback=false: every layer integer, whatever its size (the kernels are the subject here)
    q = graphopt.optimize(ConvNet().eval(), (calib[0],), "fold,quantize{mode=int8,fallback=false},fuse",
                          calibration_data=calib)
    return q, torch.rand(1, 3, 16, 16, generator=g)


@tiers
def test_int8_model_matches_its_fake_quant_graph(convnet_int8, tier):
    preset, _, mnemonic = TIERS[tier]
    q, test = convnet_int8
    cm = graphopt.compile(q, preset, pipeline="none")
    asm = _asm(cm.executable)
    assert mnemonic in asm and "zmm" not in asm
    assert_close(cm(test), q(test)[0], "int8", fake_quant=True)


def test_quantize_for_avx2_keeps_linears_in_float_and_says_why():
    # the quantize pass decides from the target alone: no build
    g = torch.Generator().manual_seed(2)
    calib = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(2)]
    graph = graphopt.optimize(ConvNet().eval(), (calib[0],), "fold,quantize{mode=int8}", calibration_data=calib,
                              target="x86-avx2")
    report = graph.annotations["quantize"]
    assert report["quantized"] == ["body.2"]  # body.0 is a 27K-MAC conv: too small to pay
    reasons = {r["layer"]: r["reason"] for r in report["float_why"]}
    assert reasons["fc"] == "linear on avx2: the int8 kernel measured slower than float"
    assert reasons["body.0"].startswith("small layer")
