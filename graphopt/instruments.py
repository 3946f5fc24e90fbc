"""Built-in pass instruments: timing, IR dumps, numerical verification.

Instruments observe the pass manager (``before_pass``/``after_pass``/``on_failure``); none
of them changes the graph. They are what ``graphopt compile --dump-ir DIR --verify`` and
``graphopt.optimize(..., verify=True)`` switch on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from graphopt.errors import VerificationError
from graphopt.graph import Graph
from graphopt.passes_base import TOLERANCES, GraphPass, PassResult
from graphopt.pipeline import Instrument, Pipeline


class TimingInstrument(Instrument):
    """Wall time of every pass; ``table()`` renders them as markdown."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, bool]] = []

    def after_pass(self, index, p, graph, result, seconds):
        self.rows.append((str(p), seconds, result.changed))

    def table(self) -> str:
        total = sum(s for _, s, _ in self.rows) or 1e-12
        lines = ["| # | pass | ms | % | changed |", "|---|---|---|---|---|"]
        for i, (name, s, changed) in enumerate(self.rows):
            lines.append(f"| {i} | {name} | {s * 1e3:.2f} | {100 * s / total:.1f} | {'yes' if changed else 'no'} |")
        return "\n".join(lines)


class IRDumpInstrument(Instrument):
    """Numbered IR text files: ``000_input.txt``, then ``NNN_<pass>.txt`` after each pass
    that changed the graph (unchanged passes write nothing, so the folder reads as a diff
    history), and ``NNN_<pass>.FAILED.txt`` holding the graph a pass failed on."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def _write(self, name: str, graph: Graph, header: str) -> None:
        with open(os.path.join(self.folder, name), "w") as f:
            f.write(header + "\n" + str(graph) + "\n")

    def before_pipeline(self, pipeline, graph):
        self._write("000_input.txt", graph, f"// pipeline: {pipeline}\n// before any pass")

    def after_pass(self, index, p, graph, result, seconds):
        if result.changed:
            stats = ", ".join(f"{k}={v}" for k, v in result.stats.items())
            self._write(f"{index + 1:03d}_{p.name}.txt", graph, f"// after {p}  ({seconds * 1e3:.1f} ms) {stats}")

    def on_failure(self, index, p, graph, error):
        self._write(f"{index + 1:03d}_{p.name}.FAILED.txt", graph, f"// {p} failed: {error}")


@dataclass
class VerifyRecord:
    pass_text: str
    step_error: float  # max abs difference vs the graph before this pass
    total_error: float  # max abs difference vs the original graph
    tolerance: str


@dataclass
class VerifyInstrument(Instrument):
    """Run the graph on the example inputs after every pass.

    Each pass is held to its own rung of the tolerance ladder against the graph *before*
    it (exact passes must be bit-identical); the error against the original graph is
    recorded too. Raises VerificationError naming the pass that left tolerance.
    """

    inputs: tuple[torch.Tensor, ...] | None = None
    records: list[VerifyRecord] = field(default_factory=list)
    _original: tuple[torch.Tensor, ...] | None = None
    _previous: tuple[torch.Tensor, ...] | None = None

    def before_pipeline(self, pipeline: Pipeline, graph: Graph) -> None:
        if self.inputs is None:
            self.inputs = graph.example_inputs
        self._original = self._previous = graph(*self.inputs)

    def after_pass(self, index: int, p: GraphPass, graph: Graph, result: PassResult, seconds: float) -> None:
        outputs = graph(*self.inputs)
        step = max_error(self._previous, outputs)
        total = max_error(self._original, outputs)
        self.records.append(VerifyRecord(str(p), step, total, p.tolerance))
        if result.changed:
            check_close(self._previous, outputs, p.tolerance, what=f"after pass {str(p)!r}")
        self._previous = outputs

    def table(self) -> str:
        lines = ["| pass | tolerance | max err vs previous | max err vs original |", "|---|---|---|---|"]
        for r in self.records:
            lines.append(f"| {r.pass_text} | {r.tolerance} | {r.step_error:.3g} | {r.total_error:.3g} |")
        return "\n".join(lines)


def max_error(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return math.inf
        if x.numel():
            worst = max(worst, (x.double() - y.double()).abs().nan_to_num(posinf=math.inf).max().item())
    return worst


def check_close(expected: tuple[torch.Tensor, ...], actual: tuple[torch.Tensor, ...], tolerance: str,
                what: str) -> None:
    """Raise VerificationError unless ``actual`` is within the named tolerance of ``expected``."""
    rtol, atol = TOLERANCES[tolerance]
    if math.isinf(rtol):
        return
    if len(expected) != len(actual):
        raise VerificationError(f"{what}: {len(actual)} outputs, expected {len(expected)}")
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e.shape != a.shape or e.dtype != a.dtype:
            raise VerificationError(f"{what}: output {i} is {a.dtype}{list(a.shape)}, "
                                    f"expected {e.dtype}{list(e.shape)}")
        if tolerance == "exact":
            same_nans = torch.equal(e.isnan(), a.isnan())
            if not (same_nans and torch.equal(e.nan_to_num(nan=0.0), a.nan_to_num(nan=0.0))):
                raise VerificationError(f"{what}: output {i} is not bit-identical "
                                        f"(max abs error {max_error((e,), (a,)):.3g}); exact passes must not change values")
            continue
        if not torch.allclose(a.double(), e.double(), rtol=rtol, atol=atol, equal_nan=True):
            err = max_error((e,), (a,))
            raise VerificationError(f"{what}: output {i} max abs error {err:.3g} exceeds "
                                    f"atol={atol:g} + rtol={rtol:g}")
