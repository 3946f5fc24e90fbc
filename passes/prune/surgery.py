"""Physically remove pruned units: slice constants and rewrite shape arguments.

Given the dependency graph and the set of pruned unit roots, every :class:`ParamSlice`
becomes an ``index_select`` of its constant (``Graph.set_constant``: the tensors really
shrink, parameters stay parameters). Ops whose arguments spell out sizes or indices along
a shrinking axis are rewritten from the label tensors: the new size of an axis is the
number of its slices whose unit survives —

* ``view`` / ``reshape`` / ``expand`` / ``unflatten``: the size list (``-1`` and symbolic
  sizes on axes that do not shrink are left alone);
* ``layer_norm``: ``normalized_shape``; depthwise convs: ``groups``;
* ``slice`` / ``narrow`` / ``select`` / ``split`` along a shrinking axis: start, end,
  index and chunk sizes are renumbered over the surviving slices.

Shape meta is then re-derived by ``Graph.recompile`` (called by the pass).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.errors import GraphoptError
from graphopt.graph import Graph
from graphopt.passes.prune.dependency import ChannelDependencyGraph
from graphopt.passes.utils import aten, is_op, set_arg


class PruneSurgeryError(GraphoptError, RuntimeError):
    """Internal: the dependency analysis produced two different slicings of one constant."""


def resolve_shared_constants(graph: Graph, dep: ChannelDependencyGraph) -> tuple[int, int]:
    """Make every constant sliceable one way, before units are chosen.

    A constant read by several ops that slice it differently (constant folding shares equal
    tensors, such as the zero biases of freshly folded batch norms, between unrelated
    layers) gets a copy per slicing. Where one op itself would slice a constant two ways,
    the units involved are frozen: their groups stay whole. Returns (constants copied,
    units frozen).
    """
    copied, frozen = 0, 0
    for slices in dep.conflicting_slices():
        by_user: dict[fx.Node, list] = {}
        for s in slices:
            by_user.setdefault(s.user, []).append(s)
        for user_slices in by_user.values():
            first = dep.root_of[user_slices[0].labels]
            if any(not torch.equal(dep.root_of[s.labels], first) for s in user_slices[1:]):
                units = torch.unique(torch.cat([dep.root_of[s.labels] for s in user_slices])).tolist()
                dep.freeze_units(units, f"constant {slices[0].node.target} would be sliced two ways")
                frozen += len(units)
        original = slices[0].node
        variants: list[tuple[torch.Tensor, fx.Node]] = []
        for user, user_slices in by_user.items():
            roots = dep.root_of[user_slices[0].labels]
            node = next((n for r, n in variants if torch.equal(r, roots)), None)
            if node is None and variants and user is not None:
                node = graph.add_constant(graph.constant(original), str(original.target), before=user)
                node.meta["source"] = original.meta.get("source")
                copied += 1
            node = node or original
            variants.append((roots, node))
            if node is not original:
                user.replace_input_with(original, node)
                for s in dep.slices:
                    if s.user is user and s.node is original:
                        s.node = node
    return copied, frozen


def apply_pruning(graph: Graph, dep: ChannelDependencyGraph, pruned: torch.Tensor) -> int:
    """Remove the units with ``pruned[root]`` True; returns the number of constants sliced."""
    masks: dict[str, dict[int, torch.Tensor]] = {}
    nodes: dict[str, fx.Node] = {}
    for s in dep.slices:
        keep = ~pruned[dep.root_of[s.labels]]
        per_axis = masks.setdefault(s.node.target, {})
        nodes[s.node.target] = s.node
        if s.axis in per_axis and not torch.equal(per_axis[s.axis], keep):
            raise PruneSurgeryError(f"constant {s.node.target!r} axis {s.axis} is sliced two ways")
        per_axis[s.axis] = keep
    sliced = 0
    for target, per_axis in masks.items():
        if all(bool(k.all()) for k in per_axis.values()):
            continue
        t = graph.constant(nodes[target])
        with torch.no_grad():
            for axis, keep in per_axis.items():
                t = t.index_select(axis, keep.nonzero().squeeze(1))
        graph.set_constant(nodes[target], t)
        sliced += 1
    for node in list(graph.nodes):
        if node.op == "call_function":
            _rewrite_arguments(node, dep, pruned)
    return sliced


def _new_shape(dep: ChannelDependencyGraph, node: fx.Node, pruned: torch.Tensor, index: int | None = None):
    labels = dep.labels.get(node)
    shape = dep.shapes.get(node)
    if index is not None:
        labels, shape = labels[index], shape[index]
    if not isinstance(labels, torch.Tensor):
        return shape, [None] * len(shape or ())
    kept = dep.kept_along(labels, pruned)
    return [int(k.sum()) if k is not None else s for s, k in zip(shape, kept)], kept


def _sizes(old: list, new: list[int], shape: tuple[int, ...]) -> list:
    """Replace the entries of a size list whose axis shrank; keep -1 and symbolic ones."""
    out = list(old)
    offset = len(shape) - len(old)
    for i, v in enumerate(old):
        axis = i + offset
        if new[axis] != shape[axis] and isinstance(v, int) and v != -1:
            out[i] = new[axis]
    return out


def _renumber(kept: torch.Tensor, index: int) -> int:
    """Position of original index ``index`` among the kept slices."""
    n = kept.numel()
    index = min(max(index if index >= 0 else index + n, 0), n)
    return int(kept[:index].sum())


def _rewrite_arguments(node: fx.Node, dep: ChannelDependencyGraph, pruned: torch.Tensor) -> None:
    if is_op(node, aten.view, aten._unsafe_view, aten.reshape, aten.expand):
        new, _ = _new_shape(dep, node, pruned)
        set_arg(node, 1, _sizes(list(node.args[1]), new, dep.shapes[node]))
    elif is_op(node, aten.unflatten):
        new, _ = _new_shape(dep, node, pruned)
        dim, sizes = node.args[1] % len(new), list(node.args[2])
        set_arg(node, 2, [new[dim + i] if isinstance(v, int) and v != -1 else v for i, v in enumerate(sizes)])
    elif is_op(node, aten.layer_norm, aten.native_layer_norm):
        new, _ = _new_shape(dep, node.args[0], pruned)
        set_arg(node, 1, list(new[len(new) - len(node.args[1]):]))
    elif node in dep.depthwise:
        new, _ = _new_shape(dep, node.args[0], pruned)
        set_arg(node, 8 if is_op(node, aten.convolution) else 6, new[1])
    elif is_op(node, aten.slice, aten.narrow, aten.select, aten.split, aten.split_with_sizes):
        _rewrite_indexing(node, dep, pruned)


def _rewrite_indexing(node: fx.Node, dep: ChannelDependencyGraph, pruned: torch.Tensor) -> None:
    src = node.args[0]
    new, kept_axes = _new_shape(dep, src, pruned)
    dim_pos = 2 if is_op(node, aten.split, aten.split_with_sizes) else 1
    dim = node.args[dim_pos] if len(node.args) > dim_pos else 0
    dim %= len(new)
    kept = kept_axes[dim]
    if kept is None:
        return
    if is_op(node, aten.select):
        set_arg(node, 2, _renumber(kept, node.args[2]))
    elif is_op(node, aten.narrow):
        start, length = node.args[2], node.args[3]
        set_arg(node, 2, _renumber(kept, start))
        set_arg(node, 3, _renumber(kept, start + length) - _renumber(kept, start))
    elif is_op(node, aten.slice):
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else kept.numel()
        set_arg(node, 2, _renumber(kept, start))
        set_arg(node, 3, _renumber(kept, min(end, kept.numel())))
    else:
        old = node.args[1]
        sizes = list(old) if isinstance(old, (list, tuple)) else \
            [min(old, kept.numel() - i) for i in range(0, kept.numel(), old)]
        bounds, pos = [], 0
        for s in sizes:
            bounds.append(int(kept[pos:pos + s].sum()))
            pos += s
        node.target = aten.split_with_sizes.default
        node.args = (src, bounds, dim)
