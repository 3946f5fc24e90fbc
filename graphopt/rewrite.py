"""Declared rewrites: named ``pattern -> replacement`` rules run by one driver, with counters.

A rewrite pass is a list of :class:`Rewrite` rules, not a loop of if-chains: each rule says
what it matches (``match(node) -> binding or None``) and what replaces the match
(``replace(node, binding)``), and the driver walks the graph, applies the first rule that
matches each node and counts the hits per rule name, in the manner of Inductor's
``register_replacement`` and tinygrad's ``PatternMatcher``. The counters are the pass's
stats (``pattern.<name>``), so the pass records and the headers of IR dumps
(``graphopt compile --dump-ir DIR``) say which rule fired how often.

The rules are IR-agnostic: :func:`rewrite_fx` walks a torch.fx graph (graphopt's passes);
the backend's compile-time Relax rewrites (weight re-layout, Winograd, int8 packing) run the
same :class:`Rewrite` rules over Relax calls with ``CallRewriter``
(graphopt/targets/cpu/schedules/layout.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch.fx as fx

# A replacement may be a node (uses of the matched node go to it), ERASE (the matched node
# has no users and goes away) or KEEP (the rule rewrote in place, e.g. new arguments).
ERASE = object()
KEEP = object()


@dataclass(frozen=True)
class Rewrite:
    """One rule: ``match(node)`` returns a binding (anything but None) when the rule applies;
    ``replace(node, binding)`` performs it and returns what stands for the node afterwards."""

    name: str
    match: Callable[[Any], Any]
    replace: Callable[[Any, Any], Any]
    doc: str = ""


def first_match(rules: Sequence[Rewrite], node: Any) -> tuple[Rewrite, Any] | None:
    """The first rule of ``rules`` that matches ``node``, with its binding."""
    for rule in rules:
        binding = rule.match(node)
        if binding is not None:
            return rule, binding
    return None


def counter_stats(counts: Counter) -> dict[str, int]:
    """Per-rule hit counts as pass stats: ``{"pattern.<rule>": n}``."""
    return {f"pattern.{name}": n for name, n in sorted(counts.items())}


def rewrite_fx(graph: fx.Graph, rules: Sequence[Rewrite], nodes: Iterable[fx.Node] | None = None) -> Counter:
    """Apply ``rules`` to every node of ``graph`` once, in order; returns hits per rule name.

    A node that an earlier replacement erased is skipped. After a node is replaced by another
    node, its uses move to the replacement and the node is erased.
    """
    counts: Counter = Counter()
    for node in list(graph.nodes if nodes is None else nodes):
        if node._erased:  # an earlier replacement removed it (torch.fx marks erased nodes)
            continue
        hit = first_match(rules, node)
        if hit is None:
            continue
        rule, binding = hit
        replacement = rule.replace(node, binding)
        if replacement is None:  # the rule declined after a closer look
            continue
        if replacement is ERASE:
            graph.erase_node(node)
        elif isinstance(replacement, fx.Node):
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
        elif replacement is not KEEP:
            raise TypeError(f"rewrite {rule.name!r} returned {replacement!r}; expected a node, ERASE or KEEP")
        counts[rule.name] += 1
    return counts
