"""Compiled kernels on torch's OpenMP threads (graphopt/threads.py), decided once per process.

* With ``GRAPHOPT_SHARE_TORCH_THREADS=1``, a module built in the process (LLVM JIT) and a module
  loaded from an artifact start their parallel loops through graphopt's launcher (its count of
  launches grows with their calls) and match eager PyTorch, also called between torch ops from
  several Python threads at once (each Python thread leads its own OpenMP team).
* By default a fresh process keeps TVM's own pool: the launcher is never installed, and the
  loaded artifact matches eager there too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import graphopt
from graphopt import threads
from graphopt.testing import assert_matches_eager

INPUT_SEEDS = (1, 2, 3)


def _model() -> torch.nn.Module:
    # big enough that TVM's schedules split the convolutions over threads
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(32, 16, 3)).eval()


def _input(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# Runs in a fresh process: the model module above is importable there through sys.path.
_CHILD = """
import json, sys, threading, torch, graphopt
sys.path.insert(0, sys.argv[2])
from test_threads import INPUT_SEEDS, _input, _model
from graphopt import threads

report = {"sharing_before": threads.sharing()}
built = graphopt.compile(_model(), "x86", (_input(0),))
loaded = graphopt.load(sys.argv[1])
results = {}

def worker(name, module, seed):
    for _ in range(3):
        x = torch.nn.functional.interpolate(_input(seed), scale_factor=1.0) * 1.0  # a parallel torch op first
        results[f"{name} {seed}"] = module(x).flatten().tolist()

launches = []
for name, module in (("built", built), ("loaded", loaded)):
    before = threads.launches()
    workers = [threading.Thread(target=worker, args=(name, module, s)) for s in INPUT_SEEDS]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not any(w.is_alive() for w in workers), "a thread is stuck in a parallel region"
    launches.append(threads.launches() - before)
report.update(sharing=threads.sharing(), launches=launches, results=results)
print(json.dumps(report))
"""


def _run_child(artifact: str, switch: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != threads.ENV_SWITCH}
    if switch is not None:
        env[threads.ENV_SWITCH] = switch
    out = subprocess.run([sys.executable, "-c", _CHILD, artifact, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_results_match_eager(report: dict, shape: torch.Size) -> None:
    model = _model()
    assert sorted(report["results"]) == sorted(f"{n} {s}" for n in ("built", "loaded") for s in INPUT_SEEDS)
    for key, values in report["results"].items():
        x = _input(int(key.split()[1]))
        assert_matches_eager(torch.tensor(values).reshape(shape), model, (x,))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[str, torch.Size]:
    module = graphopt.compile(_model(), "x86", (_input(0),))
    return module.save(str(tmp_path_factory.mktemp("threads") / "art")), module(_input(0)).shape


def test_switched_on_kernels_run_on_torch_openmp_threads(artifact):
    path, shape = artifact
    report = _run_child(path, "1")
    assert report["sharing_before"] is False  # nothing is decided before graphopt builds or loads
    assert report["sharing"] is True, "torch's OpenMP runtime is in the process and a C compiler is installed"
    built_launches, loaded_launches = report["launches"]
    assert built_launches > 0 and loaded_launches > 0
    _assert_results_match_eager(report, shape)


def test_by_default_kernels_keep_tvm_pool(artifact):
    path, shape = artifact
    report = _run_child(path, None)
    assert report["sharing"] is False
    assert report["launches"] == [0, 0]
    _assert_results_match_eager(report, shape)
