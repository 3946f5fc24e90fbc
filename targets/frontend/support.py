"""Which ATen ops the TVM backend lowers, and the decompositions that widen that set.

An op lowers when the importer's converter map (TVM's own plus graphopt's, targets/frontend/
lower.py) has an entry for it. An op without one that PyTorch can decompose into core ATen
ops (``torch._decomp.core_aten_decompositions``: ``aten.diff`` into slices and a subtraction,
``aten.where.ScalarOther`` into ``where.self``, ``conv2d(padding="same")`` into a padded
convolution) is replaced by its decomposition before lowering, node by node, so only the ops
the backend lacks are decomposed and everything it lowers whole (``conv2d``, ``layer_norm``,
attention) stays whole. What stays unsupported is reported with the user's source line.

``graph_support`` answers for one captured graph (``graphopt inspect --support``);
``core_aten_support`` sweeps ATen's core op set (``torch.Tag.core``), so the next missing op
is found before a user's model finds it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx

from graphopt.graph import Graph

# Rounds of decomposition: a decomposition may produce an op that itself needs one.
_MAX_ROUNDS = 4


@functools.cache
def supported_op_names() -> frozenset[str]:
    """Names (``OpOverload.__name__``, e.g. ``"conv2d.default"``) of the ops the backend converts."""
    from graphopt.targets.frontend.lower import GraphImporter

    return frozenset(GraphImporter().convert_map)


@functools.cache
def _decompositions() -> dict[Any, Any]:
    from torch._decomp import core_aten_decompositions

    return dict(core_aten_decompositions())


def op_key(node: fx.Node) -> str:
    target = node.target
    return target.__name__ if hasattr(target, "__name__") else str(target)


def is_supported(node: fx.Node, supported: frozenset[str] | None = None) -> bool:
    return op_key(node) in (supported if supported is not None else supported_op_names())


def decomposable(node: fx.Node, supported: frozenset[str] | None = None) -> bool:
    """Whether ``node``'s op lacks a converter but has a core-ATen decomposition."""
    return not is_supported(node, supported) and node.target in _decompositions()


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


def decompose_unsupported(graph: Graph, supported: frozenset[str] | None = None) -> Graph:
    """``graph`` with every node whose op lacks a converter but has a core-ATen decomposition
    replaced by that decomposition (a copy; ``graph`` itself when there is none). A node whose
    decomposition cannot be traced is left as it is: lowering then reports it as unsupported."""
    supported = supported if supported is not None else supported_op_names()
    out = graph
    failed: set[fx.Node] = set()
    for _ in range(_MAX_ROUNDS):
        todo = [n for n in out.call_nodes() if decomposable(n, supported) and n.name not in failed]
        if not todo:
            break
        if out is graph:
            out = graph.copy()
            todo = [n for n in out.call_nodes() if decomposable(n, supported) and n.name not in failed]
        changed = False
        for node in todo:
            if _inline_decomposition(out, node):
                changed = True
            else:
                failed.add(node.name)
        if not changed:
            break
        out.recompile()
    return out


def _inline_decomposition(graph: Graph, node: fx.Node) -> bool:
    """Replace ``node`` by the ATen ops of its decomposition, traced on its inputs' fake values."""
    from torch.fx.experimental.proxy_tensor import make_fx

    decomposition = _decompositions()[node.target]
    inputs = list(node.all_input_nodes)

    def substitute(values: Iterable[Any]):
        env = dict(zip(inputs, values))
        return fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])

    def run(*values):
        args, kwargs = substitute(values)
        return decomposition(*args, **kwargs)

    try:
        with graph.fake_mode:
            traced = make_fx(run, tracing_mode="real")(*[n.meta["val"] for n in inputs])
    except Exception:  # noqa: BLE001 - an untraceable decomposition leaves the op unsupported
        return False
    env: dict[fx.Node, Any] = {}
    placeholders = iter(inputs)
    with graph.fx_graph.inserting_before(node):
        for sub in traced.graph.nodes:
            if sub.op == "placeholder":
                env[sub] = next(placeholders)
            elif sub.op == "get_attr":
                env[sub] = graph.add_constant(getattr(traced, sub.target), f"{node.name}_const", before=node)
            elif sub.op == "call_function":
                new = graph.fx_graph.node_copy(sub, lambda a: env[a])
                new.meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}
                env[sub] = new
            elif sub.op == "output":
                result = fx.node.map_arg(sub.args[0], lambda a: env[a])
    if isinstance(result, (tuple, list)):
        for user in list(node.users):
            user.replace_all_uses_with(result[user.args[1]])
            graph.fx_graph.erase_node(user)
    else:
        node.replace_all_uses_with(result)
    graph.fx_graph.erase_node(node)
    return True


def core_aten_ops() -> list[torch._ops.OpOverload]:
    """Every overload ATen tags ``core``: the op set torch.export's default decompositions end in."""
    ops = []
    for name in dir(torch.ops.aten):
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
    table = _decompositions()
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
