"""CUDA targets build on a machine without a GPU, and the artifact carries the device code.

Specification: ``graphopt.compile(model, "cuda", ...)`` succeeds with no GPU; the
executable's module tree holds a ``cuda`` device module under the host ``llvm`` one; the
saved ``model.so`` embeds every kernel as CUDA C, each bound to GPU threads (TVM 0.27's
codegen always embeds source, which the CUDA runtime compiles when the artifact is loaded
on the device: see targets/cuda/device_code.py). When nvcc is on PATH the build also compiles
that source ahead of time to PTX for the target's arch (sm_80; sm_87 for jetson-orin),
covering every embedded kernel. int8-quantized models with 1x1 and depthwise convs build.
Loading the artifact here says there is no GPU. Running kernels needs a GPU: not tested here.
"""

import json
import os
import re
import shutil

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import ArtifactError
from graphopt.models import cnn, mlp
from graphopt.targets.cuda.device_code import cuda_source, nvcc_version
from graphopt.targets.aarch64.toolchain import EM_AARCH64, EM_X86_64, elf_machine


def _module_kinds(mod, depth=0):
    kinds = [(depth, mod.kind)]
    for sub in mod.imports:
        kinds += _module_kinds(sub, depth + 1)
    return kinds


def _device_kernels(library: bytes) -> list[str]:
    """Names of the GPU kernels embedded in a library, whatever form the device code takes."""
    cuda_c = re.findall(rb'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', library)
    ptx = re.findall(rb"\.visible \.entry (\w+)\(", library)
    return sorted({k.decode() for k in cuda_c + ptx})


@pytest.fixture(scope="module")
def cuda_cnn(tmp_path_factory):
    module = graphopt.compile(cnn(), "cuda", (torch.randn(1, 3, 32, 32),))
    path = module.save(str(tmp_path_factory.mktemp("cuda") / "cnn"))
    return module, path


def test_cuda_executable_holds_a_device_module(cuda_cnn):
    module, _ = cuda_cnn
    kinds = _module_kinds(module.executable.mod)
    assert kinds[0] == (0, "relax.VMExecutable")
    assert (1, "llvm") in kinds  # host code: argument packing and kernel launches
    assert any(kind == "cuda" for _, kind in kinds)


def test_cuda_artifact_contains_the_kernels(cuda_cnn):
    module, path = cuda_cnn
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["target"]["tvm"] == {"kind": "cuda", "arch": "sm_80"}
    device_code = manifest["device_code"]  # the form the kernels ship in, for whoever deploys it
    assert device_code["arch"] == "sm_80" and device_code["embedded"] == "cuda-c"
    assert device_code["kernels"] >= 4 and device_code["ptx"] == (shutil.which("nvcc") is not None)
    library_path = os.path.join(path, "model.so")
    assert elf_machine(library_path) == EM_X86_64  # the host side is an x86 shared library
    with open(library_path, "rb") as f:
        library = f.read()
    kernels = _device_kernels(library)
    # every conv/linear group of the CNN became at least one kernel
    assert len(kernels) >= 4, kernels
    assert any("conv2d" in k for k in kernels)
    # CUDA C (what TVM 0.27 embeds) indexing GPU threads in every kernel
    assert library.count(b"blockIdx.x") >= len(kernels) and library.count(b"threadIdx.x") >= len(kernels)
    assert module.executable.graphopt_device_code.embedded == "cuda-c"
    assert set(module.executable.graphopt_device_code.kernels) == set(kernels)


def _assert_ptx_for(device_code, arch: str):
    if nvcc_version() is None:  # source only; the device JIT-compiles it at load
        assert device_code.ptx is None and device_code.nvcc_version is None
        return
    ptx = device_code.ptx
    assert ptx is not None and device_code.arch == arch
    assert f".target {arch}".encode() in ptx
    entries = sorted(k.decode() for k in re.findall(rb"\.visible \.entry (\w+)\(", ptx))
    assert entries == sorted(device_code.kernels) and entries  # every embedded kernel, compiled


def test_with_nvcc_the_build_compiles_the_kernels_to_ptx_for_the_target_arch(cuda_cnn):
    module, _ = cuda_cnn
    _assert_ptx_for(module.executable.graphopt_device_code, "sm_80")


def test_loading_a_cuda_artifact_without_a_gpu_is_an_artifact_error(cuda_cnn):
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a GPU")
    _, path = cuda_cnn
    with pytest.raises(ArtifactError, match="no GPU"):
        graphopt.load(path)


def test_cuda_arch_preset_reaches_the_target():
    module = graphopt.compile(mlp(), "cuda:sm_86", (torch.randn(1, 784),))
    assert module.manifest["target"]["tvm"]["arch"] == "sm_86"
    assert any(kind == "cuda" for _, kind in _module_kinds(module.executable.mod))


def test_jetson_orin_kernels_compile_for_sm_87():
    module = graphopt.compile(mlp(), "jetson-orin", (torch.randn(1, 784),))
    _assert_ptx_for(module.executable.graphopt_device_code, "sm_87")


def test_int8_model_with_pointwise_and_depthwise_convs_builds_for_cuda():
    # int8 1x1 convs with every extent > 64 made dlight pick WMMA int8 tensor cores, which
    # TVM 0.27's CUDA codegen cannot emit ("fragment_info_"): targets/build.py keeps int8
    # matmuls on the SIMT schedule
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 96, 3, padding=1, groups=96),
                          nn.ReLU(), nn.Conv2d(96, 128, 1)).eval()
    calibration = [torch.randn(1, 3, 16, 16) for _ in range(2)]
    module = graphopt.compile(model, "cuda", (torch.randn(1, 3, 16, 16),), "fold,quantize{mode=int8}",
                              calibration_data=calibration)
    device_code = module.executable.graphopt_device_code
    source = cuda_source(module.executable)
    assert "int8_t" in source and "wmma" not in source  # integer kernels, no tensor-core fragments
    assert len(device_code.kernels) >= 3, device_code.kernels
    _assert_ptx_for(device_code, "sm_80")


def test_jetson_orin_artifact_is_an_aarch64_library_with_cuda_kernels(tmp_path):
    module = graphopt.compile(mlp(), "jetson-orin", (torch.randn(1, 784),))
    path = module.save(str(tmp_path / "orin"))
    library_path = os.path.join(path, "model.so")
    assert elf_machine(library_path) == EM_AARCH64
    with open(library_path, "rb") as f:
        kernels = _device_kernels(f.read())
    assert len(kernels) >= 2, kernels  # the two linear layers
