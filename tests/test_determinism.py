"""Deterministic builds.

* Compiling the same model with the same pipeline twice in one process gives byte-identical manifests
  (no timestamps, sorted keys) and identical outputs.
* Across two separate Python processes (with different hash seeds, so nothing may depend on the order of
  a set or dict of strings), the default pipeline and the int8 pipeline ``fold,quantize{mode=int8},fuse``
  give the same artifact: the same manifest bytes, the same library (its SHA-256, recorded in the
  manifest) and the same outputs bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import graphopt
from graphopt.testing import assert_close

BUILD_TIMEOUT_S = 600.0

# Run in a fresh interpreter: builds a seeded small CNN, compiles it with PIPELINE (int8: calibrated on
# seeded samples), saves the artifact to OUT/artifact and the outputs on seeded inputs to OUT/outputs.npz.
CHILD = r"""
import sys
import numpy as np
import torch
import graphopt

pipeline, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
    torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU(),
    torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10),
).eval()
g = torch.Generator().manual_seed(1)
inputs = [torch.randn(1, 3, 8, 8, generator=g) for _ in range(3)]
calibration = [(torch.randn(1, 3, 8, 8, generator=g),) for _ in range(8)] if "quantize" in pipeline else None
module = graphopt.compile(model, "x86", (inputs[0],), pipeline, calibration_data=calibration)
module.save(out + "/artifact")
np.savez(out + "/outputs.npz", *[module(x).numpy() for x in inputs])
"""


def _build_in_a_fresh_process(pipeline: str, out: Path, hash_seed: int) -> tuple[bytes, list[np.ndarray]]:
    out.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    proc = subprocess.run([sys.executable, "-c", CHILD, pipeline, str(out)], env=env, capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"the build process failed:\n{proc.stderr[-3000:]}"
    with np.load(out / "outputs.npz") as data:
        outputs = [data[k] for k in sorted(data.files)]
    return (out / "artifact" / "manifest.json").read_bytes(), outputs


def _conv_bn_inputs(n, shape):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_compiling_twice_in_one_process_is_deterministic(conv_bn_net, tmp_path):
    model, (x,) = conv_bn_net
    first = graphopt.compile(model, "x86", (x,), "fold")
    second = graphopt.compile(model, "x86", (x,), "fold")
    a, b = first.save(str(tmp_path / "a")), second.save(str(tmp_path / "b"))
    manifest_a = (tmp_path / "a" / "manifest.json").read_bytes()
    manifest_b = (tmp_path / "b" / "manifest.json").read_bytes()
    assert manifest_a == manifest_b
    assert b'"pipeline": "fold"' in manifest_a
    for inp in _conv_bn_inputs(5, tuple(x.shape)):
        assert_close(second(inp), first(inp), "exact")
        assert_close(graphopt.load(b)(inp), graphopt.load(a)(inp), "exact")


@pytest.mark.timeout(2 * BUILD_TIMEOUT_S + 60)
@pytest.mark.parametrize("pipeline", ["default", "fold,quantize{mode=int8},fuse"])
def test_two_processes_build_the_same_artifact(pipeline, tmp_path):
    manifest_a, outputs_a = _build_in_a_fresh_process(pipeline, tmp_path / "a", hash_seed=1)
    manifest_b, outputs_b = _build_in_a_fresh_process(pipeline, tmp_path / "b", hash_seed=2)
    library_hash = json.loads(manifest_a)["sha256"]
    assert len(library_hash) == 64
    assert manifest_a == manifest_b, "the two builds differ (library SHA-256 or manifest fields)"
    assert len(outputs_a) == len(outputs_b) == 3
    assert all(a.dtype == np.float32 and a.shape == (1, 10) for a in outputs_a)
    assert_close(outputs_b, outputs_a, "exact", what="the second process against the first")
