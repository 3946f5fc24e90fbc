"""Named targets: presets users type (``x86``, ``arm64``, ``cuda:sm_80``...) -> TVM targets.

TVM 0.27 only accepts targets as dicts (the flag-string form is gone), so every preset is
a dict. ``x86`` describes *this* host: its CPU features are read from /proc/cpuinfo
because LLVM's own detection names this VM's CPU ``rocketlake`` and would drop AVX-512
VNNI/AMX. A custom TVM target dict is accepted as is.

``vector_isa`` reads what the CPU schedule rules size their register tiles from (vector
width, register count, int8 dot-product instruction) off a TVM target's ``mtriple``,
``mcpu`` and ``mattr``, through LLVM's own feature tables: a preset, a custom dict and a
cross target all describe their machine the same way, and no rule keeps a list of CPU names.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from graphopt.errors import TargetError


@dataclass(frozen=True)
class TargetSpec:
    """A resolved target: what TVM needs, and what graphopt needs to know about it."""

    name: str
    tvm: dict[str, Any]
    host: dict[str, Any] | None = None  # the CPU side for GPU targets
    description: str = ""
    features: tuple[str, ...] = ()
    cross_triple: str | None = None  # set when the library must be cross-compiled

    @property
    def kind(self) -> str:
        return self.tvm["kind"]

    @property
    def is_cpu(self) -> bool:
        return self.kind == "llvm"

    @property
    def arch(self) -> str:
        """x86_64, aarch64 or cuda."""
        if self.kind == "cuda":
            return "cuda"
        triple = self.tvm.get("mtriple", "")
        return "aarch64" if triple.startswith("aarch64") else "x86_64"

    @property
    def isa(self) -> "VectorISA | None":
        """The vector ISA of a CPU target (None for CUDA)."""
        return vector_isa(self.tvm_target()) if self.is_cpu else None

    def tvm_target(self):
        import tvm

        if self.host is not None:
            return tvm.target.Target(self.tvm, host=self.host)
        return tvm.target.Target(self.tvm)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "tvm": self.tvm, "host": self.host, "features": list(self.features),
                "cross_triple": self.cross_triple}


def _cpuinfo() -> tuple[str, set[str]]:
    """(vendor, feature flags) of this machine's first CPU, from /proc/cpuinfo (``flags`` on
    x86, ``Features`` on aarch64)."""
    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return vendor, flags


def host_cpu_features() -> set[str]:
    return _cpuinfo()[1]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ISA extensions LLVM may use on its own once a CPU model implies them, named as in
# /proc/cpuinfo -> as in LLVM. A CPU model is only a bundle of features: if the model we
# pick implies one this machine lacks, LLVM emits it and the program dies with SIGILL
# (seen: sapphirerapids implies AVX-VNNI; on a Zen 4 host the {vex} vpdpwssd it chose for
# int8 loops crashed). So every one of these the host lacks is switched off explicitly.
_GUARDED_FEATURES = {
    "avx_vnni": "avxvnni", "amx_tile": "amx-tile", "amx_int8": "amx-int8", "amx_bf16": "amx-bf16",
    "avx512_fp16": "avx512fp16", "avx512_bf16": "avx512bf16", "avx512_vnni": "avx512vnni",
    "avx_ifma": "avxifma", "avx_vnni_int8": "avxvnniint8", "avx512_vp2intersect": "avx512vp2intersect",
}


def _x86_host() -> TargetSpec:
    vendor, flags = _cpuinfo()
    amd = vendor == "AuthenticAMD"
    if "amx_int8" in flags:
        mcpu = "sapphirerapids"
    elif amd and "avx512f" in flags:
        mcpu = "znver4"
    elif amd and "avx2" in flags:
        mcpu = "znver2"
    elif "avx512_vnni" in flags:
        mcpu = "cascadelake"
    elif "avx512f" in flags:
        mcpu = "skylake-avx512"
    elif "avx2" in flags:
        mcpu = "haswell"
    else:
        mcpu = "x86-64"
    mattr = sorted(f"-{llvm}" for linux, llvm in _GUARDED_FEATURES.items() if linux not in flags)
    if "avx_vnni" in flags and "avx512_vnni" not in flags:
        mattr.append("+avxvnni")  # AVX2 hosts with AVX-VNNI (Alder Lake): haswell does not imply it
    feats = tuple(sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
                                                  "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16",
                                                  "avx512_fp16")))
    tvm = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": _cores()}
    if mattr:
        tvm["mattr"] = mattr
    return TargetSpec("x86", tvm, description=f"this host ({vendor or 'x86'}, {mcpu}, {_cores()} cores)",
                      features=feats)


def _aarch64(name: str, mcpu: str, mattr: list[str], desc: str, cores: int = 4) -> TargetSpec:
    tvm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "mattr": mattr, "num-cores": cores}
    feats = tuple(a.lstrip("+") for a in mattr)
    return TargetSpec(name, tvm, description=desc, features=feats, cross_triple="aarch64-linux-gnu")


def _cuda(name: str, arch: str, desc: str, host: dict[str, Any] | None = None) -> TargetSpec:
    host = host or {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    return TargetSpec(name, {"kind": "cuda", "arch": arch}, host=host, description=desc, features=(arch,),
                      cross_triple=host.get("mtriple") if "aarch64" in host.get("mtriple", "") else None)


def _presets() -> dict[str, TargetSpec]:
    x86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "num-cores": _cores()}
    presets = {
        "x86": _x86_host(),
        "x86-avx2": TargetSpec("x86-avx2", {**x86, "mcpu": "haswell"},
                               description="any x86-64 with AVX2+FMA (Haswell and newer)", features=("avx2", "fma")),
        "x86-avx-vnni": TargetSpec("x86-avx-vnni", {**x86, "mcpu": "haswell", "mattr": ["+avxvnni"]},
                                   description="x86-64 with AVX2 and AVX-VNNI, no AVX-512 (Alder Lake and later)",
                                   features=("avx2", "fma", "avx_vnni")),
        "x86-avx512": TargetSpec("x86-avx512", {**x86, "mcpu": "cascadelake"},
                                 description="x86-64 with AVX-512 and VNNI (Cascade Lake and newer)",
                                 features=("avx512f", "avx512_vnni")),
        "arm64": _aarch64("arm64", "generic", ["+neon"], "generic aarch64 with NEON"),
        "arm64-dotprod": _aarch64("arm64-dotprod", "cortex-a76", ["+neon", "+dotprod"],
                                  "aarch64 with the dot-product extension (Cortex-A76/A78, Neoverse N1)"),
        "rpi4": _aarch64("rpi4", "cortex-a72", ["+neon"], "Raspberry Pi 4 (Cortex-A72, 4 cores)"),
        "rpi5": _aarch64("rpi5", "cortex-a76", ["+neon", "+dotprod"], "Raspberry Pi 5 (Cortex-A76, 4 cores)"),
        "cuda": _cuda("cuda", "sm_80", "NVIDIA GPU, compute capability 8.0 (A100); cuda:sm_XX for others"),
        "jetson-orin": _cuda("jetson-orin", "sm_87", "NVIDIA Jetson Orin (sm_87) with an aarch64 host",
                             host={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78",
                                   "mattr": ["+neon", "+dotprod"]}),
    }
    return presets


_CUDA_ARCH = re.compile(r"^cuda:(sm_\d{2,3}[a-z]?)$")


def list_targets() -> dict[str, TargetSpec]:
    return _presets()


def resolve_target(target: "str | dict[str, Any] | TargetSpec") -> TargetSpec:
    """Turn a preset name, ``cuda:sm_XX``, a TVM target dict or a TargetSpec into a TargetSpec."""
    if isinstance(target, TargetSpec):
        return target
    if isinstance(target, dict):
        return _from_dict(target)
    if not isinstance(target, str):
        raise TargetError(f"a target is a name like 'x86' or a TVM target dict, got {type(target).__name__}")
    presets = _presets()
    if target in presets:
        return presets[target]
    m = _CUDA_ARCH.match(target)
    if m:
        return _cuda(target, m.group(1), f"NVIDIA GPU {m.group(1)}")
    raise TargetError(f"unknown target {target!r}; valid targets: {', '.join(presets)}, cuda:sm_XX "
                      "(e.g. cuda:sm_86), or a TVM target dict such as {'kind': 'llvm', 'mcpu': 'znver4'}")


def _from_dict(d: dict[str, Any]) -> TargetSpec:
    import tvm

    d = dict(d)
    host = d.pop("host", None)
    if "kind" not in d:
        raise TargetError(f"target dict {d} has no 'kind' (e.g. 'llvm' or 'cuda')")
    if d["kind"] not in ("llvm", "cuda"):
        raise TargetError(f"target kind {d['kind']!r} is not supported; graphopt builds for 'llvm' (CPUs) and 'cuda'")
    try:
        tvm.target.Target(d, host=host) if host else tvm.target.Target(d)
    except Exception as e:  # TVM raises its own error types for bad attributes
        raise TargetError(f"invalid TVM target {d}: {str(e).splitlines()[-1] if str(e) else e}") from None
    if d["kind"] == "llvm":
        d.setdefault("num-cores", _cores())
        triple = d.get("mtriple", "")
        cross = triple if triple and not triple.startswith(platform.machine()) else None
        return TargetSpec("custom", d, description="custom TVM target", cross_triple=cross)
    return TargetSpec("custom", d, host=host or {"kind": "llvm"}, description="custom TVM target")


# ------------------------------------------------------------------------- vector ISA

INT8_DOT_INSTRUCTIONS = ("vnni-512", "avx-vnni-256", "vpmaddubsw-256", "i8mm", "sdot", "none")


@dataclass(frozen=True)
class VectorISA:
    """The vector unit a CPU target's kernels are tiled for.

    ``vector_bits`` is the widest register fp32 arithmetic uses (128 for SSE and NEON, 256
    for AVX2, 512 for AVX-512), ``registers`` the architectural vector registers (16 ymm
    for AVX2 and SSE, 32 zmm for AVX-512, 32 for AArch64), ``int8_dot`` the best int8
    multiply-accumulate the target has: ``vnni-512`` (AVX512-VNNI ``vpdpbusd`` zmm),
    ``avx-vnni-256`` (AVX-VNNI ``vpdpbusd`` ymm), ``vpmaddubsw-256`` (AVX2 pair sums),
    ``i8mm`` (AArch64 ``smmla``), ``sdot`` (AArch64 dotprod) or ``none``."""

    arch: str  # "x86_64" or "aarch64"
    vector_bits: int
    registers: int
    int8_dot: str
    features: frozenset[str] = frozenset()

    def lanes(self, dtype_bits: int = 32) -> int:
        """Elements of ``dtype_bits`` bits in one vector register."""
        return max(self.vector_bits // dtype_bits, 1)

    @property
    def accumulators(self) -> int:
        """Registers a register tile may keep accumulators in: three quarters of them
        (24 of 32, 12 of 16), the rest for the weight vectors and the broadcast input of
        each step (BLIS's and MLAS's Haswell sgemm kernels hold 12 of 16 as accumulators)."""
        return self.registers - self.registers // 4

    @property
    def name(self) -> str:
        if self.arch == "aarch64":
            return "neon"
        return {512: "avx512", 256: "avx2"}.get(self.vector_bits, "sse")

    def __str__(self) -> str:
        return (f"{self.name} ({self.lanes()} fp32 lanes, {self.registers} vector registers, "
                f"int8 dot: {self.int8_dot})")


# Features that decide the vector ISA, by their LLVM names.
_ISA_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "neon", "dotprod", "i8mm")


def vector_isa(target: Any) -> VectorISA:
    """The VectorISA of an LLVM target (a tvm Target, a TVM target dict, a preset name or a
    TargetSpec)."""
    import tvm

    if isinstance(target, (str, dict, TargetSpec)):
        target = resolve_target(target).tvm_target()
    elif not isinstance(target, tvm.target.Target):
        raise TargetError(f"no vector ISA for {target!r}: expected a CPU target")
    if target.kind.name != "llvm":
        raise TargetError(f"no vector ISA for a {target.kind.name} target: the CPU schedule rules need an llvm one")
    return _vector_isa(str(target))


@lru_cache(maxsize=64)
def _vector_isa(target_json: str) -> VectorISA:
    import tvm

    target = tvm.target.Target(target_json)
    has = {f for f in _ISA_FEATURES if tvm.target.codegen.target_has_features(f, target)}
    triple = str(target.attrs.get("mtriple") or tvm.target.codegen.llvm_get_system_triple())
    if triple.startswith(("aarch64", "arm64")) or "neon" in has:
        dot = "i8mm" if "i8mm" in has else "sdot" if "dotprod" in has else "none"
        return VectorISA("aarch64", 128, 32, dot, frozenset(has))
    if "avx512f" in has:
        bits, registers = 512, 32
    elif "avx2" in has:
        bits, registers = 256, 16
    else:
        bits, registers = 128, 16
    if "avx512vnni" in has and bits == 512:
        dot = "vnni-512"
    elif "avxvnni" in has:
        dot = "avx-vnni-256"
    elif "avx2" in has:
        dot = "vpmaddubsw-256"
    else:
        dot = "none"
    return VectorISA("x86_64", bits, registers, dot, frozenset(has))
