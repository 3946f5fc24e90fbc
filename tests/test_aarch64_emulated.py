"""aarch64 deployment: cross-compile a conv model, run it under qemu-aarch64, compare with eager PyTorch.

Cross-compiling needs nothing beyond graphopt's own dependencies: the ``ziglang`` wheel links aarch64
libraries. The emulated tests use the ``aarch64_env`` fixture (tests/conftest.py), which installs qemu-user
and builds the cached aarch64 sysroot (~25 s the first time on a machine, nothing afterwards). They skip only
outside CI on a machine that cannot install system packages (no apt-get, not root); in CI, and for every
other failure including a failed download, they fail.
The unit tests at the top need neither the emulator nor a linker.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from graphopt.errors import ArtifactError, EmulationError, InputError, ToolchainError
from graphopt.targets.aarch64 import emulation
from graphopt.targets.aarch64 import toolchain
from graphopt.testing import assert_close, assert_matches_eager

EM_AARCH64 = 183  # /usr/include/elf.h


# ------------------------------------------------------------------------------------------- unit tests


def test_zig_from_the_ziglang_wheel_is_the_aarch64_linker():
    linker = toolchain.ensure_cross_toolchain()
    assert linker.toolchain == "zig" and linker.command[1:] == ("-m", "ziglang", "cc")
    assert linker.triple == "aarch64-linux-gnu"


def test_gnu_cross_compiler_is_used_without_ziglang(monkeypatch):
    monkeypatch.setattr(toolchain, "find_zig", lambda: None)
    monkeypatch.setattr(toolchain.shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    linker = toolchain.ensure_cross_toolchain()
    assert linker.toolchain == "gnu" and linker.command == ("/usr/bin/aarch64-linux-gnu-g++",)


def test_toolchain_error_names_both_linkers_and_install_commands(monkeypatch):
    monkeypatch.setattr(toolchain, "find_zig", lambda: None)
    monkeypatch.setattr(toolchain.shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(ToolchainError) as info:
        toolchain.ensure_cross_toolchain(install=False)
    message = str(info.value)
    assert "`aarch64-linux-gnu-g++` is not on PATH" in message
    assert "pip install ziglang" in message
    assert "apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu g++-aarch64-linux-gnu" in message
    assert "ensure_cross_toolchain(install=True)" in message
    assert isinstance(info.value, RuntimeError)


def test_toolchain_install_without_apt_explains(monkeypatch):
    monkeypatch.setattr(toolchain, "find_zig", lambda: None)
    monkeypatch.setattr(toolchain.shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(
        ToolchainError,
        match=r"apt-get/dpkg not found: this is not a Debian/Ubuntu system\. "
        r"Install them yourself with: apt-get install",
    ):
        toolchain.ensure_cross_toolchain(install=True)


def test_link_failure_is_a_toolchain_error_with_the_linker_output(tmp_path):
    (tmp_path / "bad.o").write_bytes(b"not an object file")
    link = toolchain.cross_compiler_fcompile()
    with pytest.raises(ToolchainError, match=r"linking .*model\.so for aarch64-linux-gnu failed"):
        link(str(tmp_path / "model.so"), [str(tmp_path / "bad.o")])


def test_missing_emulator_fails_in_ci_and_skips_only_where_it_cannot_be_installed(monkeypatch):
    import conftest

    def no_sysroot(*args, **kwargs):
        raise EmulationError("qemu-aarch64 is not on PATH")

    monkeypatch.setattr(emulation, "ensure_aarch64_sysroot", no_sysroot)
    monkeypatch.setattr(toolchain, "apt_unavailable_reason", lambda: "installing system packages needs root")
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match=r"cannot be installed here .* \(CI=true"):
        conftest.emulated_aarch64_board()
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="qemu-aarch64 is not on PATH"):
        conftest.emulated_aarch64_board()
    # where apt could have installed it, the failure is the test's, in CI or not
    monkeypatch.setattr(toolchain, "apt_unavailable_reason", lambda: None)
    with pytest.raises(EmulationError, match="qemu-aarch64 is not on PATH"):
        conftest.emulated_aarch64_board()


def test_fcompile_for_target_is_none_for_host():
    import tvm

    assert toolchain.fcompile_for_target(tvm.target.Target("llvm")) is None
    assert toolchain.debian_triple("aarch64-unknown-linux-gnu") == "aarch64-linux-gnu"
    assert toolchain.debian_triple("riscv64-linux-gnu") is None


def test_run_artifact_emulated_rejects_x86_library(tmp_path):
    # A 64-bit little-endian ELF header whose e_machine says x86-64: rejected before any emulator is needed.
    header = b"\x7fELF\x02\x01\x01" + bytes(11) + struct.pack("<H", toolchain.EM_X86_64) + bytes(44)
    (tmp_path / "model.so").write_bytes(header)
    _write_manifest(tmp_path, [(1, 3, 8, 8)], target={"kind": "llvm"})
    with pytest.raises(ArtifactError, match="e_machine 62, not aarch64"):
        emulation.run_artifact_emulated(tmp_path, [np.zeros((1, 3, 8, 8), np.float32)])


def test_run_artifact_emulated_checks_inputs(tmp_path):
    header = b"\x7fELF\x02\x01\x01" + bytes(11) + struct.pack("<H", EM_AARCH64) + bytes(44)
    (tmp_path / "model.so").write_bytes(header)
    _write_manifest(tmp_path, [(1, 3, 8, 8)], target={"kind": "llvm"})
    with pytest.raises(InputError, match=r"input 'x0': expected shape \(1, 3, 8, 8\), got \(1, 3, 9, 9\)"):
        emulation.run_artifact_emulated(tmp_path, [np.zeros((1, 3, 9, 9), np.float32)])


# ------------------------------------------------------------------------------------------- emulated


class SmallConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def _write_manifest(folder: Path, input_shapes, target: dict, output_shapes=()) -> None:
    manifest = {
        "format": "graphopt-artifact",
        "format_version": 1,
        "library": "model.so",
        "sha256": hashlib.sha256((folder / "model.so").read_bytes()).hexdigest(),  # written first
        "target": target,
        "inputs": [
            {"name": f"x{i}", "shape": list(s), "dtype": "float32"} for i, s in enumerate(input_shapes)
        ],
        "outputs": [
            {"name": f"y{i}", "shape": list(s), "dtype": "float32"} for i, s in enumerate(output_shapes)
        ],
        "entry": "main",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.mark.emulated
def test_conv_model_cross_compiled_runs_on_emulated_aarch64(aarch64_env, tmp_path):
    import tvm
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    model = SmallConvNet().eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x).numpy()

    ep = torch.export.export(model, (x,)).run_decompositions({})
    mod = from_exported_program(ep, run_ep_decomposition=False)
    target_spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    ex = tvm.compile(mod, target=tvm.target.Target(target_spec))
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    ex.export_library(
        str(artifact / "model.so"), fcompile=toolchain.cross_compiler_fcompile("aarch64-linux-gnu")
    )
    _write_manifest(artifact, [tuple(x.shape)], target=target_spec, output_shapes=[expected.shape])

    # What `file` would say: ELF, 64-bit (EI_CLASS 2), little-endian (EI_DATA 1), machine aarch64 (183).
    header = (artifact / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert (header[4], header[5]) == (2, 1)
    assert struct.unpack_from("<H", header, 18)[0] == EM_AARCH64

    outputs = emulation.run_artifact_emulated(artifact, [x.numpy()], timeout=300, env=aarch64_env)

    assert_matches_eager(tuple(outputs), model, (x,))  # one output, shape, dtype, then values


# ------------------------------------------------------------------------ one emulated process, many runs


@pytest.fixture(scope="module")
def session(aarch64_env):
    """One emulated runner for the whole module: the emulator and TVM's runtime start once."""
    from graphopt.targets.aarch64.session import EmulatorSession

    with EmulatorSession(aarch64_env) as s:
        yield s


@pytest.fixture(scope="module")
def arm64_artifacts(tmp_path_factory):
    """``artifact(name, target, pipeline)``: a reference model compiled and saved for an aarch64 target,
    with its model, input and compiled module; built once per module run."""
    import graphopt
    from graphopt.models import REFERENCE_MODELS

    folder = tmp_path_factory.mktemp("arm64-artifacts")
    built: dict[tuple[str, str, str], tuple] = {}

    def artifact(name: str, target: str = "arm64", pipeline: str = "default"):
        key = (name, target, pipeline)
        if key not in built:
            ref = REFERENCE_MODELS[name]
            model, x = ref.build(), ref.example_input()
            calibration = [(ref.example_input(seed=s),) for s in range(2, 6)] if "quantize" in pipeline else None
            module = graphopt.compile(model, target, (x,), pipeline, calibration_data=calibration)
            path = module.save(str(folder / f"{name}-{target}-{pipeline.replace(',', '_')}"))
            built[key] = (path, model, x, module)
        return built[key]

    return artifact


def _assert_runs_like_eager(session, artifact, name: str, target: str = "arm64") -> None:
    from graphopt.pipeline import Pipeline

    path, model, x, _ = artifact(name, target)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["target"]["name"] == target and manifest["pipeline"] == str(Pipeline.parse("default"))
    assert toolchain.elf_machine(Path(path) / "model.so") == EM_AARCH64
    (out,) = session.run(path, [x.numpy()], timeout=600)
    # the fp32 rung: shape and dtype, then rtol 1e-4, atol 1e-5 x the output's scale, float64 fallback
    assert_matches_eager(out, model, (x,))


@pytest.mark.emulated
def test_session_runs_many_artifacts_and_survives_failures(session, arm64_artifacts, tmp_path):
    path, model, x, _ = arm64_artifacts("mlp")
    starts = session.starts
    first = session.run(path, [x.numpy()])
    again = session.run(path, [x.numpy()])
    assert_close(again, first, "exact")
    assert session.starts == max(starts, 1)  # the second run reused the process
    # a job that fails in TVM is that job's error; the process keeps serving
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    no_entry = tmp_path / "no-entry"
    no_entry.mkdir()
    (no_entry / "model.so").write_bytes((Path(path) / "model.so").read_bytes())
    (no_entry / "manifest.json").write_text(json.dumps(dict(manifest, entry="no_such_function")))
    with pytest.raises(EmulationError, match=r"failed \(status 1\)"):
        session.run(no_entry, [x.numpy()])
    assert_close(session.run(path, [x.numpy()]), first, "exact")
    assert session.starts == max(starts, 1)
    # a job that kills the process (a truncated library: SIGBUS in the loader, like a SIGSEGV in a kernel)
    # is reported with the signal, and the next run gets a fresh process
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    head = (Path(path) / "model.so").read_bytes()[:4096]
    (truncated / "model.so").write_bytes(head)
    # recorded with its own hash, so that the library reaches the loader instead of the hash check
    (truncated / "manifest.json").write_text(json.dumps(dict(manifest, sha256=hashlib.sha256(head).hexdigest())))
    with pytest.raises(EmulationError, match="the emulated runner died"):
        session.run(truncated, [x.numpy()])
    assert_close(session.run(path, [x.numpy()]), first, "exact")
    assert session.starts == max(starts, 1) + 1


@pytest.mark.emulated
def test_small_cnn_runs_on_emulated_arm64(session, arm64_artifacts):
    _assert_runs_like_eager(session, arm64_artifacts, "cnn")


@pytest.mark.slow
@pytest.mark.emulated
@pytest.mark.timeout(1800)  # ~5 min on a busy 2-core host: the arm64 build, then ~1.8 GFLOP emulated
def test_resnet18_runs_on_emulated_arm64(session, arm64_artifacts):
    _assert_runs_like_eager(session, arm64_artifacts, "resnet18")


@pytest.mark.slow
@pytest.mark.emulated
@pytest.mark.timeout(1800)
def test_five_reference_models_on_emulated_arm64(session, arm64_artifacts):
    # mlp, cnn, resnet18, mobilenet_v2 and transformer with the default pipeline, all run by one emulated
    # process (artifacts built by the tests above are reused)
    starts = session.starts
    for name in ("mlp", "cnn", "resnet18", "mobilenet_v2", "transformer"):
        _assert_runs_like_eager(session, arm64_artifacts, name)
    assert session.starts == max(starts, 1)


@pytest.mark.emulated
def test_int8_cnn_for_arm64_dotprod_uses_sdot_and_runs_emulated(session, arm64_artifacts):
    # qemu's `-cpu max` (EmulatorEnv.cpu) implements the dot-product extension the int8 kernels use
    path, model, x, module = arm64_artifacts("cnn", "arm64-dotprod", "fold,quantize")
    (kernels,) = module.executable.mod.imports  # the LLVM module linked into model.so
    assembly = kernels.inspect_source("s")
    assert "sdot" in assembly, "the int8 build for arm64-dotprod has no sdot instruction"
    (out,) = session.run(path, [x.numpy()])
    with torch.no_grad():
        quantized = module.graph(x)  # the int8 graph run by PyTorch: what the kernels should compute
        quantized = quantized[0] if isinstance(quantized, tuple) else quantized
        expected = model(x)
    # the int8 rung: within one quantization step of the quantized graph, SQNR >= 20 dB against float
    assert_close(out, quantized, "int8", fake_quant=True, what="against the quantized graph")
    assert_close(out, expected, "int8", what="against the float model")
