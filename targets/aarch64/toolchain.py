"""Cross-compilation toolchains for graphopt's non-host targets (today: aarch64 Linux).

TVM generates the machine code of an artifact itself (LLVM, selected by the target's ``mtriple``); what it
cannot do alone is *link* that object into the shared library ``model.so`` that ``export_library`` writes.
For a host build it calls the host ``g++``; for an aarch64 build it needs a linker for aarch64.

Two linkers qualify, tried in this order:

* **Zig** (the ``ziglang`` wheel, a dependency of graphopt): ``python -m ziglang cc -target
  aarch64-linux-gnu`` is a complete clang/lld cross toolchain with glibc link stubs for every architecture,
  so cross-compiling works right after ``pip install graphopt``, without system packages or root. The
  library is linked with ``-nostdlib -lc -lm``: TVM's objects call only libc/libm and the TVM runtime, all
  resolved by the dynamic loader on the device; leaving out Zig's default start files and compiler-rt keeps
  the first link on a machine at ~3 s instead of the minutes Zig spends building compiler-rt (and libc++
  for ``c++``) into its cache. Should LLVM ever emit a compiler-rt helper, loading the library fails with
  "undefined symbol", never a wrong result.
* **GNU** ``aarch64-linux-gnu-g++`` (Debian/Ubuntu packages ``gcc-aarch64-linux-gnu`` and
  ``g++-aarch64-linux-gnu``), used only where ``ziglang`` is not installed.

Design:

* **Finding** is pure (``find_cross_compiler``): the Zig wheel, else ``shutil.which("<triple>-g++")``.
* **Ensuring** (``ensure_cross_toolchain``) never installs behind the caller's back. With ``install=False``
  (the default) a missing linker is a :class:`~graphopt.errors.ToolchainError` whose message names both
  ways to get one (``pip install ziglang``, or the exact ``apt-get`` command); with ``install=True`` it
  runs that apt-get command itself, which needs Debian/Ubuntu, ``apt-get`` and root (each failure again a
  ``ToolchainError`` saying which).
* **Linking** (``cross_compiler_fcompile``) returns the callable that ``export_library(path, fcompile=...)``
  expects: ``fcompile(output, objects, options)`` with the ``output_format`` and ``get_target_triple``
  attributes that ``tvm.support.cc.cross_compiler`` would set.

The apt helpers (``apt_unavailable_reason``, ``apt_install``) are shared with ``emulation.py``, which installs
``qemu-user`` and downloads arm64 packages the same way; they take the error class to raise so that each
module reports failures with its own typed error.

Example::

    from graphopt.targets.aarch64.toolchain import cross_compiler_fcompile
    ex.export_library("artifact/model.so", fcompile=cross_compiler_fcompile("aarch64-linux-gnu"))
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphopt.errors import ArtifactError, ToolchainError

#: Debian multiarch triple of 64-bit ARM Linux; also the prefix of its GNU cross tools.
AARCH64_TRIPLE = "aarch64-linux-gnu"

#: ELF ``e_machine`` values (``/usr/include/elf.h``) that graphopt checks artifacts against.
EM_X86_64 = 62
EM_AARCH64 = 183

# LLVM spells the same platform several ways ("aarch64-linux-gnu", "aarch64-unknown-linux-gnu",
# "arm64-linux-gnu"); the GNU cross tools only exist under the Debian spelling.
_LLVM_ARCH_TO_DEBIAN = {"aarch64": "aarch64", "arm64": "aarch64"}

# apt's lock and dpkg's own prompts must never block a test run waiting for a human.
_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


#: What to pass Zig after its objects: the C and math libraries of the device (Zig's glibc link stubs).
_ZIG_DEVICE_LIBRARIES = ("-lc", "-lm")
# A link takes well under a second once Zig's cache holds the glibc stubs (~3 s the first time).
_LINK_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class CrossCompiler:
    """A linker for shared libraries of one cross triple: Zig's clang/lld driver or a GNU ``<triple>-g++``."""

    #: ``"zig"`` or ``"gnu"``.
    toolchain: str
    #: The command that starts the driver, e.g. ``(python, "-m", "ziglang", "cc")`` or ``("/usr/bin/...-g++",)``.
    command: tuple[str, ...]
    triple: str = AARCH64_TRIPLE

    def __str__(self) -> str:
        return " ".join(self.command)

    def link_shared(self, output: str, objects: Sequence[str], options: Sequence[str] | None = None) -> None:
        """Link ``objects`` into the shared library ``output``; ToolchainError with the linker's output."""
        if self.toolchain == "zig":
            cmd = [*self.command, "-target", self.triple, "-shared", "-fPIC", "-nostdlib", "-o", output,
                   *objects, *(options or ()), *_ZIG_DEVICE_LIBRARIES]
        else:
            cmd = [*self.command, "-shared", "-fPIC", "-o", output, *objects, *(options or ())]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_LINK_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ToolchainError(f"linking {output} for {self.triple} did not finish within "
                                 f"{_LINK_TIMEOUT_S:.0f} s: {' '.join(cmd)}") from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise ToolchainError(f"linking {output} for {self.triple} failed (exit code {proc.returncode}): "
                                 f"{' '.join(cmd)}\n{tail}")


def cross_compiler_name(triple: str = AARCH64_TRIPLE) -> str:
    """The C++ driver of the GNU cross toolchain for ``triple``, e.g. ``aarch64-linux-gnu-g++``."""
    return f"{triple}-g++"


def cross_toolchain_packages(triple: str = AARCH64_TRIPLE) -> tuple[str, str]:
    """Debian/Ubuntu packages that provide the cross toolchain for ``triple``.

    Debian names them ``gcc-<triple>`` and ``g++-<triple>`` for every cross triple it ships
    (aarch64-linux-gnu, arm-linux-gnueabihf, riscv64-linux-gnu, ...).
    """
    return (f"gcc-{triple}", f"g++-{triple}")


def install_command(packages: Sequence[str]) -> str:
    """The shell command a user would run to install ``packages`` (quoted in error messages)."""
    return "apt-get install -y --no-install-recommends " + " ".join(packages)


def find_zig() -> tuple[str, ...] | None:
    """The command that runs Zig's C driver from the ``ziglang`` wheel, or None when it is not installed."""
    if importlib.util.find_spec("ziglang") is None:
        return None
    return (sys.executable, "-m", "ziglang", "cc")


def find_cross_compiler(triple: str = AARCH64_TRIPLE) -> CrossCompiler | None:
    """The linker for ``triple`` artifacts (Zig first, then ``<triple>-g++`` on PATH), or None when neither
    is installed."""
    zig = find_zig()
    if zig is not None:
        return CrossCompiler("zig", zig, triple)
    gnu = shutil.which(cross_compiler_name(triple))
    return CrossCompiler("gnu", (gnu,), triple) if gnu is not None else None


def debian_triple(mtriple: str) -> str | None:
    """Map an LLVM ``mtriple`` to the Debian triple of its GNU cross toolchain (None: not supported).

    >>> debian_triple("aarch64-unknown-linux-gnu")
    'aarch64-linux-gnu'
    """
    parts = mtriple.split("-")
    arch = _LLVM_ARCH_TO_DEBIAN.get(parts[0])
    if arch is None or "linux" not in parts:
        return None
    return f"{arch}-linux-gnu"


def apt_unavailable_reason() -> str | None:
    """Why this process cannot install system packages with apt, or None when it can.

    Checked up front so that callers (and the emulated tests, which must *skip* rather than fail when a
    machine simply cannot install the tools) can tell "cannot install here" from "install went wrong".
    """
    if not sys.platform.startswith("linux"):
        return f"apt-get is only available on Linux (this is {sys.platform})"
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        return "apt-get/dpkg not found: this is not a Debian/Ubuntu system"
    if os.geteuid() != 0:
        return "installing system packages needs root (run the command with sudo, or as root)"
    return None


def run_apt(
    args: Sequence[str],
    *,
    error_cls: type[Exception],
    what: str,
    cwd: Path | None = None,
    timeout: float = 1800.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``apt-get``/``dpkg`` non-interactively; raise ``error_cls`` with the output's tail on failure."""
    env = {**os.environ, **_APT_ENV}
    try:
        proc = subprocess.run(
            list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise error_cls(f"{what}: `{' '.join(args)}` did not finish within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise error_cls(f"{what}: `{' '.join(args)}` failed with exit code {proc.returncode}:\n{tail}")
    return proc


def apt_install(
    packages: Sequence[str], *, error_cls: type[Exception] = ToolchainError, purpose: str = ""
) -> None:
    """Install Debian ``packages`` with apt-get, running ``apt-get update`` first only if needed.

    An image fresh from a registry often has empty package lists, so a failed install is retried once after
    ``apt-get update``; a machine whose lists are current pays no update.
    """
    reason = apt_unavailable_reason()
    if reason is not None:
        raise error_cls(
            f"cannot install {' '.join(packages)}{purpose}: {reason}. "
            f"Install them yourself with: {install_command(packages)}"
        )
    print(f"graphopt: installing {' '.join(packages)}{purpose} with apt-get ...", file=sys.stderr, flush=True)
    # Wait for a concurrent apt/dpkg run (another test process, unattended-upgrades) instead of failing.
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "--no-install-recommends", *packages]
    try:
        run_apt(cmd, error_cls=error_cls, what=f"installing {' '.join(packages)}")
    except error_cls:
        print(
            "graphopt: apt-get install failed; running apt-get update and retrying ...",
            file=sys.stderr,
            flush=True,
        )
        run_apt(["apt-get", "update"], error_cls=error_cls, what="updating apt package lists")
        run_apt(cmd, error_cls=error_cls, what=f"installing {' '.join(packages)}")


def ensure_cross_toolchain(install: bool = False, triple: str = AARCH64_TRIPLE) -> CrossCompiler:
    """Return the linker for ``triple`` artifacts, installing the GNU cross toolchain with apt-get first when
    neither Zig nor GNU is there and ``install`` is true.

    Raises:
        ToolchainError: no linker and ``install`` is false (the message names ``pip install ziglang`` and the
            apt command), or installing failed or is impossible here (no apt-get, not root).
    """
    found = find_cross_compiler(triple)
    if found is not None:
        return found
    packages = cross_toolchain_packages(triple)
    name = cross_compiler_name(triple)
    if not install:
        raise ToolchainError(
            f"no linker for {triple} artifacts (export_library): the `ziglang` package is not installed and "
            f"the {triple} cross compiler `{name}` is not on PATH. Install either with: pip install ziglang, "
            f"or: {install_command(packages)} (or call ensure_cross_toolchain(install=True))"
        )
    apt_install(packages, error_cls=ToolchainError, purpose=f" (the {triple} cross toolchain)")
    found = find_cross_compiler(triple)
    if found is None:
        raise ToolchainError(
            f"installed {' '.join(packages)} but `{name}` is still not on PATH "
            f"(PATH={os.environ.get('PATH', '')})"
        )
    return found


def cross_compiler_fcompile(triple: str = AARCH64_TRIPLE, install: bool = False) -> Callable[..., Any]:
    """The ``fcompile`` for ``Executable.export_library`` that links a shared library for ``triple``.

    Raises ToolchainError (see :func:`ensure_cross_toolchain`) when no cross linker is installed.
    """
    linker = ensure_cross_toolchain(install=install, triple=triple)

    def fcompile(output: str, objects: Sequence[str], options: Sequence[str] | None = None) -> None:
        linker.link_shared(output, objects, options)

    # What export_library reads off an fcompile (tvm.support.cc.cross_compiler sets the same two).
    fcompile.output_format = "so"  # type: ignore[attr-defined]
    fcompile.get_target_triple = lambda: triple  # type: ignore[attr-defined]
    return fcompile


def fcompile_for_target(target: Any, install: bool = False) -> Callable[..., Any] | None:
    """The ``fcompile`` an artifact for ``target`` (a ``tvm.target.Target``) needs; None means the host's.

    Targets with an ``mtriple`` for another architecture than this machine's need a cross linker.
    """
    mtriple = str(target.attrs["mtriple"]) if "mtriple" in target.attrs else ""
    arch = mtriple.split("-")[0]
    # TVM fills in the host's triple for a plain "llvm" target (e.g. "x86_64-conda-linux-gnu").
    if not mtriple or _LLVM_ARCH_TO_DEBIAN.get(arch, arch) == os.uname().machine:
        return None
    triple = debian_triple(mtriple)
    if triple is None:
        raise ToolchainError(
            f"no cross toolchain known for mtriple {mtriple!r}; "
            f"supported: {', '.join(sorted(_LLVM_ARCH_TO_DEBIAN))} Linux triples"
        )
    return cross_compiler_fcompile(triple, install=install)


def elf_machine(path: str | os.PathLike[str]) -> int:
    """The ELF ``e_machine`` of the file at ``path`` (183 = aarch64, 62 = x86-64).

    Raises ArtifactError if the file is not a 64-bit little-endian ELF object.
    """
    with open(path, "rb") as f:
        header = f.read(20)
    # e_ident: magic, EI_CLASS=2 (64-bit), EI_DATA=1 (little-endian); e_machine is the u16 at offset 18.
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise ArtifactError(f"{path} is not an ELF object (first bytes {header[:4]!r})")
    if header[4] != 2 or header[5] != 1:
        raise ArtifactError(
            f"{path} is not a 64-bit little-endian ELF object (EI_CLASS={header[4]}, EI_DATA={header[5]})"
        )
    return struct.unpack_from("<H", header, 18)[0]
