"""Differential fuzzing in CI: 100 random models through capture, every registered pass
alone, the default pipeline and the x86 build, and 20 of them through the aarch64 build run
under qemu-aarch64, with zero mismatches allowed.

Models come from graphopt.fuzz.generator (seeds 0..99). They are captured and built in
batches of ten (graphopt.fuzz.harness.Case) because capture and build have a large fixed
cost; a failure still names its own seed, with a minimized reproducer. Long campaigns:
``python -m graphopt.fuzz --graphs 5000`` (see tests/README.md).
"""

import collections

import pytest
import torch

from graphopt.fuzz import GraphSpec, check_spec, generate, minimize, pass_stages
from graphopt.fuzz.op_catalog import BINARY, UNARY
from graphopt.fuzz.harness import Case, Stage, compare, default_stages, pipeline_tolerance
from graphopt.fuzz.campaign import minimize_failure
from graphopt.testing import assert_close

GRAPHS = 100
BATCH = 10
MAX_OPS = 8
PIPELINE = "default"


@pytest.fixture(scope="module")
def cases():
    batches = []
    for first in range(0, GRAPHS, BATCH):
        batches.append(Case([generate(s, max_ops=MAX_OPS) for s in range(first, first + BATCH)]))
    return batches


def _check(cases, stage: Stage, minimize_first: int = 2):
    failures = [f for case in cases for f in case.check([stage])]
    for f in failures[:minimize_first]:
        f.minimized = minimize_failure(f, [stage])
    assert not failures, f"{len(failures)} fuzz failure(s) in {stage.name}:\n" + "\n".join(
        f.reproducer() for f in failures[:minimize_first]) + "\nall seeds: " + ", ".join(
        str(f.seed) for f in failures)


# ------------------------------------------------------------------------ the generator
def test_generator_is_reproducible():
    a, b = generate(42), generate(42)
    assert repr(a) == repr(b)
    assert_close(b.example_inputs(), a.example_inputs(), "exact")
    with torch.no_grad():
        out_a, out_b = a.build()(*a.example_inputs()), b.build()(*b.example_inputs())
    assert_close(out_b, out_a, "exact")
    assert repr(generate(43)) != repr(a)


def test_spec_repr_rebuilds_the_same_model():
    from graphopt.fuzz import Op  # noqa: F401 - the repr names it

    spec = generate(7)
    again = eval(repr(spec))  # noqa: S307 - our own repr, the reproducer format
    assert isinstance(again, GraphSpec) and repr(again) == repr(spec)
    with torch.no_grad():
        assert_close(again.build()(*again.example_inputs()), spec.build()(*spec.example_inputs()), "exact")


def test_generator_covers_the_op_mix():
    kinds = collections.Counter(op.kind for s in range(GRAPHS) for op in generate(s, max_ops=MAX_OPS).ops)
    required = {"conv2d", "linear", "matmul_self", "matmul_weight", "batchnorm", "layernorm", "softmax",
                "attention", "concat", "split", "reshape", "flatten", "permute", "maxpool", "avgpool",
                "dropout", "twice", "const_expr", "fill_mask"}
    assert required <= set(kinds), f"never generated: {required - set(kinds)}"
    assert any(k in kinds for k in UNARY) and any(k in kinds for k in BINARY)
    convs = [op for s in range(GRAPHS) for op in generate(s, max_ops=MAX_OPS).ops if op.kind == "conv2d"]
    assert any(op.params["groups"] > 1 for op in convs), "no grouped/depthwise conv"
    shapes = {spec.shapes[v] for s in range(GRAPHS) for spec in [generate(s)] for v in spec.inputs}
    assert len(shapes) > 30 and {len(sh) for sh in shapes} == {2, 3, 4}


def test_every_generated_model_runs_and_has_outputs():
    for s in range(GRAPHS):
        spec = generate(s, max_ops=MAX_OPS)
        assert 1 <= len(spec.ops) <= MAX_OPS and spec.outputs
        with torch.no_grad():
            outs = spec.build()(*spec.example_inputs())
        assert [tuple(o.shape) for o in outs] == [spec.shapes[v] for v in spec.outputs]
        assert all(o.isfinite().all() for o in outs)


# ---------------------------------------------------------------------- the comparison
def test_compare_follows_the_ladder():
    x = torch.randn(4, 5)
    assert compare((x,), (x.clone(),), "exact").ok
    assert not compare((x,), (x + 1e-7,), "exact").ok
    assert compare((x,), (x * (1 + 1e-6),), "algebraic").ok
    bad = compare((x,), (x + 1e-2,), "algebraic")
    assert not bad.ok and "max abs error" in bad.message
    assert compare((x,), (x + 1e-3,), "half").ok
    assert not compare((x,), (x.double(),), "algebraic").ok  # dtype changes are never within tolerance
    nan = torch.tensor([float("nan"), 1.0])
    assert compare((nan,), (nan.clone(),), "exact").ok
    assert not compare((torch.ones(2),), (nan,), "lossy").ok  # a NaN where the reference is finite


def test_compare_float64_fallback_accepts_a_different_rounding():
    # cancellation: eager fp32 itself is off by more than atol; ours, equally close to the
    # float64 truth, passes although it differs from eager beyond rtol/atol
    truth = torch.tensor([1e-3], dtype=torch.float64)
    eager, ours = torch.tensor([1e-3 + 2e-5]), torch.tensor([1e-3 - 2e-5])
    assert not compare((eager,), (ours,), "algebraic").ok
    assert compare((eager,), (ours,), "algebraic", truth=(truth,)).ok
    assert not compare((eager,), (torch.tensor([1e-3 + 1e-3]),), "algebraic", truth=(truth,)).ok


def test_pipeline_tolerance_is_the_loosest_pass():
    assert pipeline_tolerance("cse,dce") == "exact"
    assert pipeline_tolerance("noop,fold-bn") == "algebraic"


# ------------------------------------------------------------------- the minimizer
def test_minimizer_shrinks_to_the_op_that_matters():
    spec = next(s for s in map(generate, range(200)) if len(s.ops) >= 6 and any(o.kind == "softmax" for o in s.ops))

    def has_softmax(candidate):
        return any(o.kind == "softmax" for o in candidate.ops)

    small = minimize(spec, has_softmax)
    assert [o.kind for o in small.ops] == ["softmax"]
    assert len(small.outputs) == 1
    with torch.no_grad():  # still a valid model
        small.build()(*small.example_inputs())


def test_a_failure_prints_seed_and_reproducer():
    spec = generate(5)
    failure = check_spec(spec, [Stage("pass", "cse", "exact")])
    assert failure == []
    from graphopt.fuzz import Failure

    f = Failure(5, "pass:cse", "mismatch", "output 0 is not bit-identical", spec, minimized=spec)
    text = f.reproducer()
    assert "seed 5" in text and "pass:cse" in text and "GraphSpec(seed=5" in text
    assert "python -m graphopt.fuzz --seed 5" in text


# ------------------------------------------------------------ the differential stages
def test_capture_matches_eager(cases):
    _check(cases, Stage("capture", tolerance="algebraic"))


@pytest.mark.parametrize("stage", pass_stages(), ids=lambda s: s.text)
def test_each_pass_alone_matches_eager(cases, stage):
    _check(cases, stage)


def test_default_pipeline_matches_eager(cases):
    _check(cases, Stage("pipeline", PIPELINE, pipeline_tolerance(PIPELINE)))


@pytest.mark.slow
def test_x86_build_matches_eager(cases):
    stage = next(s for s in default_stages(pipeline=PIPELINE, target="x86") if s.kind == "build")
    _check(cases, stage, minimize_first=1)


@pytest.mark.slow
def test_prune_quantize_compile():
    # >= 25 graphs through prune, int8 quantization and the x86 build. Checked in a worker
    # process: an int8 kernel that kills the process (SIGILL) is reported with its seed
    # instead of taking pytest down.
    from graphopt.fuzz import fuzz, stage_named

    stage = stage_named("build:x86[fold,prune,quantize]")
    report = fuzz(25, 0, [stage], max_ops=MAX_OPS, batch=13, minimize=False, isolate=True, log=None)
    assert report.graphs == 25
    assert not report.failures, report.summary() + "\n" + "\n".join(f.reproducer() for f in report.failures[:3])


# ------------------------------------------------------------- the aarch64 build, emulated
@pytest.fixture(scope="module")
def aarch64_ready(aarch64_env):
    """qemu + the cached aarch64 sysroot (tests/conftest.py: installed if missing; a skip only outside CI
    on a machine that cannot install them); the linker is the ziglang dependency."""
    return aarch64_env


def test_arm64_target_gives_an_emulated_build_stage():
    stage = next(s for s in default_stages(pipeline=PIPELINE, target="arm64") if s.kind == "build")
    assert stage.name == "build:arm64[default]" and stage.tolerance == "algebraic"
    from graphopt.fuzz import stage_named

    assert stage_named(stage.name) == stage


@pytest.mark.slow
@pytest.mark.emulated
def test_aarch64_build_matches_eager(cases, aarch64_ready):
    # 20 models in two batches: two cross-compiled artifacts, run by ONE emulated process
    from graphopt.fuzz import emulated

    stage = next(s for s in default_stages(pipeline=PIPELINE, target="arm64") if s.kind == "build")
    before = emulated.session()
    starts, runs = before.starts, before.runs
    _check(cases[:2], stage, minimize_first=1)
    assert sum(len(c.specs) for c in cases[:2]) >= 10
    assert emulated.session() is before and before.runs == runs + 2
    assert before.starts <= max(starts, 1)  # started at most once, for both artifacts


@pytest.mark.emulated
def test_aarch64_mismatch_names_seed_and_is_minimized(aarch64_ready, monkeypatch):
    # a backend that gets every number slightly wrong: the stage fails, the failure is shrunk to one op
    # and printed with its seed and a reproducer naming the aarch64 stage
    from graphopt.fuzz import emulated, fuzz, stage_named

    real = emulated.run_emulated
    monkeypatch.setattr(emulated, "run_emulated",
                        lambda module, inputs: tuple(o + 0.5 for o in real(module, inputs)))
    report = fuzz(1, 11, [stage_named("build:arm64[none]")], max_ops=3, batch=1, log=None)
    (failure,) = report.failures
    assert (failure.seed, failure.stage, failure.kind) == (11, "build:arm64[none]", "mismatch")
    assert "max abs error" in failure.message
    assert failure.minimized is not None and len(failure.minimized.ops) == 1
    text = failure.reproducer()
    assert "seed 11" in text and "stage_named('build:arm64[none]')" in text
