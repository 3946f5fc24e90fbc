"""Remote tuning over TVM RPC: tracker and servers on loopback (127.0.0.1).

Specification: with ``Tune(rpc=RPC(key, tracker))`` every measurement runs on the device
registered under ``key``: an x86 RPC server here, and an aarch64 server running under
qemu-user (the emulated board of targets/aarch64/emulation.py), which receives libraries linked by
the aarch64 cross compiler. Records land in the database like local ones; the tuned module
matches eager (x86) and the aarch64 artifact runs on the emulated board. A key no server
has is a TuningError naming the known devices.
"""

import glob
import os

import pytest
import torch

import graphopt
from graphopt.errors import TuningError
from graphopt.testing import assert_matches_eager
from graphopt.targets.tuning.remote import LoopbackCluster
from graphopt.targets.tuning.tuner import RPC, Tune

SMALL = dict(population=16, trials_per_iter=2, progress=False)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU()).eval()


def count_records(db: str) -> int:
    (path,) = glob.glob(os.path.join(db, "*", "database_tuning_record.json"))
    with open(path) as f:
        return sum(1 for line in f if line.strip())


@pytest.fixture(scope="module")
def cluster():
    with LoopbackCluster() as c:
        c.add_host_server("x86-box")
        c.wait_for("x86-box", timeout_s=60)
        yield c


@pytest.mark.slow
def test_tuning_measures_on_the_x86_rpc_server(cluster, tmp_path):
    model, x = tiny_model(), torch.randn(1, 32)
    tune = Tune(trials=3, db=str(tmp_path / "db"), rpc=RPC("x86-box", cluster.address), **SMALL)
    module = graphopt.compile(model, "x86", (x,), tune=tune)
    assert tune.log.measured >= 2 and tune.log.best_ms is not None  # the measurements succeeded
    assert count_records(str(tmp_path / "db")) == tune.log.measured
    assert_matches_eager(module(x), model, (x,))


def test_unknown_device_key_is_a_tuning_error(cluster, tmp_path):
    with pytest.raises(TuningError, match="no device with key 'rpi9'"):
        graphopt.compile(tiny_model(), "x86", (torch.randn(1, 32),),
                         tune=Tune(trials=2, db=str(tmp_path / "db"), rpc=RPC("rpi9", cluster.address)))


def test_no_tracker_is_a_tuning_error(tmp_path):
    with pytest.raises(TuningError, match="no RPC tracker answers"):
        graphopt.compile(tiny_model(), "x86", (torch.randn(1, 32),),
                         tune=Tune(trials=2, db=str(tmp_path / "db"), rpc=RPC("x", "127.0.0.1:1")))


@pytest.mark.slow
@pytest.mark.emulated
@pytest.mark.timeout(1800)  # an emulated server takes minutes to start and to measure on a busy host
def test_tuning_measures_on_an_emulated_aarch64_server(cluster, aarch64_env, tmp_path):
    from graphopt.targets.aarch64.emulation import run_artifact_emulated

    env = aarch64_env
    cluster.add_emulated_aarch64_server("arm64-emu", env)
    cluster.wait_for("arm64-emu", timeout_s=240)  # `import tvm` takes ~10 s emulated, more on a busy host
    model, x = tiny_model(), torch.randn(1, 32)
    tune = Tune(trials=3, db=str(tmp_path / "db"), rpc=RPC("arm64-emu", cluster.address, session_timeout_s=300),
                **SMALL)
    module = graphopt.compile(model, "arm64", (x,), tune=tune)
    assert tune.log.best_ms is not None  # at least one candidate ran on the emulated board
    assert count_records(str(tmp_path / "db")) == tune.log.measured
    artifact = module.save(str(tmp_path / "arm"))
    (out,) = run_artifact_emulated(artifact, [x.numpy()], env=env)
    assert_matches_eager(out, model, (x,))
