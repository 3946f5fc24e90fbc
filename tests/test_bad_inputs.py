"""A catalogue of bad inputs: each raises its typed error with a message that says what to do.

Every error is a ``GraphoptError`` subclass that is also a builtin category (ValueError,
RuntimeError, OSError, NotImplementedError), so callers can catch either. Each entry
checks the class, the builtin base and the message. Entries that write artifacts also
check that nothing half-written is left behind; a few run through the CLI in a
subprocess to show that no bad input crashes the process.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch

import graphopt
from graphopt.errors import (ArtifactError, CalibrationError, CaptureError, GraphoptError, InputError, PassError,
                             PassOptionError, PipelineError, TargetError, ToolchainError, UnsupportedOpError)
from graphopt.targets.aarch64 import toolchain
from graphopt.testing import assert_matches_eager


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.fc(x))


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class CumMax(torch.nn.Module):
    def forward(self, x):
        return torch.cummax(x, 1)[0]


X = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))


@dataclass
class Ctx:
    """What the catalogue entries work on: a compiled module and a saved artifact to copy."""

    module: Any
    artifact: str
    tmp: str

    def copy_artifact(self, name: str = "copy") -> str:
        path = os.path.join(self.tmp, name)
        shutil.copytree(self.artifact, path)
        return path

    def edit_manifest(self, path: str, **changes) -> str:
        mpath = os.path.join(path, "manifest.json")
        with open(mpath) as f:
            manifest = json.load(f)
        for key, value in changes.items():
            node, *rest = key.split("__")
            if rest:
                manifest[node][rest[0]] = value
            else:
                manifest[key] = value
        with open(mpath, "w") as f:
            json.dump(manifest, f)
        return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    module = graphopt.compile(Small().eval(), "x86", (X,))
    artifact = module.save(str(tmp_path_factory.mktemp("artifact") / "small"))
    return module, artifact


@pytest.fixture
def ctx(compiled, tmp_path):
    return Ctx(compiled[0], compiled[1], str(tmp_path))


def _truncate(path: str) -> str:
    lib = os.path.join(path, "model.so")
    size = os.path.getsize(lib)
    with open(lib, "r+b") as f:
        f.truncate(size // 2)
    return path


def _write_garbage_manifest(path: str) -> str:
    with open(os.path.join(path, "manifest.json"), "w") as f:
        f.write('{"format": "graphopt-artifact", "inputs": [')
    return path


def _file_as_parent(c: Ctx) -> str:
    blocker = os.path.join(c.tmp, "a_file")
    with open(blocker, "w") as f:
        f.write("not a folder")
    return os.path.join(blocker, "out")


def _not_an_artifact(c: Ctx) -> str:
    folder = os.path.join(c.tmp, "precious")
    os.makedirs(folder)
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("keep me")
    return folder


def _stray_manifest(c: Ctx) -> str:
    folder = os.path.join(c.tmp, "stray")
    os.makedirs(folder)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"format": "graphopt-artifact", "library": "model.so"}, f)
    return folder


def _save_arm_without_toolchain(c: Ctx, monkeypatch) -> None:
    arm = graphopt.compile(Small().eval(), "arm64", (X,))
    # neither linker: no ziglang wheel and no GNU cross compiler on PATH
    monkeypatch.setattr(toolchain, "find_zig", lambda: None)
    monkeypatch.setenv("PATH", os.path.join(c.tmp, "empty-bin"))
    arm.save(os.path.join(c.tmp, "arm"))


# (id, action(ctx, monkeypatch), error class, builtin category, message regex)
CATALOGUE: list[tuple[str, Callable[[Ctx, Any], Any], type, type, str]] = [
    # --- capture
    ("data_dependent_control_flow", lambda c, m: graphopt.capture(DataDependent(), (X,)),
     CaptureError, RuntimeError,
     r"cannot capture DataDependent: data-dependent control flow or shape; .*\n  at .*test_bad_inputs\.py:\d+ "
     r"\(`if x\.sum\(\) > 0:`\)"),
    ("not_a_module", lambda c, m: graphopt.capture(lambda x: x, (X,)),
     CaptureError, RuntimeError, r"expected a torch\.nn\.Module, got function"),
    ("non_tensor_input", lambda c, m: graphopt.capture(Small(), ("abc",)),
     CaptureError, RuntimeError, r"example input 0 is a str; graphopt captures models whose inputs are tensors"),
    ("empty_inputs", lambda c, m: graphopt.capture(Small(), ()),
     CaptureError, RuntimeError, r"example_inputs must be a tensor or a non-empty tuple of tensors, got tuple"),
    ("compile_without_inputs", lambda c, m: graphopt.compile(Small(), "x86"),
     CaptureError, RuntimeError, r"example_inputs are needed to capture a torch\.nn\.Module"),
    # --- lowering
    ("unsupported_op", lambda c, m: graphopt.compile(CumMax(), "x86", (X,)),
     UnsupportedOpError, NotImplementedError,
     r"operator aten\.cummax\.default \(node 'cummax', from File \".*test_bad_inputs\.py\", line \d+, in forward\) "
     r"is not supported by the TVM backend"),
    # --- targets
    ("unknown_target_name", lambda c, m: graphopt.compile(Small(), "x87", (X,)),
     TargetError, ValueError, r"unknown target 'x87'; valid targets: .*x86"),
    ("target_dict_bad_kind", lambda c, m: graphopt.compile(Small(), {"kind": "nope"}, (X,)),
     TargetError, ValueError, r"target kind 'nope' is not supported; graphopt builds for 'llvm' \(CPUs\) and 'cuda'"),
    ("target_dict_without_kind", lambda c, m: graphopt.compile(Small(), {"mcpu": "skylake"}, (X,)),
     TargetError, ValueError, r"target dict \{'mcpu': 'skylake'\} has no 'kind'"),
    ("target_of_wrong_type", lambda c, m: graphopt.compile(Small(), 3, (X,)),
     TargetError, ValueError, r"a target is a name like 'x86' or a TVM target dict, got int"),
    # --- pipelines
    ("malformed_pipeline", lambda c, m: graphopt.optimize(Small(), (X,), "fold,{"),
     PipelineError, ValueError, r"malformed pipeline 'fold,\{': expected a value at column 6"),
    ("unclosed_options", lambda c, m: graphopt.optimize(Small(), (X,), "prune{ratio=0.3"),
     PipelineError, ValueError, r"malformed pipeline 'prune\{ratio=0\.3': expected '\}'"),
    ("unknown_pass", lambda c, m: graphopt.optimize(Small(), (X,), "fold,fsue"),
     PipelineError, ValueError, r"unknown pass 'fsue'; valid passes: .*cse.*fold"),
    ("unknown_option", lambda c, m: graphopt.optimize(Small(), (X,), "prune{rate=0.3}"),
     PipelineError, ValueError, r"pass 'prune' has no option 'rate'; valid options: ratio"),
    ("option_given_twice", lambda c, m: graphopt.optimize(Small(), (X,), "prune{ratio=0.1,ratio=0.2}"),
     PipelineError, ValueError, r"pass 'prune': option 'ratio' given twice"),
    ("prune_ratio_out_of_range", lambda c, m: graphopt.optimize(Small(), (X,), "prune{ratio=1.5}"),
     PassOptionError, ValueError, r"prune: option ratio=1\.5 is out of range \[0\.0, 1\.0\)"),
    ("option_of_wrong_type", lambda c, m: graphopt.optimize(Small(), (X,), "prune{ratio=half}"),
     PassOptionError, ValueError, r"prune: option ratio='half' is not a valid float"),
    ("unknown_calibration_method", lambda c, m: graphopt.optimize(Small(), (X,), "quantize{calib=foo}"),
     PassOptionError, ValueError, r"quantize: option calib=foo is not one of minmax, percentile"),
    ("pipeline_not_text", lambda c, m: graphopt.optimize(Small(), (X,), 42),
     PipelineError, ValueError, r"a pipeline is text like 'fold,fuse', got int"),
    # --- calibration data
    ("calibration_wrong_shape",
     lambda c, m: graphopt.optimize(Small(), (X,), "quantize", calibration_data=[(torch.randn(2, 5),)]),
     CalibrationError, ValueError,
     r"calibration item 0, input 'x': expected shape \(batch, 4\), got \(2, 5\) \(dimension 1 must be 4\)"),
    ("calibration_wrong_tensor_count",
     lambda c, m: graphopt.optimize(Small(), (X,), "quantize", calibration_data=[(X, X, X)]),
     CalibrationError, ValueError, r"calibration item 0: expected 1 tensor"),
    ("calibration_empty", lambda c, m: graphopt.optimize(Small(), (X,), "quantize", calibration_data=[]),
     CalibrationError, ValueError, r"calibration data is empty"),
    ("quantize_without_calibration", lambda c, m: graphopt.optimize(Small(), (X,), "quantize"),
     PassError, RuntimeError, r"needs activation ranges .*pass calibration_data= to graphopt\.optimize/compile"),
    # --- calling a compiled module
    ("call_wrong_shape", lambda c, m: c.module(torch.randn(3, 4)),
     InputError, ValueError, r"input 'x': expected shape \(2, 4\), got \(3, 4\) \(dimension 0 must be 2\)"),
    ("call_wrong_dtype", lambda c, m: c.module(torch.zeros(2, 4, dtype=torch.int64)),
     InputError, ValueError, r"input 'x': expected dtype float32, got int64"),
    ("call_wrong_rank", lambda c, m: c.module(torch.randn(2, 4, 1)),
     InputError, ValueError, r"input 'x': expected rank 2 \(shape \(2, 4\)\), got rank 3"),
    ("call_wrong_count", lambda c, m: c.module(X, X),
     InputError, ValueError, r"expected 1 input\(s\) \(x\), got 2"),
    ("call_with_bf16", lambda c, m: c.module(X.to(torch.bfloat16)),
     InputError, ValueError, r"input 'x': expected dtype float32, got bfloat16"),
    ("call_with_complex", lambda c, m: c.module(X.to(torch.complex64)),
     InputError, ValueError, r"input 'x': expected dtype float32, got complex64"),
    ("call_with_a_list", lambda c, m: c.module([[1.0, 2.0, 3.0, 4.0]]),
     InputError, ValueError, r"input 'x': expected a torch\.Tensor or numpy array, got list"),
    ("call_graph_wrong_shape", lambda c, m: graphopt.capture(Small(), (X,))(torch.randn(3, 4)),
     InputError, ValueError, r"input 'x': expected shape \(2, 4\), got \(3, 4\)"),
    # --- artifacts
    ("artifact_truncated", lambda c, m: graphopt.load(_truncate(c.copy_artifact())),
     ArtifactError, OSError, r"SHA-256 of model\.so does not match the manifest \(the file was changed or truncated\)"),
    ("artifact_manifest_corrupt", lambda c, m: graphopt.load(_write_garbage_manifest(c.copy_artifact())),
     ArtifactError, OSError, r"manifest\.json is corrupt"),
    ("artifact_manifest_missing",
     lambda c, m: graphopt.load(os.remove(os.path.join(p := c.copy_artifact(), "manifest.json")) or p),
     ArtifactError, OSError, r"manifest\.json is missing \(not a graphopt artifact\?\)"),
    ("artifact_for_another_target",
     lambda c, m: graphopt.load(c.edit_manifest(c.copy_artifact(), target__tvm={"kind": "llvm",
                                                                                "mtriple": "aarch64-linux-gnu"})),
     ArtifactError, OSError, r"was built for .*\(aarch64-linux-gnu\); this machine is x86_64"),
    ("artifact_format_from_the_future",
     lambda c, m: graphopt.load(c.edit_manifest(c.copy_artifact(), format_version=99)),
     ArtifactError, OSError, r"format version 99 is not supported by this graphopt \(reads version 1\); rebuild it"),
    ("artifact_incompatible_tvm", lambda c, m: graphopt.load(c.edit_manifest(c.copy_artifact(), tvm_version="0.9.0")),
     ArtifactError, OSError, r"was built with TVM 0\.9\.0; this runtime is TVM 0\.27"),
    ("artifact_missing_folder", lambda c, m: graphopt.load(os.path.join(c.tmp, "nowhere")),
     ArtifactError, OSError, r"artifact .*nowhere: no such folder"),
    ("unwritable_output_folder", lambda c, m: c.module.save(_file_as_parent(c)),
     ArtifactError, OSError, r"cannot write artifact to .*a_file/out"),
    ("output_folder_is_not_an_artifact", lambda c, m: c.module.save(_not_an_artifact(c)),
     ArtifactError, OSError, r"precious exists and is not a graphopt artifact \(it has no manifest\.json\); "
     r"refusing to replace it: save to a new or an empty folder"),
    ("output_folder_holds_a_stray_manifest", lambda c, m: c.module.save(_stray_manifest(c)),
     ArtifactError, OSError, r"stray exists and is not a graphopt artifact \(the library its manifest\.json names "
     r"\('model\.so'\) is not a file in it\)"),
    ("artifact_manifest_without_a_key",
     lambda c, m: graphopt.load(c.edit_manifest(c.copy_artifact(), outputs=[{"name": "y", "dtype": "float32"}])),
     ArtifactError, OSError, r"manifest\.json outputs\[0\] has no 'shape' list of sizes and dim names"),
    ("artifact_library_outside_the_folder",
     lambda c, m: graphopt.load(c.edit_manifest(c.copy_artifact(), library="../small/model.so")),
     ArtifactError, OSError, r"names library '\.\./small/model\.so': it must be a plain file name inside the "
     r"artifact folder"),
    ("missing_cross_toolchain", _save_arm_without_toolchain,
     ToolchainError, RuntimeError,
     r"the `ziglang` package is not installed and the .* cross compiler `aarch64-linux-gnu-g\+\+` is not on PATH. "
     r"Install either with: pip install ziglang, or: apt-get install"),
]


def _leftovers(folder: str) -> list[str]:
    """Half-written artifacts: temporary folders (".name.xxxx"), or ".old" backups."""
    found = []
    for root, dirs, _ in os.walk(folder):
        found += [os.path.join(root, d) for d in dirs if d.startswith(".") or d.endswith(".old")]
    return found


def test_catalogue_is_big_enough():
    assert len(CATALOGUE) >= 25
    assert len({entry[0] for entry in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("name,action,error,builtin,message", CATALOGUE, ids=[e[0] for e in CATALOGUE])
def test_bad_input_raises_its_typed_error(ctx, monkeypatch, name, action, error, builtin, message):
    before = set(os.listdir(ctx.tmp))
    with pytest.raises(error) as info:
        action(ctx, monkeypatch)
    e = info.value
    assert type(e) is error, f"{name}: raised {type(e).__name__}, expected exactly {error.__name__}"
    assert isinstance(e, GraphoptError) and isinstance(e, builtin)
    declared = next(c for c in type(e).__mro__ if len(c.__bases__) == 2)  # e.g. PipelineError for PassOptionError
    assert declared.__bases__[0] is GraphoptError and declared.__bases__[1] is builtin
    assert re.search(message, str(e), re.S), f"{name}: message {str(e)!r} does not match {message!r}"
    # no half-written artifact anywhere, and no new artifact folder from a failed save
    assert _leftovers(ctx.tmp) == []
    if name in ("unwritable_output_folder", "missing_cross_toolchain"):
        assert set(os.listdir(ctx.tmp)) - before <= {"a_file", "empty-bin"}
    if name == "output_folder_is_not_an_artifact":
        assert os.listdir(os.path.join(ctx.tmp, "precious")) == ["notes.txt"]
    if name == "output_folder_holds_a_stray_manifest":
        assert os.listdir(os.path.join(ctx.tmp, "stray")) == ["manifest.json"]


def test_a_bf16_build_takes_bf16_inputs():
    """bf16 inputs are an InputError for a float32 build (the catalogue) and just work for a
    bf16 one: torch bf16 tensors, and numpy arrays of ml_dtypes' bfloat16."""
    import ml_dtypes

    model = Small().to(torch.bfloat16).eval()
    x = X.to(torch.bfloat16)
    module = graphopt.compile(model, "x86", (x,), pipeline="fold")
    assert module.manifest["inputs"][0]["dtype"] == "bfloat16"
    out = module(x)
    assert out.dtype == torch.bfloat16
    assert_matches_eager(out, model, (x,), tolerance="half")
    out_np = module(x.float().numpy().astype(ml_dtypes.bfloat16))
    assert out_np.dtype == ml_dtypes.bfloat16
    assert_matches_eager(torch.from_numpy(out_np.astype(np.float32)).to(torch.bfloat16), model, (x,),
                         tolerance="half")


def test_nan_and_inf_inputs_propagate_like_eager(compiled):
    module, _ = compiled
    x = torch.tensor([[float("nan"), 1.0, 2.0, 3.0], [float("inf"), 0.0, -1.0, 0.5]])
    model = Small().eval()
    model.load_state_dict({k.removeprefix("p_").replace("_", "."): v for k, v in module.graph.constants().items()})
    # NaN/inf in the places eager has them, then the finite values on the algebraic rung
    assert_matches_eager(module(x), model, (x,))


# --------------------------------------------------------------- the CLI: no crash
def _cli(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("args,error,message", [
    (["compile", "mlp", "--target", "x87", "-o", "out"], "TargetError", "unknown target 'x87'"),
    (["compile", "mlp", "--pipeline", "prune{ratio=1.5}", "-o", "out"], "PassOptionError", "out of range"),
    (["compile", "mlp", "--input-shape", "1,3,x", "-o", "out"], "CaptureError", "bad input shape '1,3,x'"),
    (["run", "TAMPERED", "--input", "x.npy"], "ArtifactError", "SHA-256 of model.so does not match"),
], ids=["bad_target", "out_of_range_option", "bad_input_shape", "tampered_artifact"])
def test_cli_reports_bad_inputs_without_crashing(compiled, tmp_path, args, error, message):
    tampered = shutil.copytree(compiled[1], tmp_path / "tampered")
    _truncate(str(tampered))
    np.save(tmp_path / "x.npy", X.numpy())
    args = [str(tampered) if a == "TAMPERED" else a for a in args]
    result = _cli(*args, cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert f"error: {error}: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and _leftovers(str(tmp_path)) == []
