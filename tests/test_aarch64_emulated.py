"""aarch64 deployment: cross-compile a conv model, run it under qemu-aarch64, compare with eager PyTorch.

The emulated test installs what it needs (cross toolchain, qemu-user, the cached aarch64 sysroot; ~25 s the
first time on a machine, nothing afterwards). It skips only when this machine cannot install them at all
(no apt-get, not root); every other failure, including a failed download, fails the test.
The unit tests at the top need neither the toolchain nor the emulator.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from graphopt.errors import ArtifactError, EmulationError, InputError, ToolchainError
from graphopt.targets import emulation, toolchain

EM_AARCH64 = 183  # /usr/include/elf.h


# ------------------------------------------------------------------------------------------- unit tests


def test_toolchain_error_names_compiler_and_install_command(monkeypatch):
    monkeypatch.setattr(toolchain.shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(ToolchainError) as info:
        toolchain.ensure_cross_toolchain(install=False)
    message = str(info.value)
    assert "`aarch64-linux-gnu-g++` is not on PATH" in message
    assert "apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu g++-aarch64-linux-gnu" in message
    assert "ensure_cross_toolchain(install=True)" in message
    assert isinstance(info.value, RuntimeError)


def test_toolchain_install_without_apt_explains(monkeypatch):
    monkeypatch.setattr(toolchain.shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(
        ToolchainError,
        match=r"apt-get/dpkg not found: this is not a Debian/Ubuntu system\. "
        r"Install them yourself with: apt-get install",
    ):
        toolchain.ensure_cross_toolchain(install=True)


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


@pytest.fixture(scope="module")
def aarch64_env():
    """Cross toolchain + emulator, installed if missing; skip only where installing is impossible here."""
    have_all = toolchain.find_cross_compiler() is not None and emulation.find_qemu() is not None
    reason = toolchain.apt_unavailable_reason()
    if reason is not None and not have_all:
        pytest.skip(f"aarch64 cross toolchain/qemu missing and cannot be installed: {reason}")
    try:
        toolchain.ensure_cross_toolchain(install=True)
        return emulation.ensure_aarch64_sysroot()
    except (ToolchainError, EmulationError) as exc:
        if reason is not None:  # tools present, but the sysroot needs apt and apt is unusable here
            pytest.skip(f"aarch64 emulation environment cannot be built: {exc}")
        raise


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

    assert len(outputs) == 1
    assert outputs[0].shape == expected.shape
    assert outputs[0].dtype == np.float32
    np.testing.assert_allclose(outputs[0], expected, rtol=1e-4, atol=1e-5)
