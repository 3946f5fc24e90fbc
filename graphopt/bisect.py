"""``graphopt.bisect``: which pass broke my model's numbers, and at which node?

The pipeline is run one pass at a time (composite passes such as ``fold`` are expanded
into their parts first, so the answer names ``fold-bn``, not ``fold``). After every pass
the graph runs on the inputs and is compared with the graph before the pass, on that
pass's rung of the tolerance ladder (docs/TOLERANCES.md): exact passes must be
bit-identical, algebraic ones within rtol 1e-4 / atol 1e-5 with the float64 fallback.
The first pass that leaves its tolerance — or raises — is the culprit. ``int8`` passes
are held to the int8 SQNR against the graph before them; ``lossy`` ones (pruning) change
numbers on purpose and are blamed only for a changed shape or dtype or a new NaN/inf.
Every check is :func:`graphopt.compare.compare`.

To find the node, both graphs (before and after the culprit) are run with every
intermediate value recorded; nodes are matched by name (passes keep the names of nodes
they leave alone). The first node of the *after* graph, in topological order, whose value
differs beyond tolerance from its namesake is where the error appears; the nodes the pass
created on its way there (no namesake) are listed as ``introduced``.

With ``target=`` the optimized graph is also built and compared, so a backend bug is
named as such (``build:x86``) when every pass is innocent.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt.compare import compare, leaves
from graphopt.graph import Graph
from graphopt.passes_base import GraphPass
from graphopt.pipeline import Pipeline

# Composite passes and the passes they run, in order (see passes/fold.py).
COMPOSITES: dict[str, str] = {"fold": "noop,fold-bn,fold-const,cse,dce"}


@dataclass
class BisectStep:
    pass_text: str
    tolerance: str
    step_error: float  # max abs difference vs the graph before this pass
    total_error: float  # max abs difference vs the original graph
    ok: bool
    message: str = ""


@dataclass
class BisectResult:
    """What :func:`bisect` found; ``str()`` renders the table and the verdict."""

    pipeline: str  # the expanded pipeline that was run
    steps: list[BisectStep] = field(default_factory=list)
    culprit: str | None = None  # pass text (or "build:TARGET") that left tolerance first
    culprit_index: int | None = None
    node: str | None = None  # first node (topological order) where the error appears
    node_op: str | None = None
    node_error: float | None = None
    introduced: list[str] = field(default_factory=list)
    message: str = ""

    @property
    def found(self) -> bool:
        return self.culprit is not None

    def __str__(self) -> str:
        lines = [f"bisect of pipeline '{self.pipeline}'",
                 "| # | pass | tolerance | max err vs previous | max err vs original | verdict |",
                 "|---|---|---|---|---|---|"]
        for i, s in enumerate(self.steps):
            lines.append(f"| {i} | {s.pass_text} | {s.tolerance} | {s.step_error:.3g} | {s.total_error:.3g} | "
                         f"{'ok' if s.ok else 'FAILED'} |")
        if not self.found:
            lines.append("every pass stayed within its tolerance")
            return "\n".join(lines)
        lines.append(f"first failing pass: {self.culprit} ({self.message})")
        if self.node:
            lines.append(f"error appears at node {self.node!r} ({self.node_op}), max abs error {self.node_error:.3g}")
        if self.introduced:
            lines.append(f"nodes the pass introduced on the way: {', '.join(self.introduced)}")
        return "\n".join(lines)


def expand(pipeline: "str | Pipeline") -> Pipeline:
    """``pipeline`` with composite passes replaced by their parts (``fold`` -> noop,fold-bn,...)."""
    parts: list[GraphPass] = []
    for p in Pipeline.parse(pipeline).passes:
        inner = COMPOSITES.get(p.name)
        parts.extend(Pipeline.parse(inner).passes if inner and str(p) == p.name else (p,))
    return Pipeline(tuple(parts))


def _record(graph: Graph, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Every node's value (by node name) when ``graph`` runs on ``inputs``."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n.name] = out
            return out

    with torch.no_grad():
        Recorder(graph.gm).run(*inputs)
    return values


def _differs(a: Any, b: Any, tolerance: str) -> float | None:
    """Max abs error when tensors ``a`` and ``b`` differ beyond ``tolerance``, else None.

    Inside an int8 or pruned graph, intermediate values are judged on the algebraic rung:
    the first node that changed at all is where the pass's change starts."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    rung = tolerance if tolerance in ("exact", "algebraic", "half") else "algebraic"
    verdict = compare(a, b, rung)
    return None if verdict.ok else verdict.error


def _localize(before: Graph, after: Graph, inputs: tuple[torch.Tensor, ...], tolerance: str,
              result: BisectResult) -> None:
    ref, new = _record(before, inputs), _record(after, inputs)
    introduced: list[str] = []
    for node in after.nodes:
        if node.op != "call_function":
            continue
        if node.name not in ref:
            introduced.append(node.name)
            continue
        err = _differs(ref[node.name], new[node.name], tolerance)
        if err is not None:
            result.node, result.node_error = node.name, err
            result.node_op = str(node.target)
            ancestors = _ancestors(node)
            result.introduced = [n for n in introduced if n in ancestors]
            return
    # no namesake differs: the error is in new nodes feeding the outputs
    for out in after.output_values():
        if out.name in introduced:
            result.node, result.node_op = out.name, str(out.target)
            result.introduced = [n for n in introduced if n in _ancestors(out) | {out.name}]
            return


def _ancestors(node: fx.Node) -> set[str]:
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n.name not in seen:
            seen.add(n.name)
            stack.extend(n.all_input_nodes)
    return seen


def bisect(model: "torch.nn.Module | Graph", inputs: Any = None, pipeline: "str | Pipeline" = "default", *,
           target: Any = None, calibration_data: Any = None) -> BisectResult:
    """Run ``pipeline`` pass by pass over ``model`` and name the first pass (and node) that
    leaves tolerance. See the module docstring."""
    from graphopt.api import _as_graph
    from graphopt.capture import normalize_inputs

    graph = _as_graph(model, inputs, None)
    inputs = normalize_inputs(inputs) if inputs is not None else graph.example_inputs
    pipe = expand(pipeline)
    result = BisectResult(str(pipe))
    truth = None
    if isinstance(model, torch.nn.Module) and all(x.is_floating_point() for x in inputs):
        m64 = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            truth = tuple(leaves(m64(*[x.double() for x in inputs])))
    current = graph.copy()
    if calibration_data is not None:
        current.annotations["calibration_data"] = calibration_data
    original = previous = current(*inputs)
    for index, p in enumerate(pipe.passes):
        before = current.copy()
        try:
            current = Pipeline((p,)).run(current, copy=False)
            outputs = current(*inputs)
        except Exception as e:  # a crashing pass is as much a culprit as a wrong one
            result.steps.append(BisectStep(str(p), p.tolerance, math.inf, math.inf, False, f"raised {e}"))
            result.culprit, result.culprit_index = str(p), index
            result.message = f"raised {type(e).__name__}: {e}"
            return result
        verdict = compare(previous, outputs, p.tolerance, truth)
        total = compare(original, outputs, "exact").error
        result.steps.append(BisectStep(str(p), p.tolerance, verdict.error, total, verdict.ok, verdict.message))
        if not verdict.ok:
            result.culprit, result.culprit_index, result.message = str(p), index, verdict.message
            _localize(before, current, inputs, p.tolerance, result)
            return result
        previous = outputs
        if p.tolerance in ("int8", "lossy"):
            truth = None  # the float64 model no longer describes what the graph computes
    if target is not None:
        _check_build(current, previous, inputs, target, truth, result)
    return result


def _check_build(graph: Graph, expected: tuple[torch.Tensor, ...], inputs: tuple[torch.Tensor, ...], target: Any,
                 truth: tuple[torch.Tensor, ...] | None, result: BisectResult) -> None:
    import graphopt

    name = f"build:{target if isinstance(target, str) else 'custom'}"
    try:
        module = graphopt.compile(graph, target, pipeline="none")
        actual = tuple(leaves(module(*inputs)))
    except Exception as e:  # the backend raising is a finding too
        result.steps.append(BisectStep(name, "algebraic", math.inf, math.inf, False, f"raised {e}"))
        result.culprit, result.message = name, f"raised {type(e).__name__}: {e}"
        return
    c = compare(expected, actual, "algebraic", truth)
    result.steps.append(BisectStep(name, "algebraic", c.error, c.error, c.ok, c.message))
    if not c.ok:
        result.culprit, result.message = name, c.message
