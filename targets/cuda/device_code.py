"""The device code of a CUDA build: what the artifact carries, and PTX from nvcc when installed.

TVM 0.27's CUDA codegen (``target.build.cuda``) always produces CUDA C: the device module
it returns on a machine without the CUDA driver is a fallback module of format ``"cuda"``,
and the CUDA runtime compiles that source when the artifact is *loaded* on the GPU
machine, through ``tvm_callback_cuda_compile`` (NVRTC by default, nvcc with
``TVM_CUDA_COMPILE_MODE=nvcc``). The compiler library has no hook to compile at build
time, and a CUDA module holding PTX can only be created by the CUDA runtime library,
which needs ``libcuda.so.1`` (the driver): on a build machine without a GPU the artifact
cannot embed PTX/cubin. (Checked: ``ffi.Module.create.cuda`` is registered only by
libtvm_runtime_cuda.so; the LLVM ``nvptx`` target fails in this build's LLVM.)

What a build can do, and does here when ``nvcc`` is on PATH: compile the generated CUDA C
ahead of time for the target's arch. That proves the source the device will JIT compiles
for that arch (a kernel nvcc rejects is a CompilationError at build time, not a load failure
on the device), and gives the PTX, which the artifact can ship next to ``model.so``.
:class:`DeviceCode` records which of the two happened, for the manifest.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from graphopt.errors import CompilationError


@dataclass(frozen=True)
class DeviceCode:
    """The device side of a CUDA executable."""

    arch: str  # "sm_80"
    embedded: str  # the format inside model.so: "cuda-c" (TVM 0.27 always embeds source)
    load_time_compiler: str  # what compiles it on the device: "nvrtc" (TVM's default callback)
    kernels: tuple[str, ...]  # the __global__ functions
    ptx: bytes | None = None  # nvcc's PTX for ``arch``, when nvcc was on PATH at build time
    nvcc_version: str | None = None

    def to_json(self) -> dict:
        return {"arch": self.arch, "embedded": self.embedded, "load_time_compiler": self.load_time_compiler,
                "kernels": len(self.kernels), "ptx": self.ptx is not None, "nvcc": self.nvcc_version}


def device_modules(executable) -> list:
    """The ``cuda`` modules in an executable's module tree."""
    found, stack = [], [executable.mod]
    while stack:
        mod = stack.pop()
        if mod.kind == "cuda":
            found.append(mod)
        stack.extend(mod.imports)
    return found


def cuda_source(executable) -> str:
    return "\n".join(m.inspect_source() for m in device_modules(executable))


def kernel_names(source: str) -> tuple[str, ...]:
    return tuple(sorted(set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source))))


def nvcc_version() -> str | None:
    """nvcc's release ("13.0"), or None when nvcc is not on PATH."""
    if shutil.which("nvcc") is None:
        return None
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def compile_device_code(executable, target) -> DeviceCode:
    """Describe the executable's device code; with nvcc on PATH, compile it to PTX for the
    target's arch (CompilationError when nvcc rejects it)."""
    import tvm
    from tvm.support import nvcc

    arch = str(target.attrs.get("arch", ""))
    source = cuda_source(executable)
    kernels = kernel_names(source)
    version = nvcc_version()
    ptx = None
    if version is not None and source:
        try:
            with tvm.target.Target(target):
                ptx = bytes(nvcc.compile_cuda(source, target_format="ptx", arch=[f"-arch={arch}"],
                                              compiler="nvcc"))
        except (RuntimeError, ValueError, OSError) as e:  # nvcc's diagnostics come as RuntimeError
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            raise CompilationError(f"nvcc {version} rejected the CUDA code generated for {arch}: "
                                   f"{lines[-1] if lines else type(e).__name__}") from e
    return DeviceCode(arch=arch, embedded="cuda-c", load_time_compiler="nvrtc", kernels=kernels, ptx=ptx,
                      nvcc_version=version)
