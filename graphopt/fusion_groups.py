"""What a fusion group is: the record on the graph and its invariants.

A fusion group is a set of call nodes that the backend runs as ONE kernel. The ``fuse`` pass
decides them (passes/fusion/); the backend emits each as one kernel function
(targets/frontend/lower.py). Invariants (checked while a group grows, and again by
:func:`validate_groups` before lowering):

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

import networkx as nx
import torch
import torch.fx as fx

from graphopt.errors import GraphInvariantError
from graphopt.op_kinds import is_pure


# Ops that read only the shape and dtype of their first argument: with a static shape their
# value is a constant whatever that argument's values (``x.new_zeros(...)``, a fill of a slice).
SHAPE_ONLY_FIRST_ARG = frozenset({
    "new_ones.default", "new_zeros.default", "new_full.default", "new_empty.default", "ones_like.default",
    "zeros_like.default", "full_like.default", "empty_like.default", "fill.Scalar", "fill.Tensor", "zero.default",
})


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values ``node`` reads: all of them, but a static-shape fill's first."""
    val = node.meta.get("val")
    if (getattr(node.target, "__name__", "") in SHAPE_ONLY_FIRST_ARG and isinstance(val, torch.Tensor)
            and not any(isinstance(d, torch.SymInt) for d in val.shape)):
        return [a for a in node.all_input_nodes if a is not node.args[0]]
    return node.all_input_nodes


def compile_time_nodes(graph) -> set[fx.Node]:
    """The call nodes whose value depends on no graph input: pure ops on constants only
    (``get_attr``s, other such nodes, or nothing at all, like ``arange(16)``), where a fill of
    a static shape reads no input's values (swin's attention mask, built in ``x.new_zeros``).

    The backend evaluates them while it builds, so they are never kernels (invariant 4).
    Random ops (``rand``) read no input either but give a new value every call: not these.
    """
    found: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "call_function" and is_pure(n) and all(
                a.op == "get_attr" or a in found for a in _value_inputs(n)):
            found.add(n)
    return found


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
