"""Loading (and first calling) an artifact checks everything it can before any kernel runs.

Specification:

* CPU features: the manifest records the instruction-set extensions the target lets LLVM
  use (``cpu_features``, as /proc/cpuinfo names them). ``load``, and the first call of a
  module compiled in this process, raise TargetError naming those this machine lacks,
  instead of dying with SIGILL. Compiling for such a target still works (a cross build).
* A malformed manifest (bad JSON, a missing key, a value of the wrong type) is an
  ArtifactError naming the key, never a KeyError or TypeError.
* The manifest's ``library`` is a plain file name inside the artifact folder; an absolute
  path, ``..`` or a separator is an ArtifactError, also on the emulated aarch64 path,
  which checks the library's SHA-256 too.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch

import graphopt
from graphopt.errors import ArtifactError, TargetError
from graphopt.targets import registry
from graphopt.testing import assert_matches_eager

X = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()


@pytest.fixture(scope="module")
def avx512(tmp_path_factory):
    """A module built for x86-avx512 (on any host: a cross build) and its saved artifact."""
    model = _model()
    module = graphopt.compile(model, "x86-avx512", (X,))
    return model, module, module.save(str(tmp_path_factory.mktemp("avx512") / "artifact"))


def _host_without_avx512(monkeypatch):
    flags = {f for f in registry.host_cpu_features() if not f.startswith("avx512")} | {"sse2"}
    monkeypatch.setattr(registry, "host_cpu_features", lambda: flags)


# ------------------------------------------------------------------------------ CPU features
def test_the_manifest_records_the_targets_cpu_features(avx512):
    _, module, _ = avx512
    features = module.manifest["cpu_features"]
    assert {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma"} <= set(features)
    assert features == sorted(features)


def test_loading_on_a_host_without_the_features_is_a_target_error(avx512, monkeypatch):
    _, _, path = avx512
    _host_without_avx512(monkeypatch)
    with pytest.raises(TargetError, match=r"built for target 'x86-avx512', which needs CPU features this machine "
                                          r"lacks: avx512_vnni, avx512bw, avx512cd, avx512dq, avx512f, avx512vl\. "
                                          r"Running it here would crash with an illegal instruction") as info:
        graphopt.load(path)
    assert isinstance(info.value, ValueError)


def test_calling_a_cross_built_module_in_process_is_a_target_error(monkeypatch):
    _host_without_avx512(monkeypatch)
    module = graphopt.compile(_model(), "x86-avx512", (X,))  # building for another machine is allowed
    with pytest.raises(TargetError, match=r"lacks: .*avx512f"):
        module(X)
    with pytest.raises(TargetError, match=r"lacks: .*avx512f"):  # every call, not only the first
        module(X)


def test_a_host_with_the_features_loads_and_runs(avx512):
    model, module, path = avx512
    missing = [f for f in module.manifest["cpu_features"] if f not in registry.host_cpu_features()]
    if missing:  # the positive case needs AVX-512 for real: say so, don't pass silently
        pytest.skip(f"this machine lacks {', '.join(missing)}; the x86 case below runs everywhere")
    assert_matches_eager(graphopt.load(path)(X), model, (X,))
    assert_matches_eager(module(X), model, (X,))


def test_the_host_target_always_runs_here(tmp_path):
    model = _model()
    module = graphopt.compile(model, "x86", (X,))
    assert set(module.manifest["cpu_features"]) <= registry.host_cpu_features()
    assert_matches_eager(graphopt.load(module.save(str(tmp_path / "a")))(X), model, (X,))


# ------------------------------------------------------------------------------ manifests
def _copy_with_manifest(path: str, tmp_path, edit) -> str:
    copy = str(tmp_path / "copy")
    shutil.copytree(path, copy)
    with open(os.path.join(copy, "manifest.json")) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(os.path.join(copy, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return copy


@pytest.fixture(scope="module")
def host_artifact(tmp_path_factory):
    return graphopt.compile(_model(), "x86", (X,)).save(str(tmp_path_factory.mktemp("host") / "artifact"))


MALFORMED = [
    ("no_inputs", lambda m: m.pop("inputs"), r"manifest\.json has no 'inputs'"),
    ("inputs_not_a_list", lambda m: m.update(inputs={"x": 1}), r"has a dict for 'inputs', not a list"),
    ("input_without_shape", lambda m: m["inputs"][0].pop("shape"), r"inputs\[0\] has no 'shape' list"),
    ("input_shape_of_floats", lambda m: m["inputs"][0].update(shape=[2.5, 4]), r"inputs\[0\] has no 'shape' list"),
    ("output_without_dtype", lambda m: m["outputs"][0].pop("dtype"), r"outputs\[0\] has no string 'dtype'"),
    ("output_not_an_object", lambda m: m["outputs"].__setitem__(0, "y"), r"outputs\[0\] is a str, not an object"),
    ("target_without_tvm", lambda m: m["target"].pop("tvm"), r"has no 'target' with a 'tvm' target dict"),
    ("target_a_string", lambda m: m.update(target="x86"), r"has no 'target' with a 'tvm' target dict"),
    ("sha256_a_number", lambda m: m.update(sha256=12), r"has no valid 'sha256'"),
    ("tvm_version_a_number", lambda m: m.update(tvm_version=0.27), r"has a float for 'tvm_version', not a string"),
    ("cpu_features_a_string", lambda m: m.update(cpu_features="avx2"), r"'cpu_features' that is not a list"),
    ("manifest_empty", lambda m: m.clear(), r"manifest\.json is not a graphopt manifest"),
]


@pytest.mark.parametrize("edit,message", [e[1:] for e in MALFORMED], ids=[e[0] for e in MALFORMED])
def test_a_malformed_manifest_is_an_artifact_error(host_artifact, tmp_path, edit, message):
    copy = _copy_with_manifest(host_artifact, tmp_path, edit)
    with pytest.raises(ArtifactError, match=message):
        graphopt.load(copy)


def test_a_manifest_that_is_not_json_is_an_artifact_error(host_artifact, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(host_artifact, copy)
    with open(os.path.join(copy, "manifest.json"), "wb") as f:
        f.write(b"\xff\xfe not json")
    with pytest.raises(ArtifactError, match=r"manifest\.json is corrupt"):
        graphopt.load(copy)


# ------------------------------------------------------------------------------ library names
@pytest.mark.parametrize("name", ["../model.so", "/ABS/model.so", "sub/model.so", "..", ""])
def test_the_library_must_be_a_plain_file_name_in_the_folder(host_artifact, tmp_path, name):
    # the library sits where the name points, with the right hash: only the name is wrong
    outside = tmp_path / "model.so"
    shutil.copy(os.path.join(host_artifact, "model.so"), outside)
    name = name.replace("/ABS", str(tmp_path))
    copy = _copy_with_manifest(host_artifact, tmp_path, lambda m: m.update(library=name))
    (tmp_path / "copy" / "sub").mkdir()
    shutil.copy(outside, tmp_path / "copy" / "sub" / "model.so")
    with pytest.raises(ArtifactError, match=r"names library .*: it must be a plain file name inside the artifact"):
        graphopt.load(copy)


def _aarch64_stub(folder, library: str = "model.so", sha256: str | None = None) -> None:
    """An artifact folder whose library is a bare aarch64 ELF header (never run: the checks come first)."""
    from graphopt.artifact_folder import sha256_file

    header = b"\x7fELF\x02\x01\x01" + bytes(11) + struct.pack("<H", 183) + bytes(44)
    (folder / "model.so").write_bytes(header)
    manifest = {"format": "graphopt-artifact", "format_version": 1, "library": library,
                "sha256": sha256 or sha256_file(str(folder / "model.so")), "tvm_version": "0.27.0",
                "target": {"name": "arm64", "tvm": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}},
                "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
                "outputs": [{"name": "y", "shape": [1, 4], "dtype": "float32"}], "entry": "main"}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_emulated_path_checks_the_library_hash(tmp_path):
    from graphopt.targets.aarch64.emulation import validate_artifact

    _aarch64_stub(tmp_path, sha256="0" * 64)
    with pytest.raises(ArtifactError, match=r"SHA-256 of model\.so does not match the manifest"):
        validate_artifact(tmp_path, [np.zeros((1, 4), np.float32)])


def test_the_emulated_path_refuses_a_library_outside_the_folder(tmp_path):
    from graphopt.targets.aarch64.emulation import validate_artifact

    inner = tmp_path / "artifact"
    inner.mkdir()
    _aarch64_stub(inner)
    shutil.copy(inner / "model.so", tmp_path / "model.so")
    _aarch64_stub(inner, library="../model.so", sha256=json.loads((inner / "manifest.json").read_text())["sha256"])
    with pytest.raises(ArtifactError, match=r"must be a plain file name inside the artifact folder"):
        validate_artifact(inner, [np.zeros((1, 4), np.float32)])


def test_the_emulated_path_accepts_an_intact_artifact(tmp_path):
    from graphopt.targets.aarch64.emulation import validate_artifact

    _aarch64_stub(tmp_path)
    folder, arrays = validate_artifact(tmp_path, [np.zeros((1, 4), np.float32)])
    assert folder == tmp_path and arrays[0].shape == (1, 4)
