"""Thread safety of compiled modules.

* One compiled module called from 8 threads x 100 calls, each call on its own input, gives exactly
  what single-threaded calls give (each thread gets its own VM over the shared executable:
  graphopt.artifact.CompiledModule).
* The *first* call of a module, where each thread creates its VM and the module learns which outputs
  it must copy, is raced from several threads at once, several times over with a fresh module each
  time: with numpy and torch inputs side by side, on a loaded artifact, on a dynamic-batch build (each
  thread its own batch size) and on an int8 build. Every thread gets, bit for bit, what a module
  called from one thread returns; that module in turn matches eager PyTorch on its rung.

Every thread is joined with a timeout: a deadlock fails the test instead of hanging the run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

import graphopt
from graphopt.artifact import CompiledModule
from graphopt.testing import assert_close, assert_matches_eager

THREADS = 8
CALLS = 100
RACERS = 4  # threads racing one first call
ROUNDS = 3  # fresh modules per race
JOIN_TIMEOUT_S = 120.0


def _inputs(n, shape):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _run_threads(worker: Callable[[int], Any], count: int) -> list[Any]:
    """Run ``worker(t)`` for t in range(count), each on its own thread, all released at once; their
    results in order. A worker's exception fails the test; so does a thread still alive after
    JOIN_TIMEOUT_S (a deadlock), reported by name instead of hanging."""
    barrier = threading.Barrier(count, timeout=JOIN_TIMEOUT_S)
    results: list[Any] = [None] * count
    errors: list[tuple[int, BaseException]] = []

    def run(t: int) -> None:
        try:
            barrier.wait()
            results[t] = worker(t)
        except BaseException as e:  # surfaced by the assertion below
            errors.append((t, e))

    # daemon: a deadlocked thread must not keep the test process alive after the failure
    threads = [threading.Thread(target=run, args=(t,), name=f"caller-{t}", daemon=True) for t in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=JOIN_TIMEOUT_S)
    hung = [th.name for th in threads if th.is_alive()]
    assert not hung, f"threads still running after {JOIN_TIMEOUT_S:.0f} s (deadlock?): {hung}"
    assert errors == [], f"calls raised: {errors}"
    return results


def _race_first_calls(fresh_module: Callable[[], CompiledModule], inputs: Sequence[tuple]) -> list[list[Any]]:
    """For ROUNDS fresh modules, call each from len(inputs) threads at once, thread t with inputs[t] as
    its very first call; per round, the outputs in thread order."""
    rounds = []
    for _ in range(ROUNDS):
        module = fresh_module()
        rounds.append(_run_threads(lambda t: module(*inputs[t]), len(inputs)))
    return rounds


def _assert_same_bits(got: Any, want: Any, what: str) -> None:
    assert type(got) is type(want), f"{what}: {type(got).__name__} instead of {type(want).__name__}"
    assert_close(got, want, "exact", what=f"{what} against one thread's result")


def _assert_race_matches_one_thread(reference: CompiledModule, fresh_module: Callable[[], CompiledModule],
                                    inputs: Sequence[tuple]) -> None:
    expected = [reference(*args) for args in inputs]  # one thread, one call after another
    for r, outputs in enumerate(_race_first_calls(fresh_module, inputs)):
        for t, (got, want) in enumerate(zip(outputs, expected)):
            _assert_same_bits(got, want, f"round {r}, thread {t}")


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2), 1))


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return SmallCNN().eval()


def _fresh(module: CompiledModule) -> Callable[[], CompiledModule]:
    """A new module over the same executable: no thread has called it yet."""
    return lambda: CompiledModule(module.executable, module.manifest)


@pytest.fixture(scope="module")
def cnn_module():
    model = _small_cnn()
    return model, graphopt.compile(model, "x86", (torch.randn(1, 3, 8, 8),))


def test_eight_threads_match_single_threaded(conv_bn_net):
    model, (x,) = conv_bn_net
    module = graphopt.compile(model, "x86", (x,), "fold")
    inputs = _inputs(THREADS * CALLS, tuple(x.shape))
    expected = [module(a) for a in inputs]

    def calls(t):
        return {i: module(inputs[i]) for i in range(t, len(inputs), THREADS)}

    results = {i: out for per_thread in _run_threads(calls, THREADS) for i, out in per_thread.items()}
    assert sorted(results) == list(range(THREADS * CALLS))
    assert_close([results[i] for i in range(len(expected))], expected, "exact",
                 what="the threads' calls against the single-threaded ones")
    # and the single-threaded results are the model's
    assert_matches_eager(expected[0], model, (inputs[0],))


def test_first_call_race_with_numpy_and_torch_inputs(cnn_module):
    model, module = cnn_module
    xs = _inputs(RACERS, (1, 3, 8, 8))
    # even threads call with torch tensors, odd ones with numpy arrays (which come back as numpy)
    inputs = [(x,) if t % 2 == 0 else (x.numpy(),) for t, x in enumerate(xs)]
    _assert_race_matches_one_thread(module, _fresh(module), inputs)
    assert_matches_eager(module(xs[0]), model, (xs[0],))


def test_first_call_race_on_a_loaded_artifact(cnn_module, tmp_path):
    model, module = cnn_module
    path = module.save(str(tmp_path / "cnn"))
    xs = _inputs(RACERS, (1, 3, 8, 8))
    inputs = [(x,) if t % 2 == 0 else (x.numpy(),) for t, x in enumerate(xs)]
    _assert_race_matches_one_thread(graphopt.load(path), lambda: graphopt.load(path), inputs)
    assert_matches_eager(graphopt.load(path)(xs[1]), model, (xs[1],))


def test_first_call_race_on_a_dynamic_batch_build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    module = graphopt.compile(model, "x86", (torch.randn(2, 16),), dynamic_shapes="batch")
    # each thread its own batch size: every VM sees a shape the others do not
    inputs = [(x,) for x in (torch.randn(batch, 16) for batch in (1, 2, 3, 5))]
    _assert_race_matches_one_thread(module, _fresh(module), inputs)
    for (x,) in inputs:
        assert_matches_eager(module(x), model, (x,))


def test_first_call_race_on_an_int8_build():
    model = _small_cnn()
    calibration = [(x,) for x in _inputs(8, (1, 3, 8, 8))]
    module = graphopt.compile(model, "x86", (calibration[0][0],), "fold,quantize{mode=int8},fuse",
                              calibration_data=calibration)
    xs = [torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(10 + t)) for t in range(RACERS)]
    inputs = [(x,) if t % 2 == 0 else (x.numpy(),) for t, x in enumerate(xs)]
    _assert_race_matches_one_thread(module, _fresh(module), inputs)
    with torch.no_grad():
        assert_close(module(xs[0]), model(xs[0]), "int8")
