"""Which ATen ops the TVM backend lowers, and the decompositions that widen that set.

An op lowers when the importer's converter map (TVM's own plus graphopt's, targets/frontend/
lower.py) has an entry for it, or when PyTorch decomposes it into ops that have one
(targets/frontend/decompose.py). What stays unsupported is reported with the user's source line.

``graph_support`` answers for one captured graph (``graphopt inspect --support``);
``core_aten_support`` sweeps ATen's core op set (``torch.Tag.core``), so the next missing op
is found before a user's model finds it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.graph import Graph
from graphopt.targets.frontend.decompose import (core_decompositions, decomposable, decompose_unsupported, is_supported,
                                                 op_key)


@functools.cache
def supported_op_names() -> frozenset[str]:
    """Names (``OpOverload.__name__``, e.g. ``"conv2d.default"``) of the ops the backend converts."""
    from graphopt.targets.frontend.lower import GraphImporter

    return frozenset(GraphImporter().convert_map)


@dataclass(frozen=True)
class OpSupport:
    """How one op of a graph lowers: ``converted`` by a converter, ``decomposed`` first into ops
    that are, or ``unsupported``; with the user's line that produced its first node."""

    op: str
    status: str
    count: int
    source: str


def graph_support(graph: Graph) -> list[OpSupport]:
    """Every op of ``graph``, once, in graph order, with how the backend lowers it; ops that only
    a decomposition brings in follow, when they are unsupported."""
    from graphopt.targets.frontend.lower import source_location

    supported = supported_op_names()
    lowered = decompose_unsupported(graph, supported)
    remaining = {op_key(n) for n in lowered.call_nodes()}
    found: dict[str, list] = {}

    def add(n: fx.Node, status: str) -> None:
        key = f"aten.{op_key(n)}" if isinstance(n.target, torch._ops.OpOverload) else op_key(n)
        if key in found:
            found[key][1] += 1
        else:
            found[key] = [status, 1, source_location(n)]

    for n in graph.call_nodes():
        if is_supported(n, supported):
            add(n, "converted")
        elif decomposable(n, supported) and op_key(n) not in remaining:
            add(n, "decomposed")
        else:
            add(n, "unsupported")
    original = {op_key(n) for n in graph.call_nodes()}
    for n in lowered.call_nodes():
        if op_key(n) not in original and not is_supported(n, supported):
            add(n, "unsupported")
    return [OpSupport(op, status, count, source) for op, (status, count, source) in found.items()]


def core_aten_ops() -> list[torch._ops.OpOverload]:
    """Every overload ATen tags ``core``: the op set torch.export's default decompositions end in."""
    ops = []
    # every registered ATen op by name: ``dir(torch.ops.aten)`` lists only the packets some code
    # has touched so far, so the sweep would depend on what ran before it
    names = {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("aten::")}
    for name in sorted(names):
        packet = getattr(torch.ops.aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if torch.Tag.core in op.tags:
                ops.append(op)
    return sorted(set(ops), key=lambda op: op.__name__)


def core_aten_support() -> dict[str, str]:
    """Each core ATen op -> ``converted``, ``decomposed`` (no converter; torch decomposes it into
    core ops) or ``unsupported``."""
    supported = supported_op_names()
    table = core_decompositions()
    return {f"aten.{op.__name__}": "converted" if op.__name__ in supported else
            "decomposed" if op in table else "unsupported" for op in core_aten_ops()}


def format_support(rows: list[OpSupport]) -> str:
    """The ``graphopt inspect --support`` table: one line per op, the source line of unsupported ones."""
    width = max((len(r.op) for r in rows), default=0)
    lines = []
    for r in rows:
        where = f"  from {r.source}" if r.status == "unsupported" else ""
        lines.append(f"  {r.op:<{width}}  x{r.count:<3} {r.status}{where}")
    counts = {s: sum(1 for r in rows if r.status == s) for s in ("converted", "decomposed", "unsupported")}
    head = ("op support on the TVM backend: " + ", ".join(f"{n} {s}" for s, n in counts.items()) +
            (" (the build would fail)" if counts["unsupported"] else ""))
    return "\n".join([head, *lines])
