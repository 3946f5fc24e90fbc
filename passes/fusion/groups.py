"""Fusion groups under construction: the engine that grows groups and keeps each legal.

What a group is, its invariants and their final check live with the graph
(graphopt/fusion_groups.py); :class:`Grouping` enforces the same invariants while the
patterns (patterns.py) grow groups, so a pattern only says what it would like to fuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from graphopt.fusion_groups import compile_time_nodes
from graphopt.op_kinds import is_compute, kind


def out_bytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return 0
    try:
        return int(val.numel()) * val.element_size()
    except (TypeError, RuntimeError):  # symbolic batch: size unknown at compile time
        return 0


@dataclass
class Group:
    gid: int
    pattern: str
    members: set[fx.Node] = field(default_factory=set)

    def output(self) -> fx.Node:
        escaping = [m for m in self.members if any(u not in self.members for u in m.users)]
        return escaping[0]

    def compute_size(self) -> int:
        return sum(1 for m in self.members if is_compute(m))

    def bytes_saved(self) -> int:
        """Bytes of the intermediates that no longer go through memory (views move none)."""
        out = self.output()
        return sum(out_bytes(m) for m in self.members if m is not out and is_compute(m))


class Grouping:
    """The groups of one graph being grown by the patterns; every change is checked."""

    def __init__(self, graph, max_group_size: int):
        self.max_group_size = max_group_size
        self.compile_time = compile_time_nodes(graph)
        self.groups: dict[int, Group] = {}
        self.group_of: dict[fx.Node, int] = {}
        self._next_gid = 0  # never reused: a dissolved group's id must not name a new one
        # The condensed DAG: vertex = node name, or ("group", gid) for exactly the current
        # members of group gid (a node leaving a group gets its own vertex back).
        self.dag: nx.DiGraph = graph.to_networkx()
        self.vertex: dict[fx.Node, object] = {n: n.name for n in graph.nodes if n.op != "get_attr"}

    # ---------------------------------------------------------------- queries
    def grouped(self, node: fx.Node) -> bool:
        return node in self.group_of

    def groupable(self, node: fx.Node) -> bool:
        """Whether ``node`` may be in a group at all: an op run at run time (invariant 4)."""
        return node.op == "call_function" and kind(node) != "opaque" and node not in self.compile_time

    def _creates_cycle(self, gid: int, node: fx.Node) -> bool:
        """Would merging ``node`` into group ``gid`` make the contracted graph cyclic?

        Merging two vertices of a DAG creates a cycle exactly when a path of length >= 2
        connects them (through some third vertex), in either direction.
        """
        g, n = ("group", gid), self.vertex[node]
        for a, b in ((g, n), (n, g)):
            direct = self.dag.has_edge(a, b)
            if direct:
                attrs = self.dag.edges[a, b]
                self.dag.remove_edge(a, b)
            try:
                if nx.has_path(self.dag, a, b):
                    return True
            finally:
                if direct:
                    self.dag.add_edge(a, b, **attrs)
        return False

    def can_add(self, gid: int, node: fx.Node) -> bool:
        """Whether ``node`` may join group ``gid`` keeping invariants 1 and 2 (see module doc)."""
        if self.grouped(node) or not self.groupable(node):
            return False
        group = self.groups[gid]
        if is_compute(node) and group.compute_size() >= self.max_group_size:
            return False
        members = group.members | {node}
        escaping = [m for m in members if any(u not in members for u in m.users)]
        if len(escaping) != 1:
            return False
        return not self._creates_cycle(gid, node)

    # --------------------------------------------------------------- changes
    def new_group(self, pattern: str, seed: fx.Node) -> int:
        gid = self._next_gid
        self._next_gid += 1
        self.groups[gid] = Group(gid, pattern, {seed})
        self.group_of[seed] = gid
        v = self.vertex[seed]
        nx.relabel_nodes(self.dag, {v: ("group", gid)}, copy=False)
        self.vertex[seed] = ("group", gid)
        return gid

    def add(self, gid: int, node: fx.Node) -> None:
        g, n = ("group", gid), self.vertex[node]
        nx.contracted_nodes(self.dag, g, n, self_loops=False, copy=False)
        self.vertex[node] = g
        self.groups[gid].members.add(node)
        self.group_of[node] = gid

    def dissolve(self, gid: int) -> None:
        """Forget a group; its members become free nodes again (own DAG vertices)."""
        members = self.groups.pop(gid).members
        for m in members:
            del self.group_of[m]
        self._split_off(gid, members, remaining=set())

    def remove_member(self, gid: int, node: fx.Node) -> None:
        """Drop a trailing member (a view at the output end; it stays free outside the group)."""
        self.groups[gid].members.discard(node)
        del self.group_of[node]
        self._split_off(gid, {node}, remaining=self.groups[gid].members)

    def _split_off(self, gid: int, leaving: set[fx.Node], remaining: set[fx.Node]) -> None:
        """Undo the contraction of ``leaving`` into ``("group", gid)``.

        Leaving a node inside the group's vertex would be conservative for the cycle
        check, but it breaks the vertex map: once that node joins or seeds another group,
        contracting or relabelling its vertex swallows (and so deletes) the old group's
        vertex. So the departed nodes get their own vertices and the edges of everything
        touched are re-derived from the fx graph.
        """
        g = ("group", gid)
        for n in leaving:
            self.vertex[n] = n.name
        if remaining:
            self.dag.remove_edges_from(list(self.dag.in_edges(g)) + list(self.dag.out_edges(g)))
        else:
            self.dag.remove_node(g)
        self.dag.add_nodes_from(n.name for n in leaving)
        for m in (*remaining, *leaving):
            v = self.vertex[m]
            self.dag.add_edges_from((self.vertex[p], v) for p in m.all_input_nodes
                                    if p in self.vertex and self.vertex[p] != v)
            self.dag.add_edges_from((v, self.vertex[u]) for u in m.users
                                    if u in self.vertex and self.vertex[u] != v)
