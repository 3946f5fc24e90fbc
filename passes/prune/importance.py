"""Importance criteria: one score per unit, from every constant slice the unit owns.

A unit's score sums over *all* its slices — the producing layer's rows, the consuming
layers' columns, norm parameters — as DepGraph's group importance does, so a channel that
is weak in one layer but strong in the next is kept.

* ``l1`` / ``l2``: sum of |w| / sqrt of sum of w**2 over the unit's weights and biases;
* ``bn_scale``: |gamma| of the batch/layer norms on the unit (network slimming); a group
  with no norm layer falls back to ``l1``;
* ``taylor``: first-order Taylor estimate of the loss change, sum |w * dL/dw|, with
  gradients from calibration batches (cross-entropy against labels when a batch carries
  them, else against the model's own predictions; squared output for non-2-D outputs).

Norm running statistics and attention masks never count.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F

from graphopt.graph import Graph
from graphopt.passes.prune.dependency import ChannelDependencyGraph
from graphopt.passes.prune.propagation import ParamSlice

CRITERIA = ("l1", "l2", "bn_scale", "taylor")
_IGNORED_ROLES = ("stat", "mask")


def _per_index(values: torch.Tensor, axis: int) -> torch.Tensor:
    return values.movedim(axis, 0).reshape(values.shape[axis], -1).sum(1, dtype=torch.float64)


def _scatter(scores: torch.Tensor, dep: ChannelDependencyGraph, s: ParamSlice, per_index: torch.Tensor) -> None:
    scores.index_add_(0, dep.root_of[s.labels], per_index.double())


def unit_scores(graph: Graph, dep: ChannelDependencyGraph, criterion: str,
                grads: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Scores indexed by unit root (entries of non-root ids are meaningless)."""
    n = len(dep.root_of)
    l1 = torch.zeros(n, dtype=torch.float64)
    scores = torch.zeros(n, dtype=torch.float64)
    has_norm = torch.zeros(n, dtype=torch.bool)
    for s in dep.slices:
        if s.role in _IGNORED_ROLES:
            continue
        w = graph.constant(s.node).detach()
        if not w.is_floating_point():
            continue
        if criterion in ("l1", "bn_scale"):
            _scatter(l1, dep, s, _per_index(w.abs(), s.axis))
        if criterion == "l2":
            _scatter(scores, dep, s, _per_index(w * w, s.axis))
        elif criterion == "bn_scale" and s.role == "norm_scale":
            _scatter(scores, dep, s, _per_index(w.abs(), s.axis))
            has_norm[dep.root_of[s.labels]] = True
        elif criterion == "taylor":
            g = (grads or {}).get(s.node.target)
            if g is not None:
                _scatter(scores, dep, s, _per_index((w * g).abs(), s.axis))
    if criterion == "l1":
        return l1
    if criterion == "l2":
        return scores.sqrt()
    if criterion == "bn_scale":
        for group in dep.groups:
            units = torch.tensor(group.units)
            if not bool(has_norm[units].any()):
                scores[units] = l1[units]
        return scores
    return scores


def taylor_gradients(graph: Graph, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """dL/dw of every floating constant, summed over ``batches``."""
    from graphopt.finetune import trainable_constants

    tensors = {n.target: graph.constant(n) for n in graph.nodes if n.op == "get_attr"}
    trainable = {id(t) for t in trainable_constants(graph)}
    tensors = {k: t for k, t in tensors.items() if id(t) in trainable}
    n_inputs = len(graph.input_nodes)
    grads: dict[str, torch.Tensor] = {}
    try:
        for t in tensors.values():
            t.requires_grad_(True)
        seen = 0
        for batch in batches:
            inputs, labels = split_batch(batch, n_inputs)
            out = graph.gm(*inputs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            if out.dim() == 2:
                target = labels if labels is not None else out.detach().argmax(1)
                loss = F.cross_entropy(out, target)
            else:
                loss = out.pow(2).mean()
            loss.backward()
            seen += 1
        if seen == 0:
            raise ValueError("no calibration batches")
        for name, t in tensors.items():
            if t.grad is not None:
                grads[name] = t.grad.detach().clone()
    finally:
        for t in tensors.values():
            t.grad = None
            t.requires_grad_(False)
    return grads


def split_batch(batch: Any, n_inputs: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """A batch is a tensor, a tuple of inputs, or a tuple of inputs followed by integer labels."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    items = tuple(batch)
    if len(items) == n_inputs + 1 and not items[-1].is_floating_point():
        return items[:-1], items[-1]
    return items, None

