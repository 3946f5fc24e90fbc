"""Caches are keyed by everything that makes a cached record stale.

Specification:

* ``explore``'s cache: a candidate measured on one evaluation set, or built with one
  calibration set, is measured again when the data changes (values, not only shapes), and
  reused when the same data comes back.
* The tuning database: records live in a sub-folder keyed by the target and by the graphopt
  version, the TVM version and a hash of the CPU schedule rules' sources; a change of any of
  them gives a different sub-folder, so no record measured for other code is applied.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from graphopt.exploration import Candidate, explore


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(8, 3).eval()


@pytest.fixture(scope="module")
def data():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = _model()(x).argmax(-1)
    wrong = (predicted + 1) % 3
    return x, predicted, wrong


def _explore(cache, evaluate, calibration_data=None):
    return explore(_model(), (evaluate[0][:1],), "x86", evaluate=evaluate, calibration_data=calibration_data,
                   candidates=[Candidate("fold", "fold")], cache_dir=str(cache), progress=False)


def _cached(cache) -> list[str]:
    return sorted(f for f in os.listdir(cache) if f.endswith(".json"))


def test_explore_measures_again_on_other_evaluation_data(data, tmp_path):
    x, predicted, wrong = data
    first = _explore(tmp_path, (x, wrong)).candidates[0]
    assert first.ok and first.accuracy == 0.0
    second = _explore(tmp_path, (x, predicted)).candidates[0]  # same shapes, other labels
    assert second.ok and second.accuracy == 1.0
    assert len(_cached(tmp_path)) == 2
    again = _explore(tmp_path, (x, predicted)).candidates[0]  # the same data again: from the cache
    assert again.accuracy == 1.0 and again.compile_s == second.compile_s
    assert len(_cached(tmp_path)) == 2


def test_explore_measures_again_with_other_calibration_data(data, tmp_path):
    x, predicted, _ = data
    _explore(tmp_path, (x, predicted), calibration_data=[(x[:1],)])
    assert len(_cached(tmp_path)) == 1
    _explore(tmp_path, (x, predicted), calibration_data=[(x[1:2],)])  # same shape, other values
    assert len(_cached(tmp_path)) == 2
    _explore(tmp_path, (x, predicted), calibration_data=(b for b in [(x[1:2],)]))  # a generator of the same
    assert len(_cached(tmp_path)) == 2


# ------------------------------------------------------------------------------ tuning database
@pytest.mark.parametrize("change", ["graphopt", "tvm", "schedule_rules"])
def test_the_tuning_database_is_keyed_by_versions(change, monkeypatch, tmp_path):
    import tvm

    import graphopt
    from graphopt.targets.registry import resolve_target
    from graphopt.targets.tuning import store

    target = resolve_target("x86-avx2").to_json()
    before = store.TuningStore(str(tmp_path), target).path
    assert store.TuningStore(str(tmp_path), target).path == before  # same code: same records
    if change == "graphopt":
        monkeypatch.setattr(graphopt, "__version__", "99.0")
    elif change == "tvm":
        monkeypatch.setattr(tvm, "__version__", "0.99.0")
    else:
        monkeypatch.setattr(store, "schedule_rules_version", lambda: "edited-rules")
    after = store.TuningStore(str(tmp_path), target).path
    assert after != before
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(before), os.path.basename(after)])


def test_the_rules_version_follows_the_rule_sources(tmp_path):
    from graphopt.targets.tuning.store import RULES_DIR, schedule_rules_version

    same, edited = str(tmp_path / "same"), str(tmp_path / "edited")
    shutil.copytree(RULES_DIR, same)
    shutil.copytree(RULES_DIR, edited)
    with open(os.path.join(edited, "conv2d.py"), "a") as f:
        f.write("\n# a changed rule\n")
    assert schedule_rules_version(same) == schedule_rules_version(RULES_DIR)
    assert schedule_rules_version(edited) != schedule_rules_version(RULES_DIR)
