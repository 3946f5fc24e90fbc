"""The 8-lane (ymm) int8 dot-product steps of ``Int8DotProduct``: AVX-VNNI and AVX2.

Each is a TensorIntrin for ``C[8] += A[4] . B[8, 4]`` (8 int32 output channels, 4 reduction
elements each, ``B`` 32 contiguous bytes of the packed weight, ``A`` one 32-bit activation
word broadcast to every lane); the rule covers its 16-channel weight block in two.

* AVX-VNNI: ``vpdpbusd`` ymm on u8 activations (s8 + 128; int8.py subtracts the shift).
* AVX2: ``vpmaddubsw`` + ``vpmaddwd`` by ones + ``vpaddd`` on s8 activations, exact: the u8
  operand is ``|a|`` and the s8 operand ``sign(a) * w`` (``vpsignb``), so no s16 pair sum
  saturates (int8.py's module docstring has the bounds).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin

AVX_VNNI_INTRIN = "graphopt_dot_8x4_avx_vnni"
AVX2_SIGNED_INTRIN = "graphopt_dot_8x4_avx2_signed"


def _desc(activation_dtype: str):
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def dot_8x4_desc(
        A: T.Buffer((4,), activation_dtype, offset_factor=1),
        B: T.Buffer((8, 4), "int8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return dot_8x4_desc


def _avx_vnni_impl():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def dot_8x4_avx_vnni(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((8, 4), "int8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8x32 = T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32")
            b_i8x32 = B.vload([0, 0], dtype="int8x32")
            c_i32x8 = C.vload([0], dtype="int32x8")
            C[T.ramp(T.int32(0), 1, 8)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"),
                c_i32x8, a_u8x32, b_i8x32, dtype="int32x8")

    return dot_8x4_avx_vnni


def _avx2_signed_impl():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def dot_8x4_avx2_signed(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((8, 4), "int8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            a_i8x32 = T.reinterpret(T.broadcast(a_i32, 8), dtype="int8x32")
            # psign(a, a) = |a| with -128 -> 0x80, which vpmaddubsw reads as u8 128
            a_abs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b"),
                                            a_i8x32, a_i8x32, dtype="int8x32")
            w_signed = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b"),
                                               B.vload([0, 0], dtype="int8x32"), a_i8x32, dtype="int8x32")
            pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                            a_abs, w_signed, dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1), dtype="int32x8")

    return dot_8x4_avx2_signed


def ymm_intrinsic(instruction: str) -> str:
    """The TensorIntrin name of the 8-lane step for ``instruction`` ("avx-vnni" or "avx2"),
    registered on first use (TVMScript parsing costs a fraction of a second)."""
    name, activation, impl = ((AVX_VNNI_INTRIN, "uint8", _avx_vnni_impl) if instruction == "avx-vnni"
                              else (AVX2_SIGNED_INTRIN, "int8", _avx2_signed_impl))
    if TensorIntrin.get(name, allow_missing=True) is None:
        TensorIntrin.register(name, _desc(activation), impl())
    return name
