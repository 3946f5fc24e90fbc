"""``fuse``: decide the fusion groups on the graph; every backend runs each group as one kernel.

The pass does not rewrite ops: it *records* its decisions as ``node.meta["fusion_group"]``
(an int per member) and ``graph.annotations["fusion"]`` (per group: pattern, members,
intermediate bytes saved), so the IR dump, ``summary()`` and the ``inspect`` picture show
every group, and the TVM backend (targets/frontend/lower.py) emits each group as one primitive
function, i.e. one kernel. A graph with groups builds with fusion mode ``"graph"``: TVM's
own FuseOps is off, our groups are the only fusion.

Engine (style: named patterns run by one small engine, counted in the stats): for each
enabled pattern in the order ``attention, epilogue, reduction, elementwise`` (the order
in which a node is most valuable: an attention block beats an epilogue of the projection
before it), every ungrouped node the pattern seeds on starts a group, which the pattern
grows through :class:`~graphopt.passes.fusion.groups.Grouping`. Growth is legal only when
(networkx on the graph's own view) the group keeps one output — a value used outside the
group never fuses — and contracting it creates no cycle. Groups that end with fewer than
two computing ops fuse nothing and are dissolved. Ops whose value depends on no graph input
join no group: the backend computes them while it builds. See passes/fusion/ for the op kinds,
the invariants and the patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphopt.graph import Graph
from graphopt.fusion_groups import compile_time_nodes, node_groups
from graphopt.passes.fusion.groups import Grouping
from graphopt.op_kinds import is_compute
from graphopt.passes.fusion.patterns import PATTERNS
from graphopt.passes_base import GraphPass, PassResult, option, register_pass

PATTERN_NAMES = tuple(PATTERNS)


@register_pass
@dataclass(frozen=True)
class Fuse(GraphPass):
    """Form fusion groups (anchor+epilogue, elementwise chains, reductions, attention); one kernel each."""

    name: ClassVar[str] = "fuse"
    tolerance: ClassVar[str] = "exact"  # the graph's computation is untouched; only meta changes

    patterns: tuple[str, ...] = option(PATTERN_NAMES, "which fusion patterns to apply, in this order",
                                       choices=PATTERN_NAMES)
    max_group_size: int = option(16, "most computing ops (views not counted) in one group", range=(2, 1024, "[]"))

    def run(self, graph: Graph) -> PassResult:
        had_groups = bool(node_groups(graph))
        for n in graph.nodes:  # decide afresh: an earlier fuse may predate later rewrites
            n.meta.pop("fusion_group", None)
        grouping = Grouping(graph, self.max_group_size)
        stats: dict[str, int] = {f"pattern.{p}": 0 for p in self.patterns}
        for pattern_name in sorted(self.patterns, key=PATTERN_NAMES.index):
            pattern = PATTERNS[pattern_name]
            for node in list(graph.call_nodes()):
                if grouping.grouped(node) or not grouping.groupable(node) or not pattern.seed(node):
                    continue
                gid = grouping.new_group(pattern.name, node)
                pattern.grow(grouping, gid)
                if grouping.groups[gid].compute_size() < 2:
                    grouping.dissolve(gid)
                    continue
                stats[f"pattern.{pattern.name}"] += 1

        order = {n: i for i, n in enumerate(graph.nodes)}
        kept = sorted(grouping.groups.values(), key=lambda g: order[g.output()])
        record = {}
        for new_gid, group in enumerate(kept):  # number groups in graph order, from 0
            members = sorted(group.members, key=order.__getitem__)
            for m in members:
                m.meta["fusion_group"] = new_gid
            record[new_gid] = {"pattern": group.pattern, "nodes": [m.name for m in members],
                               "output": group.output().name, "bytes_saved": group.bytes_saved()}
        graph.annotations["fusion"] = record
        stats["groups"] = len(kept)
        stats["fused_ops"] = sum(g.compute_size() for g in kept)
        stats["kernels"] = expected_kernels(graph)
        stats["bytes_saved"] = sum(r["bytes_saved"] for r in record.values())
        return PassResult(bool(kept) or had_groups, stats)


def expected_kernels(graph: Graph) -> int:
    """Kernels the graph says a backend runs: one per group plus one per ungrouped computing op
    (ops on constants only are computed while the backend builds: no kernel)."""
    groups = node_groups(graph)
    compile_time = compile_time_nodes(graph)
    loose = sum(1 for n in graph.call_nodes()
                if "fusion_group" not in n.meta and is_compute(n) and n not in compile_time)
    return len(groups) + loose
