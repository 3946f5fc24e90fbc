"""Which weights ``sparsify`` may thin out, and how much each weight is worth.

Candidates are the constant floating weights of ``linear`` and convolution ops. Left alone,
each with its reason: depthwise convolutions (one input channel per filter: little to skip,
much to lose), transposed convolutions, and weights some other op also reads (an embedding
table tied to the output projection, a weight reused as an activation) — zeroing those would
change more than the layer. Layers named by ``exclude`` are left alone too.

Scores, per weight (higher = keep):

* ``magnitude``: ``|w|``;
* ``taylor``: ``|w * dL/dw|``, the first-order estimate of the loss change when ``w`` goes,
  with gradients summed over the calibration batches (prune's Taylor criterion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.fx as fx

from graphopt.graph import Graph
from graphopt.passes.prune.importance import taylor_gradients
from graphopt.passes.utils import arg, aten, is_op, module_path

CRITERIA = ("magnitude", "taylor")
_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)


@dataclass
class SparseWeight:
    """One constant weight and the linear/conv ops that read it."""

    name: str  # the constant's name (its get_attr target): the key of graph.annotations["sparsity"]
    op: str  # "linear" | "conv"
    layer: str  # the model's name for the (first) layer using it, or its node name
    nodes: list[fx.Node] = field(default_factory=list)

    def matches(self, pattern: str) -> bool:
        names = (self.layer, self.name, *(n.name for n in self.nodes))
        return any(fnmatchcase(name, pattern) for name in names)


def _op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def _weight_role(node: fx.Node, graph: Graph, name: str) -> tuple[str | None, str]:
    """(``linear`` | ``conv`` | None, why not) for an op that reads the constant ``name``."""
    weight = node.args[1] if len(node.args) > 1 else None
    if not (is_op(node, aten.linear, *_CONVS) and graph.is_constant(weight) and weight.target == name):
        return None, f"also read by {_op_name(node)}"
    if is_op(node, aten.linear):
        return "linear", ""
    if is_op(node, aten.convolution) and bool(arg(node, 6, "transposed", False)):
        return None, "transposed convolution"
    groups = arg(node, 8 if is_op(node, aten.convolution) else 6, "groups", 1)
    if groups > 1 and graph.constant(weight).shape[1] == 1:
        return None, "depthwise convolution"
    return "conv", ""


def sparsifiable_weights(graph: Graph) -> tuple[list[SparseWeight], list[dict[str, str]]]:
    """The candidate weights in graph order, and the linear/conv weights left alone with the reason."""
    readers: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(node.target, []).extend(node.users)
    candidates: dict[str, SparseWeight] = {}
    skipped: dict[str, dict[str, str]] = {}
    for node in graph.call_nodes():
        if not is_op(node, aten.linear, *_CONVS) or len(node.args) < 2 or not graph.is_constant(node.args[1]):
            continue
        name = node.args[1].target
        if name in candidates or name in skipped or not graph.constant(node.args[1]).is_floating_point():
            continue
        layer = module_path(node) or node.name
        roles = [_weight_role(user, graph, name) for user in readers[name]]
        why = next((why for op, why in roles if op is None), "")
        if not why and len({op for op, _ in roles}) > 1:
            why = "read by a linear and a convolution"
        if why:
            skipped[name] = {"weight": name, "layer": layer, "reason": why}
        else:
            candidates[name] = SparseWeight(name, roles[0][0], layer, list(readers[name]))
    return list(candidates.values()), list(skipped.values())


def weight_scores(graph: Graph, weights: list[SparseWeight], criterion: str, data: Any = None
                  ) -> dict[str, torch.Tensor]:
    """Per-weight scores (float64, the weight's shape) for each candidate, by ``criterion``."""
    tensors = {w.name: getattr(graph.gm, w.name).detach() for w in weights}
    if criterion == "magnitude":
        return {name: t.abs().double() for name, t in tensors.items()}
    grads = taylor_gradients(graph, data)
    return {name: (t.double() * grads[name].double()).abs() if name in grads else t.abs().double()
            for name, t in tensors.items()}
