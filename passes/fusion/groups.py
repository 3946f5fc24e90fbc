"""Fusion groups under construction, and the rules that keep every group legal.

A fusion group is a set of call nodes that the backend runs as ONE kernel. Invariants
(checked while growing and again by :func:`validate_groups` before lowering):

1. **One output.** Exactly one member (the group's output) has users outside the group;
   every other member's value lives only inside the kernel. "A value used outside the
   group" therefore never fuses.
2. **No cycle.** Contracting every group to one vertex leaves the graph a DAG: otherwise
   some kernel would need its own output as input (``a -> x -> b`` with ``a, b`` in the
   group and ``x`` outside). Checked on the networkx view with each group contracted.
3. **At least two ops that compute.** A "group" of one kernel op (plus views) fuses nothing
   and is dissolved.
4. **Only work done at run time.** An op whose value depends on no graph input (a mask
   built from ``arange`` and constants, as transformers build theirs) is computed once
   while the backend builds (TVM's FoldConstant): it is no kernel, joins no group, and
   is emitted inline (:func:`compile_time_nodes`). A kernel made of such ops would fold
   to a function that computes nothing, which TVM cannot turn into a PrimFunc.

The record lives on the graph: ``node.meta["fusion_group"] = gid`` for every member (the
printer, summary and picture show it), and ``graph.annotations["fusion"]`` keeps each
group's pattern and the intermediate bytes it saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from graphopt.errors import GraphInvariantError
from graphopt.op_kinds import is_compute, kind
from graphopt.passes.utils import is_pure


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


def compile_time_nodes(graph) -> set[fx.Node]:
    """The call nodes whose value depends on no graph input: pure ops on constants only
    (``get_attr``s, other such nodes, or nothing at all, like ``arange(16)``).

    The backend evaluates them while it builds, so they are never kernels (invariant 4).
    Random ops (``rand``) read no input either but give a new value every call: not these.
    """
    found: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "call_function" and is_pure(n) and all(
                a.op == "get_attr" or a in found for a in n.all_input_nodes):
            found.add(n)
    return found


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


def node_groups(graph) -> dict[int, list[fx.Node]]:
    """The groups recorded on ``graph`` (``meta["fusion_group"]``), members in graph order."""
    groups: dict[int, list[fx.Node]] = {}
    for n in graph.nodes:
        gid = n.meta.get("fusion_group")
        if gid is not None:
            groups.setdefault(gid, []).append(n)
    return groups


def validate_groups(graph) -> dict[int, list[fx.Node]]:
    """Check the recorded groups against the invariants; raise GraphInvariantError.

    Run before lowering: a pass after ``fuse`` may have changed the graph under a group.
    """
    groups = node_groups(graph)
    dag = graph.to_networkx()
    mapping = {}
    for gid, members in groups.items():
        names = {m.name for m in members}
        bad = [m.name for m in members if m.op != "call_function"]
        if bad:
            raise GraphInvariantError(f"fusion group {gid} contains non-op nodes {bad}")
        escaping = [m.name for m in members if any(u.name not in names for u in m.users)]
        if len(escaping) != 1:
            raise GraphInvariantError(
                f"fusion group {gid} has {len(escaping)} values used outside it ({escaping}); "
                "a group must have exactly one output")
        mapping.update({name: ("group", gid) for name in names})
    quotient = nx.DiGraph()
    quotient.add_nodes_from(mapping.get(v, v) for v in dag.nodes)
    quotient.add_edges_from((mapping.get(a, a), mapping.get(b, b)) for a, b in dag.edges
                            if mapping.get(a, a) != mapping.get(b, b))
    if not nx.is_directed_acyclic_graph(quotient):
        cycle = nx.find_cycle(quotient)
        raise GraphInvariantError(f"fusion groups form a cycle when contracted: {cycle}")
    return groups
