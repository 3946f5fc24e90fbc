"""``prune``: structured pruning of channels, neurons and attention heads.

    prune{ratio=0.5,criterion=l1,scope=local,steps=1,round_to=8,exclude=[fc,layer4]}

One step = analyse dependencies (dependency.py), score units (importance.py), choose the
units to remove, cut them out (surgery.py). ``steps=k`` repeats this k times, removing a
growing share each time (the kept fraction after step i is ``1 - ratio * i / k``) and
re-scoring the already-shrunk graph in between: greedy iterative pruning.

Choosing: ``scope=local`` removes ``floor(ratio * n)`` of the ``n`` units of every group;
``scope=global`` ranks all units together by their score divided by their group's mean
score (so layers of different scale compete fairly) and removes ``ratio`` of all units.
Both keep at least one unit per group, and ``round_to=r`` rounds each group's kept count
up to a multiple of r (SIMD-friendly widths). A step never empties a tensor.

``ratio=0`` leaves the graph untouched. The graph's outputs are never pruned; layers
named in ``exclude`` (dotted names or prefixes) keep all their weights.

Channels the analysis cannot prune safely (they reach an output, an op it does not model,
a reshape mixing them with other axes, a constant one op would slice two ways) are kept
whole rather than failing the pass. The pass records a per-group table in
``graph.annotations["prune_report"]`` (group, layers, channels before/after, pruned or
kept and why), logs it, and counts pruned and kept groups in its stats.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from graphopt.errors import PassOptionError
from graphopt.graph import Graph
from graphopt.passes_base import GraphPass, PassResult, option, register_pass
from graphopt.passes.prune.dependency import ChannelDependencyGraph
from graphopt.passes.prune.importance import CRITERIA, taylor_gradients, unit_scores
from graphopt.passes.prune.surgery import apply_pruning, resolve_shared_constants

log = logging.getLogger(__name__)


@register_pass
@dataclass(frozen=True)
class Prune(GraphPass):
    """Remove whole channels, neurons and attention heads: the tensors really shrink."""

    name: ClassVar[str] = "prune"
    tolerance: ClassVar[str] = "lossy"

    ratio: float = option(0.3, "fraction of the prunable units of each group to remove", range=(0.0, 1.0, "[)"))
    criterion: str = option("l1", "unit importance", choices=CRITERIA)
    scope: str = option("local", "rank units per group or across the whole model", choices=("local", "global"))
    steps: int = option(1, "iterative pruning in this many greedy steps", range=(1, 100, "[]"))
    round_to: int = option(1, "keep a multiple of this many units per group", range=(1, 4096, "[]"))
    exclude: tuple[str, ...] = option((), "layer names (or name prefixes) never to prune")

    def run(self, graph: Graph) -> PassResult:
        if self.ratio == 0:
            return PassResult(False, {"pruned_units": 0})
        data = graph.annotations.get("calibration_data")
        if self.criterion == "taylor" and data is None:
            raise PassOptionError("prune: criterion=taylor needs calibration batches; pass "
                                  "calibration_data=... to graphopt.optimize/compile")
        params_before = _params(graph)
        total_pruned, records, report = 0, [], []
        for step in range(1, self.steps + 1):
            kept_before = 1 - self.ratio * (step - 1) / self.steps
            step_ratio = 1 - (1 - self.ratio * step / self.steps) / kept_before
            dep = ChannelDependencyGraph(graph, self.exclude)
            resolve_shared_constants(graph, dep)
            grads = taylor_gradients(graph, data) if self.criterion == "taylor" else None
            scores = unit_scores(graph, dep, self.criterion, grads)
            pruned = self.choose(dep, scores, step_ratio)
            _never_empty(dep, scores, pruned)
            n = int(pruned.sum())
            if n:
                apply_pruning(graph, dep, pruned)
                if step < self.steps:  # the next analysis runs the graph; the pass manager
                    graph.recompile()  # re-derives meta after the last step
            total_pruned += n
            records.append({"step": step, "groups": len(dep.groups), "pruned_units": n,
                            "unknown_ops": dict(dep.unknown_ops)})
            report = group_report(dep, pruned) if step == 1 else _advance(report, group_report(dep, pruned))
        graph.annotations.setdefault("prune", []).extend(records)
        graph.annotations["prune_report"] = report
        log.info("prune{ratio=%s}:\n%s", self.ratio, format_report(report))
        stats = {"pruned_units": total_pruned, "groups": records[0]["groups"],
                 "groups_pruned": sum(r["status"] == "pruned" for r in report),
                 "groups_kept": sum(r["status"] == "kept" for r in report),
                 "params_before": params_before, "params_after": _params(graph)}
        return PassResult(total_pruned > 0, stats)

    # ------------------------------------------------------------ choosing
    def _keep_count(self, n: int, n_prune: int) -> int:
        keep = n - n_prune
        if self.round_to > 1:
            keep = math.ceil(keep / self.round_to) * self.round_to
        return max(1, min(n, keep))

    def choose(self, dep: ChannelDependencyGraph, scores: torch.Tensor, ratio: float) -> torch.Tensor:
        """Bool mask over unit roots: True = prune."""
        pruned = torch.zeros(len(dep.root_of), dtype=torch.bool)
        if self.scope == "local":
            for group in dep.groups:
                units = torch.tensor(group.units)
                keep = self._keep_count(len(units), math.floor(len(units) * ratio + 1e-9))
                order = torch.argsort(scores[units], stable=True)
                pruned[units[order[:len(units) - keep]]] = True
            return pruned
        candidates = []
        for group in dep.groups:
            units = torch.tensor(group.units)
            s = scores[units]
            normalized = s / s.mean().clamp_min(1e-12)
            candidates += [(float(v), int(u), group.index) for v, u in zip(normalized, units)]
        budget = math.floor(sum(len(g.units) for g in dep.groups) * ratio + 1e-9)
        left = {g.index: len(g.units) for g in dep.groups}
        for _, unit, gi in sorted(candidates):
            if budget == 0:
                break
            if left[gi] > 1:
                pruned[unit] = True
                left[gi] -= 1
                budget -= 1
        for group in dep.groups:  # round kept counts up, giving back the best pruned units
            units = torch.tensor(group.units)
            n_pruned = int(pruned[units].sum())
            give_back = self._keep_count(len(units), n_pruned) - (len(units) - n_pruned)
            if give_back > 0:
                cut = units[pruned[units]]
                pruned[cut[torch.argsort(scores[cut], descending=True)[:give_back]]] = False
        return pruned


def _never_empty(dep: ChannelDependencyGraph, scores: torch.Tensor, pruned: torch.Tensor) -> None:
    """Un-prune the best unit of any tensor axis that would lose every slice."""
    for _, labels in dep.tensors():
        for axis, kept in enumerate(dep.kept_along(labels, pruned)):
            if kept is not None and not bool(kept.any()):
                t = dep.root_of[labels]
                units = torch.unique(t.movedim(axis, 0).reshape(t.shape[axis], -1)[:, 0])
                pruned[units[torch.argmax(scores[units])]] = False


def _params(graph: Graph) -> int:
    return sum(int(t.numel()) for t in graph.constants().values())



def group_report(dep: ChannelDependencyGraph, pruned: torch.Tensor) -> list[dict]:
    """One row per channel group: the prunable groups, then those kept whole and why."""
    rows = []
    for group in dep.groups:
        after = sum(c for u, c in zip(group.units, group.unit_channels) if not bool(pruned[u]))
        rows.append({"group": len(rows), "layers": group.layers, "channels_before": group.channels,
                     "channels_after": after, "status": "pruned" if after < group.channels else "kept",
                     "reason": "" if after < group.channels else "too few units to remove at this ratio"})
    for frozen in dep.frozen_groups:
        rows.append({"group": len(rows), "layers": frozen.layers, "channels_before": frozen.channels,
                     "channels_after": frozen.channels, "status": "kept", "reason": "; ".join(frozen.reasons)})
    return rows


def _advance(first: list[dict], later: list[dict]) -> list[dict]:
    """Iterative pruning: the first step's table with the channel counts after a later step."""
    after = {tuple(r["layers"]): r["channels_after"] for r in later}
    for r in first:
        if tuple(r["layers"]) in after:
            r["channels_after"] = after[tuple(r["layers"])]
    return first


def format_report(report: list[dict], width: int = 60) -> str:
    lines = [f"{'group':>5}  {'channels':>11}  {'status':<6}  layers / why kept"]
    for r in report:
        layers = ", ".join(r["layers"])
        layers = layers if len(layers) <= width else layers[:width - 3] + "..."
        why = f"  ({r['reason']})" if r["reason"] else ""
        lines.append(f"{r['group']:>5}  {r['channels_before']:>5}->{r['channels_after']:<5}  {r['status']:<6}  "
                     f"{layers}{why}")
    return "\n".join(lines)
