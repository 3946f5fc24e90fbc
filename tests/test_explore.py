"""explore: a small end-to-end search on real digits data, cached, reported, within budget."""

import os

import pytest
import torch

from graphopt.exploration import Candidate, explore
from graphopt.exploration.search import build_candidate, candidate_of, make_metric, pareto_front, CandidateResult
from graphopt.models import digits_mlp, load_digits_split, train_digits


@pytest.fixture(scope="module")
def digits():
    model, _ = train_digits(digits_mlp(), epochs=15)
    xtr, ytr, xte, yte = load_digits_split()
    half = len(xte) // 2
    train = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, len(xtr), 64)]
    return model, train, (xte[:half], yte[:half]), (xte[half:], yte[half:]), [xtr[i:i + 1] for i in range(32)]


def test_small_explore_meets_the_budget_on_held_out_data(digits, tmp_path):
    model, train, val, held_out, calib = digits
    cands = [Candidate("fused fp32", "fold,fuse"),
             Candidate("int8 mixed", "fold,quantize{mode=int8,max_error=0.02},fuse"),
             Candidate("prune 0.5", "fold,prune{ratio=0.5}", "fuse", finetune=True)]
    result = explore(model, (val[0][:1],), "x86", evaluate=val, max_accuracy_drop=0.01, train_data=train,
                     calibration_data=calib, candidates=cands, cache_dir=str(tmp_path / "cache"),
                     report_dir=str(tmp_path / "report"), progress=False)
    ok = [c for c in result.candidates if c.ok]
    assert ok, result.table()
    assert result.chosen is not None and result.chosen.accuracy_drop <= 0.01
    assert any(c.pareto for c in ok)
    # the chosen pipeline, rebuilt, holds the budget on data the search never saw
    module = build_candidate(model, (val[0][:1],), "x86", candidate_of(result.chosen), train, calib)[1]
    metric = make_metric(held_out)
    assert metric(lambda x: model(x)) - metric(module) <= 0.01 + 1.0 / len(held_out[1])
    # the report holds the numbers
    report = open(result.report).read()
    assert result.chosen.pipeline in report and f"{result.chosen.accuracy:.4f}" in report
    assert "Per-layer quantization sensitivity" in report and "| fc1 |" in report
    for png in ("accuracy_latency.png", "size.png", "sensitivity.png"):
        assert os.path.getsize(tmp_path / "report" / png) > 1000
    # a second run is served from the cache: same numbers, nothing rebuilt
    again = explore(model, (val[0][:1],), "x86", evaluate=val, train_data=train, calibration_data=calib,
                    candidates=cands, cache_dir=str(tmp_path / "cache"), progress=False)
    assert [c.latency_ms for c in again.candidates if c.ok] == [c.latency_ms for c in ok]


def test_pareto_front_marks_non_dominated_candidates():
    def r(name, acc, lat, size):
        return CandidateResult(name, name, False, accuracy=acc, accuracy_drop=0.0, latency_ms=lat, size_bytes=size)

    rs = [r("a", 0.9, 1.0, 100), r("b", 0.95, 2.0, 100), r("c", 0.9, 2.0, 200), r("d", 0.8, 0.5, 50)]
    pareto_front(rs)
    assert [x.pareto for x in rs] == [True, True, False, True]


def test_missing_passes_are_reported_not_fatal(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    result = explore(model, (x[:1],), "x86", evaluate=(x, y), candidates=[Candidate("bad", "fold,nosuch")],
                     cache_dir=str(tmp_path), progress=False)
    assert result.candidates[0].error == "pass not available: nosuch" and result.chosen is None


def test_explore_is_callable_from_the_top_level():
    import graphopt
    import graphopt.exploration.search  # noqa: F401 - importing the package's modules must not shadow it

    assert graphopt.explore is explore and callable(graphopt.explore)


def test_default_candidates_hold_int4_and_fine_tuned_sparsity_and_all_parse():
    from graphopt.exploration.search import default_candidates
    from graphopt.pipeline import Pipeline

    without = {c.name: c for c in default_candidates(set(), "llvm", with_training=False)}
    assert without["int4 g32"].pipeline == "fold,quantize{mode=int4,group=32},fuse"
    assert not any(name.startswith("sparsify") for name in without)  # sparsity needs fine-tuning data
    cands = {c.name: c for c in default_candidates(set(), "llvm", with_training=True)}
    for s in ("0.5", "0.7", "0.9"):
        assert cands[f"sparsify {s}"].before == f"fold,sparsify{{sparsity={s}}}" and cands[f"sparsify {s}"].finetune
    assert cands["int4 g32 + finetune"].finetune
    for c in cands.values():  # every pass of the search space is registered
        for text in (c.before, c.after):
            if text:
                Pipeline.parse(text)


def test_fine_tuned_int4_and_sparsity_candidates_build_and_keep_their_compression(digits):
    from graphopt.passes.quantize.int4 import LINEAR_INT4

    model, train, val, _, _ = digits
    x = val[0][:1]
    graph, module, finetune_s = build_candidate(model, (x,), "x86", Candidate(
        "s", "fold,sparsify{sparsity=0.7}", "fuse", finetune=True), train, finetune_epochs=1)
    weights = [graph.constant(n) for n in graph.nodes if n.op == "get_attr" and graph.constant(n).dim() == 2]
    assert finetune_s > 0 and all(float((w == 0).float().mean()) >= 0.69 for w in weights)
    graph, module, _ = build_candidate(model, (x,), "x86", Candidate(
        "i", "fold,quantize{mode=int4,group=32}", "fuse", finetune=True), train, finetune_epochs=1)
    assert sum(n.target is LINEAR_INT4 for n in graph.nodes) == 2
    metric = make_metric(val)
    assert metric(module) >= metric(lambda v: model(v)) - 0.02


@pytest.fixture(scope="module")
def cluster():
    from graphopt.targets.tuning.remote import LoopbackCluster

    with LoopbackCluster() as c:
        c.add_host_server("x86-box")
        c.wait_for("x86-box", timeout_s=60)
        yield c


def test_explore_measures_candidates_on_an_rpc_device(digits, cluster, tmp_path):
    from graphopt.targets.tuning.options import RPC

    model, _, val, _, _ = digits
    cands = [Candidate("int4 g32", "fold,quantize{mode=int4,group=32},fuse")]
    kwargs = dict(evaluate=(val[0][:64], val[1][:64]), candidates=cands, cache_dir=str(tmp_path / "cache"),
                  progress=False)
    remote = explore(model, (val[0][:1],), "x86", rpc=RPC("x86-box", cluster.address), **kwargs)
    assert all(c.ok and c.latency_ms > 0 for c in remote.candidates), remote.table()
    # the device runs the same artifact: the same accuracy as a local run of it
    local = explore(model, (val[0][:1],), "x86", **dict(kwargs, cache_dir=str(tmp_path / "local")))
    assert [c.accuracy for c in remote.candidates] == [c.accuracy for c in local.candidates]


def test_explore_on_an_unknown_rpc_device_is_a_tuning_error(cluster, tmp_path):
    from graphopt.errors import TuningError
    from graphopt.targets.tuning.options import RPC

    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(TuningError, match="no device with key 'rpi9'"):
        explore(model, (x[:1],), "x86", evaluate=(x, y), rpc=RPC("rpi9", cluster.address),
                candidates=[Candidate("fp32", "fold,fuse")], cache_dir=str(tmp_path), progress=False)
