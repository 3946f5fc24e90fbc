"""The named fusion patterns. Each finds seeds and grows a group from them.

A pattern is a ``(name, seed, grow)`` triple run by the engine in passes/fuse.py:
``seed(node)`` says whether an ungrouped node starts a group; ``grow(grouping, gid)``
adds neighbours through :meth:`Grouping.can_add`, which enforces the group invariants, so
a pattern only says *what* it would like to fuse, never whether that is legal.

* ``attention``   — scaled_dot_product_attention, or matmul -> [scale] -> softmax -> matmul,
                    plus the layout ops that split Q/K/V before it and merge heads after it;
* ``epilogue``    — conv / linear / matmul plus the single-consumer chain of same-shape
                    elementwise ops after it (bias, folded BN, activation, residual add,
                    clamp, scale), looking through views;
* ``reduction``   — softmax / layer norm / ... plus an elementwise prologue (values used
                    only by it) and a same-shape elementwise epilogue;
* ``elementwise`` — maximal chains of elementwise and layout ops (TVM's injective fusion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from graphopt.passes.fusion.groups import Grouping
from graphopt.op_kinds import is_matmul, is_scalar_scale, is_softmax, kind
from graphopt.passes.utils import shape


@dataclass(frozen=True)
class Pattern:
    name: str
    seed: Callable[[fx.Node], bool]
    grow: Callable[[Grouping, int], None]


def _grow_forward(grouping: Grouping, gid: int, kinds: tuple[str, ...], same_shape: bool) -> None:
    """Follow the group's output to its single consumer while that consumer is of ``kinds``.

    ``same_shape`` keeps the group's output shape (no broadcast to a bigger tensor), so
    an epilogue stays "one more operation per output element" of its anchor. Views are
    walked through (they change the shape, not the data).
    """
    group = grouping.groups[gid]
    while True:
        out = group.output()
        users = list(out.users)
        if len(users) != 1 or kind(users[0]) not in kinds:
            return
        nxt = users[0]
        if same_shape and kind(nxt) != "view" and _numel(nxt) != _numel(out):
            return
        if not grouping.can_add(gid, nxt):
            return
        grouping.add(gid, nxt)


def _grow_backward(grouping: Grouping, gid: int, kinds: tuple[str, ...], same_shape_as: fx.Node | None) -> None:
    """Absorb producers of ``kinds`` whose every user is in the group, to a fixed point."""
    group = grouping.groups[gid]
    changed = True
    while changed:
        changed = False
        for member in sorted(group.members, key=lambda n: n.name):
            for p in member.all_input_nodes:
                if p in group.members or kind(p) not in kinds:
                    continue
                if same_shape_as is not None and kind(p) != "view" and _numel(p) != _numel(same_shape_as):
                    continue
                if all(u in group.members for u in p.users) and grouping.can_add(gid, p):
                    grouping.add(gid, p)
                    changed = True


def _numel(node: fx.Node) -> int | None:
    s = shape(node)
    if s is None:
        return None
    n = 1
    for d in s:
        n *= d
    return n


def _trim_trailing_views(grouping: Grouping, gid: int) -> None:
    """A view at the output end would become a copy inside the kernel; outside it is free."""
    group = grouping.groups[gid]
    while len(group.members) > 1:
        out = group.output()
        if kind(out) != "view":
            return
        inner = [p for p in out.all_input_nodes if p in group.members]
        if len(inner) != 1 or len(inner[0].users) != 1:
            return
        grouping.remove_member(gid, out)


# ----------------------------------------------------------------------------- attention

def _through_views(node: fx.Node, forward: bool) -> fx.Node | None:
    """Step over single-use views: forward to the consumer, or backward to the producer."""
    while node is not None and kind(node) == "view":
        if forward:
            node = next(iter(node.users)) if len(node.users) == 1 else None
        else:
            node = node.args[0] if isinstance(node.args[0], fx.Node) else None
    return node


def _attention_chain(softmax: fx.Node) -> list[fx.Node] | None:
    """Nodes of matmul -> [scale] -> softmax -> matmul around ``softmax``, or None."""
    chain = [softmax]
    x = softmax.args[0]
    back = x
    while back is not None and (kind(back) == "view" or is_scalar_scale(back)):
        chain.append(back)
        back = back.args[0] if isinstance(back.args[0], fx.Node) else None
    if back is None or not is_matmul(back):
        return None
    chain.append(back)
    fwd = softmax
    while len(fwd.users) == 1:
        prev, fwd = fwd, next(iter(fwd.users))
        chain.append(fwd)
        if is_matmul(fwd):
            return chain if fwd.args[0] is prev else None  # probabilities on the left: P @ V
        if kind(fwd) != "view":
            return None
    return None


def _attention_seed(node: fx.Node) -> bool:
    return kind(node) == "attention" or (is_softmax(node) and _attention_chain(node) is not None)


def _attention_grow(grouping: Grouping, gid: int) -> None:
    (seed,) = grouping.groups[gid].members
    if is_softmax(seed):
        # from the softmax outwards (scores side first), so every step keeps one output;
        # a chain cut short (a score used elsewhere) stays a legal softmax group
        for n in _attention_chain(seed)[1:]:
            if not grouping.can_add(gid, n):
                return
            grouping.add(gid, n)
    _grow_backward(grouping, gid, ("view", "layout"), None)
    _grow_forward(grouping, gid, ("view", "layout"), same_shape=False)
    _trim_trailing_views(grouping, gid)


# ------------------------------------------------------------------------------ the rest

def _epilogue_grow(grouping: Grouping, gid: int) -> None:
    _grow_forward(grouping, gid, ("elementwise", "view"), same_shape=True)
    _trim_trailing_views(grouping, gid)


def _reduction_grow(grouping: Grouping, gid: int) -> None:
    (seed,) = grouping.groups[gid].members
    src = seed.args[0] if isinstance(seed.args[0], fx.Node) else None
    _grow_backward(grouping, gid, ("elementwise",), src)
    _grow_forward(grouping, gid, ("elementwise", "view"), same_shape=True)
    _trim_trailing_views(grouping, gid)


def _elementwise_grow(grouping: Grouping, gid: int) -> None:
    _grow_backward(grouping, gid, ("elementwise", "layout", "view"), None)
    _grow_forward(grouping, gid, ("elementwise", "layout", "view"), same_shape=False)
    _trim_trailing_views(grouping, gid)


PATTERNS: dict[str, Pattern] = {
    "attention": Pattern("attention", _attention_seed, _attention_grow),
    "epilogue": Pattern("epilogue", lambda n: kind(n) == "anchor", _epilogue_grow),
    "reduction": Pattern("reduction", lambda n: kind(n) == "reduction", _reduction_grow),
    "elementwise": Pattern("elementwise", lambda n: kind(n) in ("elementwise", "layout"), _elementwise_grow),
}
