"""Thread safety and deterministic builds.

* One compiled module called from 8 threads x 100 calls, each call on its own input,
  gives exactly what single-threaded calls give (each thread gets its own VM over the
  shared executable: graphopt.artifact.CompiledModule).
* Compiling the same model with the same pipeline twice gives byte-identical manifests
  (no timestamps, sorted keys) and identical outputs.
"""

import threading

import torch

import graphopt

THREADS = 8
CALLS = 100


def _inputs(n, shape):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_eight_threads_match_single_threaded(conv_bn_net):
    model, (x,) = conv_bn_net
    module = graphopt.compile(model, "x86", (x,), "fold")
    inputs = _inputs(THREADS * CALLS, tuple(x.shape))
    expected = [module(a) for a in inputs]

    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(t):
        try:
            start.wait()  # all threads call at once
            for i in range(t, len(inputs), THREADS):
                results[i] = module(inputs[i])
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert sorted(results) == list(range(THREADS * CALLS))
    for i, want in enumerate(expected):
        assert torch.equal(results[i], want), f"call {i} differs from the single-threaded result"
    # and the single-threaded results are the model's
    torch.testing.assert_close(expected[0], model(inputs[0]).detach(), rtol=1e-4, atol=1e-5)


def test_compiling_twice_is_deterministic(conv_bn_net, tmp_path):
    model, (x,) = conv_bn_net
    first = graphopt.compile(model, "x86", (x,), "fold")
    second = graphopt.compile(model, "x86", (x,), "fold")
    a, b = first.save(str(tmp_path / "a")), second.save(str(tmp_path / "b"))
    manifest_a = (tmp_path / "a" / "manifest.json").read_bytes()
    manifest_b = (tmp_path / "b" / "manifest.json").read_bytes()
    assert manifest_a == manifest_b
    assert b'"pipeline": "fold"' in manifest_a
    for inp in _inputs(5, tuple(x.shape)):
        assert torch.equal(first(inp), second(inp))
        assert torch.equal(graphopt.load(a)(inp), graphopt.load(b)(inp))
