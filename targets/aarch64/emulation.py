"""Run aarch64 graphopt artifacts on this x86 machine, under qemu-user emulation.

An artifact cross-compiled for aarch64 can only be trusted once it has *run* on aarch64 and matched eager
PyTorch. Without a board, qemu-user does it: ``qemu-aarch64 -L SYSROOT`` runs an aarch64 Linux program,
resolving its dynamic loader and libraries inside SYSROOT. The program here is an aarch64 CPython 3.11 that
imports the aarch64 wheels of TVM's runtime and numpy, and runs ``runner.py`` on the artifact.

The emulated environment (an ``EmulatorEnv``) is a folder with two parts:

* ``sysroot/``: Debian's arm64 ``.deb`` files of python3.11 and the shared libraries it and TVM need,
  fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (installing ``python3:arm64`` for real
  would conflict with the amd64 python3, and would change the machine);
* ``site/``: the manylinux aarch64 wheels of apache-tvm (the host's version: the runtime must match the code
  generator that built the artifact), apache-tvm-ffi (pinned: 0.1.15 segfaults with tvm 0.27), numpy,
  ml_dtypes and typing_extensions, fetched with ``pip download`` and unzipped; ``PYTHONPATH`` points here.

Building it downloads ~130 MB (445 MB unpacked) and takes ~20 s on a fast mirror, so it is done once per
machine and cached under ``~/.cache/graphopt/aarch64/<key>`` (``$GRAPHOPT_AARCH64_CACHE`` or the ``cache_dir``
argument move it), where ``<key>`` names the Python, TVM and tvm-ffi versions and the layout version: a
changed version gets a fresh folder instead of a silently mismatched one. Two rules keep the cache sound:

* **one builder**: an exclusive ``flock`` on ``<cache_dir>/.lock`` is held while building (and while
  installing qemu, since apt has its own lock that would fail a second installer); a process that finds the
  lock taken says so and waits for the first one's result;
* **atomic**: the build happens in ``<cache_dir>/.tmp-<key>-<pid>`` and is renamed into place only after a
  smoke test (importing tvm's runtime and numpy under the emulator) passed and the stamp file
  ``graphopt-env.json`` was written. A folder without the stamp is never used; leftovers of a killed build are
  removed by the next builder.

Host requirements are installed with apt when missing (``qemu-user``; the ``arm64`` dpkg architecture so that
``apt-get download`` sees arm64 packages), which needs Debian/Ubuntu and root. The sysroot package list is
Debian bookworm's (python3.11 and its libraries). Anything that cannot be obtained is an
:class:`~graphopt.errors.EmulationError` that says what is missing and how to install it.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphopt.artifact_folder import checked_library
from graphopt.errors import ArtifactError, EmulationError, InputError

from .toolchain import EM_AARCH64, apt_install, apt_unavailable_reason, elf_machine, install_command, run_apt

#: Layout of the cached folder; bump it when the build steps change so old caches are not reused.
LAYOUT_VERSION = 1
PYTHON_VERSION = "3.11"
#: apache-tvm-ffi 0.1.15 segfaults in tvm.ir.save_json with apache-tvm 0.27.0.post1.
TVM_FFI_VERSION = "0.1.14.post1"
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
QEMU_APT_PACKAGES = ("qemu-user",)

#: arm64 Debian (bookworm) packages whose files make up the sysroot: python3.11 and every library that it,
#: its stdlib extension modules and TVM's runtime load.
# fmt: off
SYSROOT_DEBS = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "zlib1g", "libexpat1", "libffi8", "libssl3", "libstdc++6", "libgcc-s1", "libbz2-1.0",
    "liblzma5", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "libuuid1", "libtirpc3",
    "libnsl2", "libdb5.3", "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libcom-err2",
    "libkrb5support0", "libkeyutils1", "libcrypt1",
)
# fmt: on

STAMP_FILE = "graphopt-env.json"
RUNNER_SCRIPT = Path(__file__).with_name("runner.py")
# Waiting for another process's build longer than this means it is stuck (a build takes ~20-60 s).
_LOCK_TIMEOUT_S = 3600.0
# Imports exactly what runner.py imports (~2 s emulated; the full `import tvm` takes ~8 s).
_SMOKE_TEST = (
    "import os, sys; os.environ['TVM_USE_RUNTIME_LIB'] = '1'\n"
    "import numpy, tvm\n"
    "from tvm.runtime.vm import VirtualMachine\n"
    "import platform; print(platform.machine(), sys.version.split()[0], numpy.__version__, tvm.__version__)\n"
)


def _progress(message: str) -> None:
    print(f"graphopt: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class EmulatorEnv:
    """A ready aarch64 environment: a sysroot with python3.11, a site folder with tvm+numpy, and qemu."""

    root: Path
    qemu: str
    #: The emulated CPU model. ``max`` enables every extension qemu implements (dotprod, i8mm, fp16, SVE...), so
    #: artifacts built for ``arm64-dotprod`` and similar presets run; an instruction qemu does not implement
    #: is a SIGILL, reported as a failed run.
    cpu: str = "max"

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / f"python{PYTHON_VERSION}"

    def command(self, script_path: str | os.PathLike[str], args: Sequence[str] = ()) -> list[str]:
        """The command line that runs ``script_path`` with the emulated Python."""
        return [
            self.qemu, "-cpu", self.cpu, "-L", str(self.sysroot), str(self.python), str(script_path),
            *map(str, args),
        ]

    def environment(self) -> dict[str, str]:
        """The process environment of an emulated run: the host's, minus anything that points Python at
        host (x86) packages."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
        env["PYTHONPATH"] = str(self.site)
        # ~/.local/lib/python3.11/site-packages may hold x86 builds of the same packages.
        env["PYTHONNOUSERSITE"] = "1"
        return env

    def run_python(
        self,
        script_path: str | os.PathLike[str],
        args: Sequence[str] = (),
        timeout: float = 600.0,
        *,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Python script under ``qemu-aarch64``; like ``subprocess.run`` without ``check``.

        A non-zero exit status is returned, not raised; exceeding ``timeout`` raises EmulationError.
        """
        cmd = self.command(script_path, args)
        try:
            return subprocess.run(
                cmd,
                env=self.environment(),
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmulationError(
                f"emulated run of {script_path} did not finish within {timeout:.0f} s "
                f"(command: {' '.join(cmd)})"
            ) from exc


# --------------------------------------------------------------------------------------------- building


def find_qemu() -> str | None:
    """Path of the aarch64 user-mode emulator (``qemu-user`` or ``qemu-user-static`` provide one)."""
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def ensure_qemu(install: bool = True) -> str:
    """Path of qemu-aarch64, installing ``qemu-user`` with apt-get when missing and ``install`` is true."""
    found = find_qemu()
    if found is not None:
        return found
    if not install:
        raise EmulationError(
            f"qemu-aarch64 is not on PATH; it is needed to run aarch64 artifacts here. "
            f"Install it with: {install_command(QEMU_APT_PACKAGES)}"
        )
    apt_install(QEMU_APT_PACKAGES, error_cls=EmulationError, purpose=" (aarch64 user-mode emulator)")
    found = find_qemu()
    if found is None:
        raise EmulationError(f"installed {' '.join(QEMU_APT_PACKAGES)} but qemu-aarch64 is still not on PATH")
    return found


def default_cache_dir() -> Path:
    """``$GRAPHOPT_AARCH64_CACHE``, else ``$XDG_CACHE_HOME/graphopt/aarch64``, else
    ``~/.cache/graphopt/aarch64``."""
    if os.environ.get("GRAPHOPT_AARCH64_CACHE"):
        return Path(os.environ["GRAPHOPT_AARCH64_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphopt" / "aarch64"


def _host_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def wheel_requirements() -> list[str]:
    """The aarch64 wheels of the site folder, pinned to the host's versions where it has them."""
    tvm_version = _host_version("apache-tvm")
    if tvm_version is None:
        raise EmulationError(
            "apache-tvm is not installed on the host; the emulated runtime must match the "
            "host's TVM that builds the artifacts (pip install apache-tvm==0.27.0.post1)"
        )
    reqs = [f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={TVM_FFI_VERSION}"]
    for dist in ("numpy", "ml_dtypes", "typing_extensions"):
        version = _host_version(dist)
        reqs.append(f"{dist}=={version}" if version else dist)
    return reqs


def env_key() -> str:
    """Name of the cache folder for this host's versions.

    Example: ``py3.11-tvm0.27.0.post1-ffi0.1.14.post1-v1``.
    """
    return f"py{PYTHON_VERSION}-tvm{_host_version('apache-tvm')}-ffi{TVM_FFI_VERSION}-v{LAYOUT_VERSION}"


def _ensure_arm64_architecture() -> None:
    """Let apt see arm64 packages (``dpkg --add-architecture arm64`` + ``apt-get update``) if it does not."""
    foreign = run_apt(
        ["dpkg", "--print-foreign-architectures"], error_cls=EmulationError, what="listing dpkg architectures"
    ).stdout.split()
    if "arm64" in foreign or os.uname().machine == "aarch64":
        return
    _progress("adding the arm64 dpkg architecture and updating apt package lists (arm64 indexes) ...")
    run_apt(["dpkg", "--add-architecture", "arm64"], error_cls=EmulationError, what="adding arm64 to dpkg")
    run_apt(["apt-get", "update"], error_cls=EmulationError, what="updating apt package lists")


def _download_debs(dest: Path) -> list[Path]:
    names = [f"{pkg}:arm64" for pkg in SYSROOT_DEBS]
    _progress(f"fetching {len(names)} arm64 Debian packages for the sysroot: {' '.join(SYSROOT_DEBS)}")
    cmd = ["apt-get", "download", *names]
    try:
        run_apt(cmd, error_cls=EmulationError, what="downloading arm64 packages", cwd=dest)
    except EmulationError:
        # Lists may predate the arm64 architecture or be outdated (404 on superseded versions).
        _progress("apt-get download failed; running apt-get update and retrying ...")
        run_apt(["apt-get", "update"], error_cls=EmulationError, what="updating apt package lists")
        run_apt(cmd, error_cls=EmulationError, what="downloading arm64 packages", cwd=dest)
    debs = sorted(dest.glob("*.deb"))
    if len(debs) != len(SYSROOT_DEBS):
        raise EmulationError(
            f"expected {len(SYSROOT_DEBS)} .deb files from apt-get download, found {len(debs)}"
        )
    return debs


def _download_wheels(dest: Path) -> list[Path]:
    reqs = wheel_requirements()
    _progress(
        f"fetching aarch64 wheels ({WHEEL_PLATFORM}, Python {PYTHON_VERSION}) with pip: {' '.join(reqs)}"
    )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--platform",
        WHEEL_PLATFORM,
        "--python-version",
        PYTHON_VERSION,
        "--disable-pip-version-check",
        "-d",
        str(dest),
        *reqs,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except subprocess.TimeoutExpired as exc:
        raise EmulationError(f"pip download of {' '.join(reqs)} did not finish within 1800 s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise EmulationError(
            f"cannot download the aarch64 wheels ({' '.join(reqs)}): pip exited with "
            f"{proc.returncode}:\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    for whl in wheels:
        _progress(f"  {whl.name} ({whl.stat().st_size / 1e6:.1f} MB)")
    return wheels


def _build(root: Path, qemu: str) -> None:
    """Build the environment into the (empty, private) folder ``root``."""
    started = time.perf_counter()
    downloads = root / "downloads"
    sysroot, site = root / "sysroot", root / "site"
    for folder in (downloads, sysroot, site):
        folder.mkdir(parents=True)
    # apt-get download runs as the unprivileged _apt user where it can; let it write here.
    downloads.chmod(0o777)

    _ensure_arm64_architecture()
    debs = _download_debs(downloads)
    _progress(f"unpacking {len(debs)} packages into {sysroot}")
    for deb in debs:
        run_apt(
            ["dpkg", "-x", str(deb), str(sysroot)], error_cls=EmulationError, what=f"unpacking {deb.name}"
        )

    wheels = _download_wheels(downloads)
    _progress(f"unpacking {len(wheels)} wheels into {site}")
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            zf.extractall(site)

    # Byte-compile with the host's CPython (same 3.11 bytecode) so the emulator does not spend its slow
    # cycles compiling the stdlib, numpy and tvm on every run; paths are rewritten to the final location.
    if sys.version_info[:2] == tuple(map(int, PYTHON_VERSION.split("."))):
        _progress("byte-compiling the stdlib and site folder with the host Python ...")
        final = root.parent / env_key()
        for folder in (sysroot / "usr" / "lib" / f"python{PYTHON_VERSION}", site):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "compileall",
                    "-q",
                    "-j",
                    "0",
                    "-s",
                    str(root),
                    "-p",
                    str(final),
                    str(folder),
                ],
                capture_output=True,
                text=True,
                check=False,
            )

    env = EmulatorEnv(root=root, qemu=qemu)
    if not env.python.exists():
        raise EmulationError(f"the arm64 packages did not provide {env.python}")
    _progress("smoke test: importing numpy and tvm's runtime under qemu-aarch64 ...")
    smoke = root / "smoke_test.py"
    smoke.write_text(_SMOKE_TEST, encoding="utf-8")
    proc = env.run_python(smoke, timeout=300)
    if proc.returncode != 0 or not proc.stdout.startswith("aarch64"):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise EmulationError(
            f"the freshly built aarch64 environment does not work (exit {proc.returncode}):\n{tail}"
        )

    shutil.rmtree(downloads)
    stamp = {
        "layout_version": LAYOUT_VERSION,
        "debs": [d.name for d in debs],
        "wheels": [w.name for w in wheels],
        "smoke_test": proc.stdout.strip(),
        "build_s": round(time.perf_counter() - started, 1),
    }
    (root / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")


class _BuildLock:
    """Exclusive ``flock`` on ``<cache_dir>/.lock``; says so when it has to wait for another process."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / ".lock"
        self._file = None

    def __enter__(self) -> _BuildLock:
        # Kept open (not a `with` block): the lock lives as long as the file descriptor.
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return self
        except BlockingIOError:
            _progress(
                f"another process is building the aarch64 environment ({self.path} is locked); waiting ..."
            )
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._file.close()
                    raise EmulationError(
                        f"gave up waiting for the lock {self.path} after {_LOCK_TIMEOUT_S:.0f} s; "
                        "if no graphopt process is running, delete it"
                    ) from None
                time.sleep(1.0)

    def __exit__(self, *exc_info: object) -> None:
        if self._file is None:
            return
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def _ready(root: Path) -> bool:
    return (root / STAMP_FILE).is_file()


def ensure_aarch64_sysroot(
    cache_dir: str | os.PathLike[str] | None = None, install: bool = True
) -> EmulatorEnv:
    """The cached aarch64 emulation environment, building it (and installing qemu-user) the first time.

    Args:
        cache_dir: where environments are cached (default :func:`default_cache_dir`).
        install: allow apt-get/pip to install and download what is missing; with False, anything missing is
            an EmulationError.

    Raises:
        EmulationError: qemu, apt, the package downloads or the smoke test failed; the message says which and
            how to fix it.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / env_key()
    qemu = find_qemu()
    if qemu is not None and _ready(root):
        return EmulatorEnv(root=root, qemu=qemu)
    if not install:
        missing = [] if qemu else ["qemu-aarch64"]
        missing += [] if _ready(root) else [f"the aarch64 sysroot at {root}"]
        raise EmulationError(
            f"not available: {', '.join(missing)}; call ensure_aarch64_sysroot(install=True) "
            "to install and build them (needs apt-get, root, and the apt and pip registries)"
        )
    reason = apt_unavailable_reason()
    if reason is not None:
        raise EmulationError(
            f"cannot set up aarch64 emulation: {reason}. Needed: qemu-user "
            f"({install_command(QEMU_APT_PACKAGES)}) and arm64 packages from apt"
        )

    cache.mkdir(parents=True, exist_ok=True)
    with _BuildLock(cache):
        qemu = ensure_qemu(install=True)
        if _ready(root):  # another process finished building while we waited for the lock
            return EmulatorEnv(root=root, qemu=qemu)
        for stale in cache.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if root.exists():  # an unstamped folder is a broken build from an older graphopt; never reuse it
            shutil.rmtree(root)
        tmp = cache / f".tmp-{root.name}-{os.getpid()}"
        _progress(
            f"building the aarch64 emulation environment in {root} (once per machine; ~130 MB download)"
        )
        started = time.perf_counter()
        try:
            _build(tmp, qemu)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _progress(f"aarch64 environment ready in {time.perf_counter() - started:.0f} s: {root}")
    return EmulatorEnv(root=root, qemu=qemu)


# --------------------------------------------------------------------------------------------- running


def _read_manifest(artifact_dir: Path) -> dict:
    path = artifact_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"artifact {artifact_dir}: cannot read manifest.json: {exc}") from exc
    if manifest.get("format") != "graphopt-artifact" or manifest.get("format_version") != 1:
        raise ArtifactError(
            f"artifact {artifact_dir}: manifest.json is not a graphopt-artifact of format_version 1 "
            f"(format={manifest.get('format')!r}, format_version={manifest.get('format_version')!r})"
        )
    return manifest


def _check_inputs(manifest: dict, inputs: Sequence[np.ndarray]) -> None:
    declared = manifest.get("inputs")
    if declared is None:
        return
    if len(declared) != len(inputs):
        raise InputError(
            f"the artifact takes {len(declared)} inputs "
            f"({', '.join(d.get('name', '?') for d in declared)}), {len(inputs)} were given"
        )
    for spec, array in zip(declared, inputs, strict=True):
        name, shape, dtype = spec.get("name", "?"), spec.get("shape"), spec.get("dtype")
        if dtype is not None and str(array.dtype) != dtype:
            raise InputError(f"input {name!r}: expected dtype {dtype}, got {array.dtype}")
        if shape is not None:
            # Symbolic dimensions (strings) accept any size.
            ok = len(shape) == array.ndim and all(
                isinstance(d, str) or d == n for d, n in zip(shape, array.shape, strict=True)
            )
            if not ok:
                raise InputError(f"input {name!r}: expected shape {tuple(shape)}, got {tuple(array.shape)}")


def run_artifact_emulated(
    artifact_dir: str | os.PathLike[str],
    inputs: Sequence[np.ndarray],
    timeout: float = 300.0,
    *,
    env: EmulatorEnv | None = None,
) -> list[np.ndarray]:
    """Run an aarch64 graphopt artifact under qemu-aarch64 and return its outputs (flattened, in order).

    Raises:
        ArtifactError: the folder is not a graphopt artifact, or its library is not an aarch64 ELF object.
        InputError: ``inputs`` do not match the manifest's count, dtypes or static shapes.
        EmulationError: the environment cannot be set up, or the emulated run failed or timed out.
    """
    artifact, arrays = validate_artifact(artifact_dir, inputs)
    env = env if env is not None else ensure_aarch64_sysroot()

    with tempfile.TemporaryDirectory(prefix="graphopt-emulated-") as tmp:
        in_path, out_path = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(in_path, **{f"arg{i}": a for i, a in enumerate(arrays)})
        proc = env.run_python(
            RUNNER_SCRIPT, [str(artifact.resolve()), str(in_path), str(out_path)], timeout=timeout
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise EmulationError(
                f"emulated run of artifact {artifact} failed (exit {proc.returncode}):\n{tail}"
            )
        with np.load(out_path) as data:
            return [data[f"out{i}"] for i in range(len(data.files))]


def validate_artifact(
    artifact_dir: str | os.PathLike[str], inputs: Sequence[np.ndarray]
) -> tuple[Path, list[np.ndarray]]:
    """The artifact folder and the inputs as arrays, after the checks an emulated run needs first
    (manifest, an aarch64 library, inputs matching the manifest, the runner script present).

    Raises:
        ArtifactError, InputError, EmulationError: as :func:`run_artifact_emulated`.
    """
    artifact = Path(artifact_dir)
    manifest = _read_manifest(artifact)
    library = Path(checked_library(artifact, manifest))  # a plain file name in the folder, hash as recorded
    machine = elf_machine(library)
    if machine != EM_AARCH64:
        raise ArtifactError(
            f"artifact {artifact}: {library.name} is an ELF object for e_machine {machine}, not "
            f"aarch64 ({EM_AARCH64}); build it for target mtriple aarch64-linux-gnu and link it "
            f"with cross_compiler_fcompile()"
        )
    arrays = [np.asarray(a) for a in inputs]
    _check_inputs(manifest, arrays)
    if not RUNNER_SCRIPT.is_file():
        raise EmulationError(f"the runner script {RUNNER_SCRIPT} is missing from the graphopt installation")
    return artifact, arrays
