"""Differential testing: every random model, through every stage, against eager PyTorch.

A *stage* is one way of processing a captured graph whose numbers we can predict:

* ``capture`` — the captured graph run as PyTorch must match the model it came from;
* ``pass:NAME`` — each registered pass alone (picked up from the registry, so passes
  added later are fuzzed too), held to its own rung of the tolerance ladder
  (``graphopt.passes_base.TOLERANCES``, docs/TOLERANCES.md) against the graph before it;
  a lossy pass with a ``ratio`` option is also run with ``ratio=0``, which must be exact;
* ``pipeline:TEXT`` — a whole pipeline, held to its loosest pass's rung;
* ``build:TARGET`` — ``graphopt.compile`` for a target, held to the fp32 rung against eager
  PyTorch. A target this machine cannot run (``arm64``, any preset with a cross triple) is
  saved as an aarch64 artifact and run under qemu-aarch64 by one emulated process shared by
  the whole campaign (graphopt.fuzz.emulated).

Numbers are compared by :func:`graphopt.compare.compare`, the project's one comparison:
structure, shapes, dtypes and NaN/inf placement first, then values on the stage's rung, with
the float64 run of the models as the judge when fp32 rounding differs. An int8 pass is
checked for shapes, dtypes and new NaN/inf only (random weights promise no accuracy); a
compiled int8 build is judged against its quantized graph run by PyTorch: the fp32 rung,
else the int8 SQNR.

Any exception a stage raises is a ``crash`` failure; generated models are valid by
construction, so there is no "unsupported" excuse.

Capture and build have a large fixed cost, so a :class:`Case` holds several models side by
side in one module (one capture, one build); outputs are split per model again when
comparing, so a failure still names its seed. A stage that raises on a batch is re-run
model by model to find the culprit.
"""

from __future__ import annotations

import copy
import math
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from graphopt.compare import RUNGS, Comparison, compare, float64_run, leaves
from graphopt.fuzz.generator import GraphSpec
from graphopt.passes_base import registered_passes


# ----------------------------------------------------------------------------- comparing
def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    """A generated model's outputs as a flat tuple (the batch splits them per model)."""
    return tuple(leaves(x))


def loosest(rungs: Iterable[str]) -> str:
    return max(rungs, key=RUNGS.index, default="exact")


# ------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Stage:
    """``kind`` is capture, pass, pipeline or build; ``text`` the pipeline; ``target`` for builds."""

    kind: str
    text: str = ""
    tolerance: str = "exact"
    target: str | None = None

    @property
    def name(self) -> str:
        if self.kind == "capture":
            return "capture"
        if self.kind == "build":
            return f"build:{self.target}[{self.text}]"
        return f"{self.kind}:{self.text}"


def pipeline_tolerance(text: str) -> str:
    from graphopt.pipeline import Pipeline

    return loosest(p.rung() for p in Pipeline.parse(text).passes)


def pass_stages(names: Sequence[str] | None = None) -> list[Stage]:
    """One stage per registered pass (or per name given), plus ``ratio=0`` runs of lossy passes."""
    stages = []
    for name, cls in registered_passes().items():
        if names is not None and name not in names:
            continue
        stages.append(Stage("pass", name, cls.tolerance))
        if cls.tolerance == "lossy" and any(o.name == "ratio" for o in cls.options()):
            stages.append(Stage("pass", f"{name}{{ratio=0.0}}", "exact"))
    return stages


def default_stages(passes: Sequence[str] | None = None, pipeline: str | None = "default",
                   target: str | None = "x86") -> list[Stage]:
    stages = [Stage("capture", tolerance="algebraic"), *pass_stages(passes)]
    if pipeline:
        stages.append(Stage("pipeline", pipeline, pipeline_tolerance(pipeline)))
    if target:
        stages.append(Stage("build", pipeline or "none", loosest(["algebraic", pipeline_tolerance(pipeline or "none")]),
                            target))
    return stages


# ------------------------------------------------------------------------------- a case
@dataclass
class Failure:
    seed: int
    stage: str
    kind: str  # "mismatch" or "crash"
    message: str
    spec: GraphSpec
    minimized: GraphSpec | None = None

    def reproducer(self) -> str:
        return reproducer(self)


class _Batch(torch.nn.Module):
    """Several generated models side by side in one module: one capture, one build for all."""

    def __init__(self, specs: Sequence[GraphSpec]):
        super().__init__()
        self.models = torch.nn.ModuleList(spec.build() for spec in specs)
        self.arity = [len(spec.inputs) for spec in specs]

    def forward(self, *xs: torch.Tensor):
        outs: list[torch.Tensor] = []
        start = 0
        for model, n in zip(self.models, self.arity):
            outs.extend(model(*xs[start:start + n]))
            start += n
        return tuple(outs)


class Case:
    """Generated models captured as one graph, with eager and float64 reference outputs.

    Several specs share one capture and one build (both have a large fixed cost); their
    outputs are told apart again when comparing, so a failure names its seed.
    """

    def __init__(self, specs: "GraphSpec | Sequence[GraphSpec]"):
        self.specs = [specs] if isinstance(specs, GraphSpec) else list(specs)
        self.model = _Batch(self.specs).eval()
        self.inputs = tuple(x for spec in self.specs for x in spec.example_inputs())
        with torch.no_grad():
            self.eager = _as_tuple(self.model(*self.inputs))
        self.slices, start = [], 0
        for spec in self.specs:
            self.slices.append(slice(start, start + len(spec.outputs)))
            start += len(spec.outputs)
        self._truth: tuple[torch.Tensor, ...] | None = None
        self._reference: tuple[torch.Tensor, ...] | None = None  # the captured graph's outputs
        self.graph = None

    @property
    def spec(self) -> GraphSpec:
        return self.specs[0]

    @property
    def truth(self) -> tuple[torch.Tensor, ...]:
        """The models run in float64: the judge when fp32 results differ."""
        if self._truth is None:
            m64 = copy.deepcopy(self.model).double()
            with torch.no_grad():
                self._truth = _as_tuple(m64(*[x.double() for x in self.inputs]))
        return self._truth

    def calibration_data(self) -> list[tuple[torch.Tensor, ...]]:
        g = torch.Generator().manual_seed(self.spec.seed + 7)
        return [tuple(torch.randn(x.shape, generator=g) for x in self.inputs) for _ in range(4)]

    def _per_spec(self, expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor], tolerance: str,
                  truth: Sequence[torch.Tensor] | None, **options: float) -> list[Comparison]:
        if len(expected) != len(actual):
            return [Comparison(False, math.inf, f"{len(actual)} outputs, expected {len(expected)}")] * len(self.specs)
        return [compare(expected[s], actual[s], tolerance, truth[s] if truth is not None else None, **options)
                for s in self.slices]

    def _capture(self):
        import graphopt

        if self.graph is None:
            self.graph = graphopt.capture(self.model, self.inputs, name=f"fuzz{self.spec.seed}")
        return self.graph

    def run_stage(self, stage: Stage) -> list[Comparison]:
        """Run one stage; one Comparison per spec. Exceptions propagate (crashes)."""
        import graphopt
        from graphopt.pipeline import Pipeline

        if stage.kind == "capture":
            graph = self._capture()
            return self._per_spec(self.eager, graph(*self.inputs), stage.tolerance, self.truth)
        graph = self._capture().copy()
        graph.annotations["calibration_data"] = self.calibration_data()
        if stage.kind in ("pass", "pipeline"):
            if self._reference is None:
                self._reference = self.graph(*self.inputs)
            reference = self._reference
            out = Pipeline.parse(stage.text).run(graph)
            out.check()
            truth = self.truth if stage.tolerance in ("algebraic", "half") else None
            # int8 on random weights promises no accuracy (an output that is a small sum of
            # large terms has a low SQNR however well each term is quantized): a quantize pass
            # is fuzzed for shapes, dtypes and NaN/inf; SQNR is held on the reference models
            return self._per_spec(reference, out(*self.inputs), stage.tolerance, truth, min_sqnr_db=-math.inf)
        if stage.kind == "build":
            module = graphopt.compile(graph, stage.target, pipeline=stage.text,
                                      calibration_data=graph.annotations["calibration_data"])
            from graphopt.fuzz.emulated import is_cross_built, run_emulated

            actual = run_emulated(module, self.inputs) if is_cross_built(module) else _as_tuple(module(*self.inputs))
            if stage.tolerance in ("int8", "lossy"):  # judge the backend against the optimized graph
                expected = module.graph(*self.inputs)
                results = self._per_spec(expected, actual, "algebraic", _float64_run(module.graph, self.inputs))
                if "int8" in (p.tolerance for p in Pipeline.parse(stage.text).passes):
                    # integer kernels may round differently from PyTorch's: SQNR, per spec
                    results = [r if r.ok else compare(expected[s], actual[s], "int8")
                               for r, s in zip(results, self.slices)]
                return results
            return self._per_spec(self.eager, actual, stage.tolerance, self.truth)
        raise ValueError(f"unknown stage kind {stage.kind!r}")

    def check(self, stages: Sequence[Stage]) -> list[Failure]:
        failures = []
        for stage in stages:
            try:
                results = self.run_stage(stage)
            except Exception as e:  # any exception on a valid model is a bug to report
                if len(self.specs) > 1:  # find which model(s) of the batch it was
                    if stage.kind == "capture":
                        return [f for spec in self.specs for f in Case(spec).check(stages)]
                    failures.extend(f for spec in self.specs for f in Case(spec).check([stage]))
                    continue
                failures.append(Failure(self.spec.seed, stage.name, "crash", _describe(e), self.spec))
                if stage.kind == "capture":
                    break
                continue
            for spec, result in zip(self.specs, results):
                if not result.ok:
                    failures.append(Failure(spec.seed, stage.name, "mismatch", result.message, spec))
        return failures


def _float64_run(graph, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
    """``graph`` run in float64 (the fallback judge), or None when it cannot run so."""
    out = float64_run(graph.gm, inputs)
    return None if out is None else _as_tuple(out)


def _describe(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1]
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first} (raised at {where.filename}:{where.lineno})"


def check_spec(spec: "GraphSpec | Sequence[GraphSpec]", stages: Sequence[Stage]) -> list[Failure]:
    """Failures of ``spec`` (or of several, batched) in ``stages``; capture always runs first."""
    if not any(s.kind == "capture" for s in stages):
        stages = [Stage("capture", tolerance="algebraic"), *stages]
    try:
        case = Case(spec)
    except Exception as e:  # a generator bug: the model does not even run eagerly
        specs = [spec] if isinstance(spec, GraphSpec) else list(spec)
        return [Failure(s.seed, "eager", "crash", _describe(e), s) for s in specs]
    return case.check(stages)


def stage_named(name: str) -> Stage:
    """The Stage a name like ``pass:cse``, ``pipeline:fold`` or ``build:x86[fold]`` stands for."""
    if name == "capture":
        return Stage("capture", tolerance="algebraic")
    kind, _, rest = name.partition(":")
    if kind == "build":
        target, _, text = rest.partition("[")
        text = text.rstrip("]") or "none"
        return Stage("build", text, loosest(["algebraic", pipeline_tolerance(text)]), target)
    if kind in ("pass", "pipeline"):
        ratio_zero = "ratio=0" in rest and "ratio=0." not in rest.replace("ratio=0.0", "")
        return Stage(kind, rest, "exact" if ratio_zero else pipeline_tolerance(rest))
    raise ValueError(f"unknown fuzz stage {name!r}: expected capture, pass:NAME, pipeline:TEXT or build:TARGET[TEXT]")


def reproducer(failure: Failure) -> str:
    """Text to paste into an issue or a regression test: the seed, the error, the model."""
    spec = failure.minimized or failure.spec
    title = "minimized" if failure.minimized is not None else "not minimized"
    stage = failure.stage
    return (f"=== fuzz failure: seed {failure.seed}, stage {stage}, {failure.kind} ===\n"
            f"{failure.message}\n"
            f"--- model ({title}: {len(spec.ops)} of {len(failure.spec.ops)} ops) ---\n"
            f"{spec.describe()}\n"
            f"--- reproduce: python -m graphopt.fuzz --seed {failure.seed} --graphs 1, or ---\n"
            f"from graphopt.fuzz import GraphSpec, Op, check_spec, stage_named\n"
            f"spec = {spec!r}\n"
            f"print(check_spec(spec, [stage_named({stage!r})]))\n")
