"""Built-in pass instruments: timing, IR dumps, numerical verification.

Instruments observe the pass manager (``before_pass``/``after_pass``/``on_failure``); none
of them changes the graph. They are what ``graphopt compile --dump-ir DIR --verify`` and
``graphopt.optimize(..., verify=True)`` switch on.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

import torch

from graphopt.compare import compare, float64_run, max_abs
from graphopt.errors import VerificationError
from graphopt.graph import Graph
from graphopt.passes_base import GraphPass, PassResult
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

    Each pass that changed the graph is held to its own rung of the tolerance ladder
    (graphopt.compare) against the graph *before* it: the same structure, shapes and dtypes
    always; exact passes bit-identical; algebraic and half ones within the rung, judged by
    the graph before the pass run in float64 when fp32 rounding differs; int8 passes within
    the int8 SQNR and no new NaN/inf; lossy ones (pruning) no new NaN/inf. The error against
    the original graph is recorded too. Raises VerificationError naming the pass that left
    tolerance.
    """

    inputs: tuple[torch.Tensor, ...] | None = None
    records: list[VerifyRecord] = field(default_factory=list)
    _original: tuple[torch.Tensor, ...] | None = None
    _previous: tuple[torch.Tensor, ...] | None = None
    _before: torch.nn.Module | None = None  # the graph before an algebraic/half pass, for float64

    def before_pipeline(self, pipeline: Pipeline, graph: Graph) -> None:
        if self.inputs is None:
            self.inputs = graph.example_inputs
        self._original = self._previous = graph(*self.inputs)

    def before_pass(self, index: int, p: GraphPass, graph: Graph) -> None:
        # Passes rewrite the graph in place: keep what the float64 judge needs to run.
        self._before = copy.deepcopy(graph.gm) if p.rung() in ("algebraic", "half") else None

    def after_pass(self, index: int, p: GraphPass, graph: Graph, result: PassResult, seconds: float) -> None:
        outputs = graph(*self.inputs)
        step, total = _max_error(self._previous, outputs), _max_error(self._original, outputs)
        self.records.append(VerifyRecord(str(p), step, total, p.rung()))
        before, self._before = self._before, None
        if result.changed:
            truth = (lambda: _graph_outputs(float64_run(before, self.inputs))) if before is not None else None
            verdict = compare(self._previous, outputs, p.rung(), truth)
            if not verdict.ok:
                raise VerificationError(f"after pass {str(p)!r} ({p.rung()} rung): {verdict.message}")
        self._previous = outputs

    def table(self) -> str:
        lines = ["| pass | tolerance | max err vs previous | max err vs original |", "|---|---|---|---|"]
        for r in self.records:
            lines.append(f"| {r.pass_text} | {r.tolerance} | {r.step_error:.3g} | {r.total_error:.3g} |")
        return "\n".join(lines)


def _graph_outputs(out: object) -> tuple[torch.Tensor, ...] | None:
    """A GraphModule's result in the form Graph.__call__ gives it: always a tuple."""
    if out is None:
        return None
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _max_error(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    """Worst max-abs difference over the outputs; inf when the outputs do not line up."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return math.inf
    return max((max_abs(x, y) for x, y in zip(a, b)), default=0.0)
