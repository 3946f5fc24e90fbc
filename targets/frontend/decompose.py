"""Core-ATen decompositions for the ops the backend has no converter for.

An op without a converter that PyTorch can decompose into core ATen ops
(``torch._decomp.core_aten_decompositions``: ``aten.diff`` into slices and a subtraction,
``aten.where.ScalarOther`` into ``where.self``, ``conv2d(padding="same")`` into a padded
convolution) is replaced by its decomposition before lowering, node by node, so only the ops
the backend lacks are decomposed and everything it lowers whole (``conv2d``, ``layer_norm``,
attention) stays whole. Which ops have converters is the caller's to say (``supported``).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import torch.fx as fx

from graphopt.graph import Graph

# Rounds of decomposition: a decomposition may produce an op that itself needs one.
_MAX_ROUNDS = 4


@functools.cache
def core_decompositions() -> dict[Any, Any]:
    from torch._decomp import core_aten_decompositions

    return dict(core_aten_decompositions())


def op_key(node: fx.Node) -> str:
    target = node.target
    return target.__name__ if hasattr(target, "__name__") else str(target)


def is_supported(node: fx.Node, supported: frozenset[str]) -> bool:
    return op_key(node) in supported


def decomposable(node: fx.Node, supported: frozenset[str]) -> bool:
    """Whether ``node``'s op lacks a converter but has a core-ATen decomposition."""
    return not is_supported(node, supported) and node.target in core_decompositions()


def decompose_unsupported(graph: Graph, supported: frozenset[str]) -> Graph:
    """``graph`` with every node whose op lacks a converter but has a core-ATen decomposition
    replaced by that decomposition (a copy; ``graph`` itself when there is none). A node whose
    decomposition cannot be traced is left as it is: lowering then reports it as unsupported."""
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

    decomposition = core_decompositions()[node.target]
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
