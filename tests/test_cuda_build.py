"""CUDA targets build on a machine without a GPU, and the artifact carries the device code.

Specification: ``graphopt.compile(model, "cuda", ...)`` succeeds with no GPU and no CUDA
toolkit; the executable's module tree holds a ``cuda`` device module under the host ``llvm``
one; the saved ``model.so`` embeds every kernel (as PTX/cubin when nvcc is installed, else as
CUDA C that the runtime compiles with NVRTC on the device), each bound to GPU threads; loading
the artifact here says there is no GPU. Running the kernels needs a GPU and is not tested here.
"""

import json
import os
import re

import pytest
import torch

import graphopt
from graphopt.errors import ArtifactError
from graphopt.models import cnn, mlp
from graphopt.targets.toolchain import EM_AARCH64, EM_X86_64, elf_machine, find_cross_compiler


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
    library_path = os.path.join(path, "model.so")
    assert elf_machine(library_path) == EM_X86_64  # the host side is an x86 shared library
    with open(library_path, "rb") as f:
        library = f.read()
    kernels = _device_kernels(library)
    # every conv/linear group of the CNN became at least one kernel
    assert len(kernels) >= 4, kernels
    assert any("conv2d" in k for k in kernels)
    # CUDA C (no nvcc at build time) indexes GPU threads; PTX/cubin carry the arch
    cuda_c = library.count(b"blockIdx.x") >= len(kernels) and library.count(b"threadIdx.x") >= len(kernels)
    assert cuda_c or b".target sm_80" in library or b".nv.info" in library


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


@pytest.mark.skipif(find_cross_compiler() is None, reason="aarch64 cross compiler not installed")
def test_jetson_orin_artifact_is_an_aarch64_library_with_cuda_kernels(tmp_path):
    module = graphopt.compile(mlp(), "jetson-orin", (torch.randn(1, 784),))
    path = module.save(str(tmp_path / "orin"))
    library_path = os.path.join(path, "model.so")
    assert elf_machine(library_path) == EM_AARCH64
    with open(library_path, "rb") as f:
        kernels = _device_kernels(f.read())
    assert len(kernels) >= 2, kernels  # the two linear layers
