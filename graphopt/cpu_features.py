"""Which CPU features an artifact's code needs, and whether this machine has them.

A module built for ``x86-avx512`` and called on an AVX2 machine dies with SIGILL at its first
AVX-512 instruction: no Python exception, no message. The target's ``mcpu``/``mattr`` tell
LLVM which instructions it may emit; LLVM itself expands them into the full feature set
(``cascadelake`` implies avx512f/bw/dq/vl/cd and avx512vnni). ``compile`` records the
instruction-set extensions among them in the manifest (``cpu_features``, named as in
/proc/cpuinfo), and ``load`` and the first in-process call compare them with this machine's
before any kernel runs. Building for a machine one does not have stays allowed: that is a
cross build, refused only when someone tries to run it here.

Only extensions that add instructions are compared, not LLVM's tuning flags
(``fast-gather``, ``prefer-256-bit``): a machine lacks those without faulting.
"""

from __future__ import annotations

from typing import Any

from graphopt.errors import TargetError

# LLVM feature -> the /proc/cpuinfo flag of the same instructions, per architecture.
_X86 = {
    "sse": "sse", "sse2": "sse2", "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "lzcnt": "abm", "popcnt": "popcnt", "movbe": "movbe", "aes": "aes", "pclmul": "pclmulqdq", "adx": "adx",
    "sha": "sha_ni", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
    "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avx512vp2intersect": "avx512_vp2intersect", "avxvnni": "avx_vnni", "avxifma": "avx_ifma",
    "avxvnniint8": "avx_vnni_int8", "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
}
_AARCH64 = {
    "fp-armv8": "fp", "neon": "asimd", "fullfp16": "asimdhp", "dotprod": "asimddp", "i8mm": "i8mm",
    "bf16": "bf16", "sve": "sve", "sve2": "sve2", "crc": "crc32", "aes": "aes", "sha2": "sha2",
    "lse": "atomics", "rdm": "asimdrdm",
}


def _llvm_target(target_json: dict[str, Any]) -> dict[str, Any] | None:
    """The LLVM (CPU) part of a manifest's target: the target itself, or a GPU target's host."""
    tvm_part = target_json.get("tvm") or {}
    if tvm_part.get("kind") == "llvm":
        return tvm_part
    host = target_json.get("host")
    return host if isinstance(host, dict) and host.get("kind") == "llvm" else None


def required_cpu_features(target_json: dict[str, Any]) -> list[str]:
    """The instruction-set extensions code built for ``target_json`` (a TargetSpec's JSON) may
    use, as /proc/cpuinfo names them, sorted."""
    import tvm
    from tvm.target import codegen

    llvm = _llvm_target(target_json)
    if llvm is None:
        return []
    table = _AARCH64 if str(llvm.get("mtriple", "")).startswith("aarch64") else _X86
    try:
        features = codegen.llvm_get_cpu_features(tvm.target.Target(llvm))
    except Exception as e:  # TVM's own error types: an LLVM built without this architecture
        raise TargetError(f"cannot tell which CPU features target {llvm} needs: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}") from e
    return sorted({table[str(f)] for f in features if str(f) in table})


def missing_cpu_features(required: list[str]) -> list[str]:
    """The features of ``required`` this machine lacks; none when its features cannot be read
    (no /proc/cpuinfo): then nothing is known to be missing."""
    from graphopt.targets import registry

    here = registry.host_cpu_features()
    if not here:
        return []
    return [f for f in required if f not in here]


def check_cpu_features(manifest: dict[str, Any], what: str) -> None:
    """Raise TargetError naming the CPU features the code of ``manifest`` needs and this
    machine lacks. ``what`` names the module in the message ("artifact out/")."""
    required = manifest.get("cpu_features")
    if required is None:  # written before features were recorded: ask LLVM now
        required = required_cpu_features(manifest["target"])
    missing = missing_cpu_features(required)
    if missing:
        name = manifest["target"].get("name", "?")
        raise TargetError(f"{what} was built for target {name!r}, which needs CPU features this machine "
                          f"lacks: {', '.join(missing)}. Running it here would crash with an illegal "
                          "instruction (SIGILL); rebuild it for this machine (target 'x86') or run it "
                          "on one that has them")
