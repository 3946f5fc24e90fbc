"""int8 x int8 -> int32 conv2d / dense on dot-product instructions (x86 and aarch64).

targets/frontend/quantized.py lowers every quantized conv/linear/matmul to a plain Relax
``conv2d`` / ``matmul`` with an int8 input, a *constant* int8 weight and ``out_dtype=int32``.
Scheduled like a float kernel that multiplies one byte pair per instruction; the CPUs we
target have instructions that do four per 32-bit lane (the target's ``VectorISA.int8_dot``
says which, from its features):

* ``vnni``: AVX512-VNNI ``vpdpbusd`` zmm, 16 lanes x 4 products of *unsigned* u8 x signed s8;
* ``avx-vnni``: AVX-VNNI ``vpdpbusd`` ymm (``{vex}``), the same on 8 lanes;
* ``avx2``: ``vpmaddubsw`` (u8 x s8 -> pair sums in s16) + ``vpmaddwd`` by ones (-> s32)
  + ``vpaddd``, 8 lanes (MLAS's AVX2 U8S8 kernel);
* ``sdot``: aarch64 dotprod, 4 lanes x 4 products of s8 x s8.

``vpmaddubsw`` saturates its s16 pair sums: ``255 * -127 * 2`` does not fit. MLAS accepts
the saturation, oneDNN and ORT's ``reduce_range`` quantize weights to 7 bits instead.
Here the product is exact with 8-bit weights: the activation stays signed (s8, no shift)
and the kernel multiplies ``|a|`` (u8, at most 128) by ``sign(a) * w`` (``vpsignb``; weights
are symmetric in [-127, 127], so negating one never wraps), whose pair sums are at most
``128 * 127 * 2 = 32512``. The price is one ``vpsignb`` per product (``|a|`` is one per
activation word, shared by every channel block): 4 instructions per 32 multiply-adds
instead of 3. Measured with ``--target x86-avx2`` on a Sapphire-Rapids-class Xeon, one
thread: the saturating form ran a 64-channel 3x3 conv at 28x28 17% faster and a 128x128
linear 13% faster, at the cost of wrong sums at the extremes (tests/test_int8_tiers.py
builds such operands) or of a weight bit (ORT's ``reduce_range``). Sign-extending both
operands to s16 for ``vpmaddwd`` alone, also exact, issues as many instructions per product
(``vpmaddwd`` + ``vpaddd`` per 16) and moves twice the weight bytes; it is not measured here.
A weight of -128 (a QDQ model from elsewhere) would wrap, and such a layer keeps the plain
form.

Two parts, one per pipeline stage:

1. ``int8_layout_pass`` (Relax, before LegalizeOps; wired in by ``cpu_layout_passes``)
   replaces each such call by a TE kernel in the layout the instruction wants:
   the weight is re-packed *at compile time* (numpy) to ``[F/16][K/4] .. [16][4]`` blocks of
   16 output channels x 4 reduction elements (64 contiguous bytes: one zmm VNNI operand,
   two ymm ones or four ``sdot`` ones); the activation is re-packed at run time to 4
   reduction elements innermost (NCHW -> N[C/4]HW[4]: one broadcast 32-bit load), in the
   kernel's prologue, and for ``vpdpbusd`` shifted to unsigned (``u8 = s8 + 128``). The
   shift adds ``128 * sum_k W[f, k]`` to every output; the kernel subtracts that
   per-channel constant in its first epilogue step, so the result is bit-identical.
   The accumulator is laid out ``[.., F/16, .., 16]`` (output channels innermost), so
   16 consecutive channels are one zmm register (two ymm, four NEON).
2. ``Int8DotProduct`` (a schedule rule, first in RULES) finds those kernels after FuseTIR
   (their reduction block is named ``int8_dot``), tiles the fused epilogue's output into
   ``pixels x (16 * FV)`` channel tiles, computes the accumulator tile under it in
   registers, and tensorizes the inner (16 channels x 4) step with the target's intrinsic
   (in 16 / lanes pieces).

Targets without any of these (SSE-only x86, NEON without dotprod) keep the plain form (the
float-style rules schedule it, and the quantize pass keeps those layers in float).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.s_tir import TensorIntrin
from tvm.target import Target

from graphopt.rewrite import Rewrite

from . import base
from .int8_ymm import ymm_intrinsic
from .layout import CallSite, call_rewrite_pass, constant_array, static_shape

# Output channels per weight block / per accumulator register (VNNI: 16 x int32 = 512 bit).
BLOCK_F = 16
# Reduction elements per 32-bit lane of one dot-product instruction.
BLOCK_K = 4
DOT_BLOCK = "int8_dot"  # name of the reduction block the schedule rule looks for

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")


# VectorISA.int8_dot -> the instruction this rule tensorizes with, and its int32 lanes.
_INSTRUCTIONS = {"vnni-512": "vnni", "avx-vnni-256": "avx-vnni", "vpmaddubsw-256": "avx2",
                 "i8mm": "sdot", "sdot": "sdot"}
LANES = {"vnni": 16, "avx-vnni": 8, "avx2": 8, "sdot": 4}
# Instructions that multiply an unsigned activation (u8 = s8 + 128) by the signed weight.
_UNSIGNED_ACTIVATION = ("vnni", "avx-vnni")


def dot_instruction(target: Target | None) -> str | None:
    """"vnni", "avx-vnni", "avx2", "sdot" or None: the int8 instruction this rule tensorizes with.

    From the target's vector ISA (its features, never its CPU name): AVX512-VNNI, AVX-VNNI,
    AVX2, or AArch64 dotprod (which every i8mm core also has)."""
    if target is None or target.kind.name != "llvm":
        return None
    return _INSTRUCTIONS.get(base.vector_isa(target).int8_dot)


def weight_fits(w: np.ndarray, instruction: str) -> bool:
    """Whether the kernel for ``instruction`` computes ``x . w`` exactly for these weights:
    the AVX2 sign trick negates weights, and -128 has no int8 negation."""
    return instruction != "avx2" or int(w.min(initial=0)) >= -127


# ------------------------------------------------------------------ compile-time packing


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def pack_weight(w: np.ndarray) -> np.ndarray:
    """[F, K, *taps] int8 -> [F/16, K/4, *taps, 16, 4] (zero-padded to whole blocks)."""
    f, k = w.shape[:2]
    taps = w.shape[2:]
    fp, kp = _ceil_to(f, BLOCK_F), _ceil_to(k, BLOCK_K)
    padded = np.zeros((fp, kp, *taps), dtype="int8")
    padded[:f, :k] = w
    blocks = padded.reshape(fp // BLOCK_F, BLOCK_F, kp // BLOCK_K, BLOCK_K, *taps)
    order = (0, 2, *range(4, 4 + len(taps)), 1, 3)
    return np.ascontiguousarray(blocks.transpose(order))


def shift_correction(w: np.ndarray, instruction: str) -> np.ndarray:
    """int32 per output channel to add to the accumulator: -128 * sum_k W (VNNI's u8 shift)."""
    if instruction not in _UNSIGNED_ACTIVATION:
        return np.zeros(w.shape[0], dtype="int32")
    total = w.reshape(w.shape[0], -1).astype("int64").sum(axis=1)
    return (-128 * total).astype("int32")


def _packed_activation(value, instruction: str):
    """An int8 activation element as the dot operand: u8 (s8 + 128) for vpdpbusd, else s8."""
    if instruction in _UNSIGNED_ACTIVATION:
        return (value.astype("int32") + 128).astype("uint8")
    return value


# ------------------------------------------------------------------------ TE kernels


def conv2d_te(x, wp, corr, *, channels, strides, padding, dilation, instruction):
    """NCHW int8 conv2d on a packed weight ``wp`` [F/16, C/4, KH, KW, 16, 4]; int32 NCHW out."""
    n, c, h, w = (int(d) for d in x.shape)
    fo_ext, co_ext, kh, kw = (int(d) for d in wp.shape[:4])
    sh, sw = strides
    ph, pw = padding
    dh, dw = dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    pad_value = _packed_activation(tirx.const(0, "int8"), instruction)

    def pack(b, co, y, xx, ci):
        ch = co * BLOCK_K + ci
        inside = tirx.all(ch < c, y >= ph, y < h + ph, xx >= pw, xx < w + pw)
        value = _packed_activation(x[b, tirx.min(ch, c - 1), y - ph, xx - pw], instruction)
        return tirx.if_then_else(inside, value, pad_value)

    xp = te.compute((n, co_ext, h + 2 * ph, w + 2 * pw, BLOCK_K), pack, name="int8_pack")
    rco = te.reduce_axis((0, co_ext), "rco")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rci = te.reduce_axis((0, BLOCK_K), "rci")
    acc = te.compute(
        (n, fo_ext, oh, ow, BLOCK_F),
        lambda b, fo, y, xx, fi: te.sum(
            xp[b, rco, y * sh + ry * dh, xx * sw + rx * dw, rci].astype("int32")
            * wp[fo, rco, ry, rx, fi, rci].astype("int32"),
            axis=[rco, ry, rx, rci]),
        name=DOT_BLOCK)
    return te.compute((n, channels, oh, ow),
                      lambda b, f, y, xx: acc[b, f // BLOCK_F, y, xx, f % BLOCK_F] + corr[f],
                      name="int8_unpack")


def dense_te(x, wp, corr, *, channels, instruction):
    """[..., M, K] int8 x packed weight [F/16, K/4, 16, 4] -> [..., M, F] int32."""
    shape = [int(d) for d in x.shape]
    k = shape[-1]
    lead = shape[:-1]
    rows = int(np.prod(lead))
    fo_ext, ko_ext = (int(d) for d in wp.shape[:2])

    def unflatten(r):
        idx = []
        for d in reversed(lead):
            idx.append(r % d)
            r = r // d
        return list(reversed(idx))

    def pack(r, ko, ki):
        kk = ko * BLOCK_K + ki
        value = _packed_activation(x[(*unflatten(r), tirx.min(kk, k - 1))], instruction)
        return tirx.if_then_else(kk < k, value, _packed_activation(tirx.const(0, "int8"), instruction))

    xp = te.compute((rows, ko_ext, BLOCK_K), pack, name="int8_pack")
    rko = te.reduce_axis((0, ko_ext), "rko")
    rki = te.reduce_axis((0, BLOCK_K), "rki")
    acc = te.compute(
        (fo_ext, rows, BLOCK_F),
        lambda fo, r, fi: te.sum(xp[r, rko, rki].astype("int32") * wp[fo, rko, fi, rki].astype("int32"),
                                 axis=[rko, rki]),
        name=DOT_BLOCK)

    def unpack(*idx):
        r = 0
        for i, d in zip(idx[:-1], lead):
            r = r * d + i
        f = idx[-1]
        return acc[f // BLOCK_F, r, f % BLOCK_F] + corr[f]

    return te.compute((*lead, channels), unpack, name="int8_unpack")


# ------------------------------------------------------------------ the Relax rewrite


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _constant(expr) -> np.ndarray | None:
    return constant_array(expr) if isinstance(expr, tvm.ir.expr.Constant) else None


def _int8_operands(site: CallSite):
    x, w = site.call.args[0], site.call.args[1]
    if str(site.call.attrs.out_dtype) != "int32" or _dtype(x) != "int8":
        return None
    weight = _constant(w)
    if weight is None or str(weight.dtype) != "int8" or static_shape(x.ty) is None:
        return None
    return x, weight


def _int8_rules(instruction: str) -> list[Rewrite]:
    def conv2d_match(site: CallSite):
        ops = _int8_operands(site) if site.is_call_to(_CONV2D) else None
        attrs = site.call.attrs
        if ops is None or int(attrs.groups) != 1 or not weight_fits(ops[1], instruction):
            return None
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "OIHW", "NCHW"):
            return None
        pad = [int(p) for p in attrs.padding]
        if len(pad) != 4 or pad[0] != pad[2] or pad[1] != pad[3]:
            return None  # asymmetric padding: leave it to the generic rules
        return ops[0], ops[1], pad

    def conv2d_replace(site: CallSite, bound):
        x, w, pad = bound
        attrs = site.call.attrs
        return site.call_te(
            conv2d_te, x, relax.const(pack_weight(w), "int8"),
            relax.const(shift_correction(w, instruction), "int32"),
            channels=w.shape[0], strides=[int(s) for s in attrs.strides], padding=pad[:2],
            dilation=[int(d) for d in attrs.dilation], instruction=instruction,
            primfunc_name_hint="int8_conv2d")

    def dense_match(site: CallSite):
        ops = _int8_operands(site) if site.is_call_to(_MATMUL) else None
        if ops is None or not weight_fits(ops[1], instruction):
            return None
        x, w = ops
        if w.ndim != 2 or len(static_shape(x.ty)) < 2:
            return None  # batched constant weights do not occur; keep the generic path
        return x, np.ascontiguousarray(w.T)  # matmul's weight is [K, F]

    def dense_replace(site: CallSite, bound):
        x, w_fk = bound
        return site.call_te(
            dense_te, x, relax.const(pack_weight(w_fk), "int8"),
            relax.const(shift_correction(w_fk, instruction), "int32"),
            channels=w_fk.shape[0], instruction=instruction, primfunc_name_hint="int8_dense")

    return [Rewrite("int8-conv2d", conv2d_match, conv2d_replace, "int8 conv2d -> packed dot-product kernel"),
            Rewrite("int8-matmul", dense_match, dense_replace, "int8 matmul -> packed dot-product kernel")]


def int8_layout_passes(target: Target) -> list:
    """Relax pass packing int8 conv2d/matmul for the target's dot instruction ([] if none).

    Runs before LegalizeOps and before ``conv_weight_to_hwio`` (which would otherwise
    re-lay out the int8 conv weights for the float rule)."""
    instruction = dot_instruction(target)
    if instruction is None:
        return []

    return [call_rewrite_pass("graphopt.PackInt8DotProduct", _int8_rules(instruction))]


# ------------------------------------------------------------------ the schedule rule


VNNI_BYTES_INTRIN = "graphopt_dot_16x4_vnni_llvm22"


def _register_vnni_bytes_intrin() -> None:
    """Register vpdpbusd as LLVM >= 22 declares it: (<16 x i32>, <64 x i8>, <64 x i8>).

    TVM 0.27's own "dot_16x4_vnni" passes <16 x i32> operands and fails LLVM's verifier.
    Done on first use: importing TVM's intrinsic modules costs tens of seconds."""
    dot_product_16x4_u8i8i32_desc = _tensor_intrin_module("x86").dot_product_16x4_u8i8i32_desc
    from tvm.script import tirx as T

    if TensorIntrin.get(VNNI_BYTES_INTRIN, allow_missing=True) is not None:
        return

    @T.prim_func(s_tir=True)
    def vnni_byte_operands(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_u8x4 = A.vload([0], "uint8x4")
            a_i32 = T.reinterpret(a_u8x4, dtype="int32")
            a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
            b_i8x64 = B.vload([0, 0], dtype="int8x64")
            c_i32x16 = C.vload([0], dtype="int32x16")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                c_i32x16, a_u8x64, b_i8x64, dtype="int32x16")

    TensorIntrin.register(VNNI_BYTES_INTRIN, dot_product_16x4_u8i8i32_desc, vnni_byte_operands)


def _tensor_intrin_module(name: str):
    """``tvm.s_tir.tensor_intrin.<name>`` without running its package's ``__init__``.

    That ``__init__`` registers every CUDA tensor-core intrinsic too, parsing each through
    TVMScript (``inspect.stack()`` per call): 20-70 s on this machine, paid by every process
    that builds an int8 model. The x86 and arm_cpu modules alone load in under a second.
    They are registered under their real names, so a later ``import tvm.s_tir.tensor_intrin``
    reuses them instead of registering their intrinsics twice.
    """
    full = f"tvm.s_tir.tensor_intrin.{name}"
    if full not in sys.modules:
        import tvm.s_tir

        path = os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin", f"{name}.py")
        spec = importlib.util.spec_from_file_location(full, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[full]
            raise
    return sys.modules[full]


def _intrinsic(instruction: str) -> tuple[str, int]:
    """(TensorIntrin name, output lanes it covers) for ``instruction``."""
    if instruction == "vnni":
        if tvm.target.codegen.llvm_version_major() >= 22:
            _register_vnni_bytes_intrin()
            return VNNI_BYTES_INTRIN, 16
        return _tensor_intrin_module("x86").VNNI_DOT_16x4_INTRIN, 16
    if instruction in ("avx-vnni", "avx2"):
        return ymm_intrinsic(instruction), LANES[instruction]
    _tensor_intrin_module("dot_product_common")
    ARM_DOT_4x4_i8_SDOT_INTRIN = _tensor_intrin_module("arm_cpu").ARM_DOT_4x4_i8_SDOT_INTRIN

    return ARM_DOT_4x4_i8_SDOT_INTRIN, 4


def _tensorize_inner(sch, acc, fi_loop, rci_loop, instruction: str) -> None:
    """Tensorize the (16 channels x 4) innermost step; narrower instructions cover it in
    16 / lanes pieces (ymm: two 8x4, sdot: four 4x4)."""
    intrin, lanes = _intrinsic(instruction)
    if lanes == BLOCK_F:
        sch.tensorize(fi_loop, intrin)
        return
    fj, fk = sch.split(fi_loop, [None, lanes])
    sch.reorder(fj, fk, rci_loop)
    sch.unroll(fj)
    sch.tensorize(fk, intrin)


def _register_tile(pixels: int, f_blocks: int, max_acc: int, lanes_per_block: int) -> tuple[int, int]:
    """(pixels RN, channel blocks FV) of the accumulator tile: RN*FV*regs <= max_acc.

    Two channel blocks when possible (each broadcast activation word feeds two dot
    instructions), then as many pixels as registers allow."""
    regs = max(BLOCK_F // lanes_per_block, 1)  # registers per 16-channel block
    fv = base.largest_divisor(f_blocks, 2) or 1
    rn = base.largest_divisor(pixels, max(max_acc // (fv * regs), 1)) or 1
    return rn, fv


@dataclass(frozen=True)
class Int8Match:
    instruction: str
    conv: bool  # conv2d (9 iters) or dense (5)
    pixels: int  # the accumulator tile: pixels (rows for dense) ...
    channel_blocks: int  # ... x 16-channel blocks


class Int8DotProduct(base.CPURule):
    """Tensorized int8 conv2d / dense kernels made by ``int8_layout_pass`` (see module doc)."""

    def is_target_available(self, target: Target) -> bool:
        return dot_instruction(target) is not None

    def match(self, info: base.FuncInfo, target: Target) -> Int8Match | None:
        if info.main is None:
            return None
        sch = info.sch
        block = sch.get(info.main)
        if not block.name_hint.startswith(DOT_BLOCK) or base.iter_kinds(block) not in ("SSSSSRRRR", "SSSRR"):
            return None
        if not info.pre or not sch.get(info.pre[-1]).name_hint.startswith("int8_pack"):
            return None
        instruction = dot_instruction(target)
        conv = len(block.iter_vars) == 9
        _, lanes = _intrinsic(instruction)
        max_acc = base.vector_isa(target).accumulators
        exts = [int(iv.dom.extent) for iv in block.iter_vars]
        # conv: (n, fo, y, x, ..): a row of pixels; dense: (fo, rows, ..)
        pixels, f_blocks = (exts[3], exts[1]) if conv else (exts[1], exts[0])
        rn, fv = _register_tile(pixels, f_blocks, max_acc, lanes)
        return Int8Match(instruction, conv, rn, fv)

    def schedule(self, info: base.FuncInfo, m: Int8Match, target: Target):
        sch = info.sch
        block = sch.get(info.main)
        pack = info.pre[-1]
        for b in info.pre[:-1]:  # e.g. a zero-point pad in front of the conv: read through it
            sch.compute_inline(b)
        post = base.inline_post(sch, info.post)
        conv, rn, fv = m.conv, m.pixels, m.channel_blocks
        cores = base.num_cores(target)
        exts = [int(iv.dom.extent) for iv in block.iter_vars]
        acc = info.main
        if conv:
            done = _conv_under_output(sch, acc, post, rn, fv, exts, cores)
        else:
            done = _dense_under_output(sch, acc, post, rn, fv, exts, cores)
        if not done:
            _standalone(sch, acc, rn, fv, conv, cores)
            for b in post:
                base.parallel_vectorize_injective(sch, b, base.simd_lanes(target), cores)
        # Both layouts end (first reduction, .., pixels, channel blocks, 16 channels, 4 k).
        loops = sch.get_loops(acc)
        init = sch.decompose_reduction(acc, loops[-7 if conv else -5])
        sch.vectorize(sch.get_loops(init)[-1])
        _tensorize_inner(sch, acc, loops[-2], loops[-1], m.instruction)
        # the tile is a few registers; the intrinsics are declared on "global" buffers, so
        # the scope changes only after tensorize
        sch.set_scope(init, 0, "local")
        base.parallel_vectorize_injective(sch, pack, base.simd_lanes(target, 8), cores)
        return sch


def _order_accumulator(sch, acc, conv: bool) -> None:
    """Loops of the (compute_at'ed or cache) accumulator tile: reduction outer, then
    pixels x channel blocks (unrolled: one register each), then the 16 x 4 dot step."""
    loops = sch.get_loops(acc)
    if conv:
        b, fo, y, x, fi, rco, ry, rx, rci = loops[-9:]
        sch.reorder(b, y, rco, ry, rx, x, fo, fi, rci)
        sch.unroll(x)
        sch.unroll(fo)
    else:
        fo, r, fi, rko, rki = loops[-5:]
        sch.reorder(rko, r, fo, fi, rki)
        sch.unroll(r)
        sch.unroll(fo)


def _same_extents(sch, block, extents) -> bool:
    blk = sch.get(block)
    return [int(iv.dom.extent) for iv in blk.iter_vars] == list(extents)


def _conv_under_output(sch, acc, post, rn, fv, exts, cores) -> bool:
    """Tile the single NCHW output block; compute each accumulator tile inside it."""
    n_ext, fo_ext, y_ext, x_ext = exts[:4]
    if len(post) != 1 or fo_ext % fv:
        return False
    out = post[0]
    channels = int(sch.get(out).iter_vars[1].dom.extent) if len(sch.get(out).iter_vars) == 4 else -1
    if channels != fo_ext * BLOCK_F or not _same_extents(sch, out, (n_ext, channels, y_ext, x_ext)):
        return False
    b, f, y, x = sch.get_loops(out)
    foo, fvl, fi = sch.split(f, [None, fv, BLOCK_F])
    xo, xi = sch.split(x, [None, rn])
    sch.reorder(b, foo, y, xo, fvl, fi, xi)
    if cores > 1:
        sch.parallel(sch.fuse(b, foo, y))
    sch.compute_at(acc, xo, preserve_unit_loops=True)
    _order_accumulator(sch, acc, conv=True)
    if rn >= 4:
        # contiguous NCHW stores and a vector epilogue (requantize: mul, round, clip,
        # cast); the strided reads come from the register tile
        sch.vectorize(xi)
    return True


def _dense_under_output(sch, acc, post, rn, fv, exts, cores) -> bool:
    fo_ext, rows = exts[:2]
    if len(post) != 1 or fo_ext % fv:
        return False
    out = post[0]
    out_exts = [int(iv.dom.extent) for iv in sch.get(out).iter_vars]
    if out_exts[-1] != fo_ext * BLOCK_F or int(np.prod(out_exts[:-1])) != rows:
        return False
    loops = sch.get_loops(out)
    r = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    ro, ri = sch.split(r, [None, rn])
    foo, fvl, fi = sch.split(loops[-1], [None, fv, BLOCK_F])
    sch.reorder(ro, foo, ri, fvl, fi)
    sch.vectorize(fi)
    if cores > 1 and rows * fo_ext * BLOCK_F * exts[3] * BLOCK_K >= (1 << 17):
        sch.parallel(sch.fuse(ro, foo))
        sch.compute_at(acc, sch.get_loops(out)[0], preserve_unit_loops=True)
    else:
        sch.compute_at(acc, foo, preserve_unit_loops=True)
    _order_accumulator(sch, acc, conv=False)
    return True


def _standalone(sch, acc, rn, fv, conv: bool, cores: int):
    """Accumulator written to its own buffer (epilogue not tileable with it): a register
    tile via cache_write, then the plain write-back."""
    wb = sch.cache_write(acc, 0, "global")  # made "local" after tensorize (see apply)
    loops = sch.get_loops(acc)
    if conv:
        b, fo, y, x, fi, rco, ry, rx, rci = loops
        foo, fvl = sch.split(fo, [None, fv])
        xo, xi = sch.split(x, [None, rn])
        sch.reorder(b, foo, y, xo, rco, ry, rx, xi, fvl, fi, rci)
        outer = sch.fuse(b, foo, y)
        inner = (xi, fvl)
        anchor = xo
    else:
        fo, r, fi, rko, rki = loops
        foo, fvl = sch.split(fo, [None, fv])
        ro, ri = sch.split(r, [None, rn])
        sch.reorder(foo, ro, rko, ri, fvl, fi, rki)
        outer = sch.fuse(foo, ro)
        inner = (ri, fvl)
        anchor = outer
    if cores > 1:
        sch.parallel(outer)
    for lp in inner:
        sch.unroll(lp)
    sch.reverse_compute_at(wb, anchor, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(wb)[-1])  # 16 channels: one register
    return wb
