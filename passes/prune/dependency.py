"""Channel dependency analysis: which channels, neurons and heads must go together.

A *unit* is the smallest thing pruning can remove: an output channel of a conv, an output
feature of a linear layer — after coupling, a set of them (a residual add unites channel
``i`` of every branch; attention unites the 3 x head_dim features of one head). Units are
the classes of a union-find over per-channel ids; id 0 is the ``FROZEN`` sentinel, and a
unit united with it can never be pruned (it reaches a graph output, a graph input, an op we
do not model, or an excluded layer).

The analysis has three steps:

1. ``propagation.Propagator`` walks the graph once, carrying one label per tensor element
   and recording which constant slices (:class:`ParamSlice`) each unit owns;
2. a fix-point makes every pruning *rectangular*: each tensor must depend on units along
   one axis only, else removing a unit would not leave a dense tensor. Where labels still
   vary along several axes (a reshape that splits features into (3, d) or (heads, d)), the
   units across all but one axis are united; tensors holding a single unit everywhere are
   frozen (removing it would remove the whole tensor). Index-taking ops (select, strided
   slice) freeze the units they pick from;
3. a networkx graph links each producing layer to its units; its connected components are
   the :class:`ChannelGroup` s that the ``local`` scope prunes by the same ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from graphopt.graph import Graph
from graphopt.passes.prune.propagation import FROZEN, ParamSlice, Propagator, compress, core, varying_axes
from graphopt.passes.utils import aten, is_op, module_path


@dataclass
class ChannelGroup:
    """Units coupled through shared layers; pruned by one ratio in ``local`` scope."""

    index: int
    units: list[int]  # unit roots, never FROZEN
    layers: list[str]  # the layers whose output channels these units are
    channels: int  # producer output channels the units cover (a head counts 3 x head_dim)
    slices: list[ParamSlice] = field(default_factory=list, repr=False)
    unit_channels: list[int] = field(default_factory=list, repr=False)  # per unit, like ``channels``


@dataclass
class FrozenGroup:
    """Producer channels that no pruning may remove, coupled as pruning would have coupled
    them, and why they are frozen."""

    layers: list[str]
    channels: int
    reasons: list[str]


class _UnionFind:
    """Array union-find over unit ids; FROZEN always stays a root so frozen-ness is cheap.

    A second, *shadow* union-find records the same unions except those with FROZEN, and
    the reasons units were frozen: its classes are the groups pruning would have had, so
    the prune report can list each group kept whole with why.
    """

    def __init__(self):
        self.parent = [FROZEN]
        self.shadow = [FROZEN]
        self.reasons: dict[int, list[str]] = {}  # shadow root -> why its units are frozen

    def add(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.shadow.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long)

    @staticmethod
    def _find(parent: list[int], x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def find(self, x: int) -> int:
        return self._find(self.parent, x)

    def union(self, a: int, b: int, reason: str = "coupled to a fixed-width tensor (graph input or constant)") -> bool:
        if a != FROZEN and b != FROZEN:
            sa, sb = self._find(self.shadow, a), self._find(self.shadow, b)
            if sa != sb:
                sa, sb = min(sa, sb), max(sa, sb)
                self.shadow[sb] = sa
                if sb in self.reasons:
                    self.reasons.setdefault(sa, []).extend(self.reasons.pop(sb))
        elif a != b:
            s = self._find(self.shadow, a if b == FROZEN else b)
            why = self.reasons.setdefault(s, [])
            if reason not in why and len(why) < 8:
                why.append(reason)
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if rb == FROZEN or (ra != FROZEN and rb < ra):
            ra, rb = rb, ra
        self.parent[rb] = ra
        return True

    def roots(self) -> torch.Tensor:
        return torch.tensor([self.find(i) for i in range(len(self.parent))], dtype=torch.long)

    def shadow_roots(self) -> torch.Tensor:
        return torch.tensor([self._find(self.shadow, i) for i in range(len(self.shadow))], dtype=torch.long)


def concrete_shapes(graph: Graph) -> dict[fx.Node, object]:
    """Each node's concrete output shape (tuple, tuple of tuples, or None) on the example inputs."""
    shapes: dict[fx.Node, object] = {}

    def shape_of(v):
        if isinstance(v, torch.Tensor):
            return tuple(v.shape)
        if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
            return tuple(tuple(t.shape) for t in v)
        return None

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            shapes[n] = shape_of(out)
            return out

    with torch.no_grad():
        Recorder(graph.gm).run(*graph.example_inputs)
    return shapes


def layer_names(node: fx.Node) -> list[str]:
    """Names a user may call a layer by: its module path, and its weight's owner
    (``layers.0.self_attn`` and ``layers.0.self_attn.out_proj`` for attention's projection)."""
    names = [module_path(node)]
    weight = node.args[1] if len(node.args) > 1 else None
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        source = str(weight.meta.get("source", weight.target))
        names.append(source.rsplit(".", 1)[0] if "." in source else source)
    return [n for n in names if n] or [node.name]


def layer_name(node: fx.Node) -> str:
    """The model's name for the layer of a conv/linear/norm node."""
    return layer_names(node)[0]


class ChannelDependencyGraph:
    """Groups of coupled channels of a graph. See the module docstring.

    ``exclude``: layer names (``layer1.0.conv1``, or a prefix such as ``layer1``) whose
    weights must not change; their input and output channels are frozen.
    """

    def __init__(self, graph: Graph, exclude: tuple[str, ...] = ()):
        self.graph = graph
        self.exclude = tuple(exclude)
        self._uf = _UnionFind()
        self.shapes = concrete_shapes(graph)
        prop = Propagator(self.shapes, self._uf.union, self._uf.add, layer_name, self.is_excluded_node)
        prop.run(list(graph.nodes), graph.example_inputs)
        self.labels: dict[fx.Node, object] = {n: v for n, v in prop.env.items() if n.op == "call_function"}
        self.slices: list[ParamSlice] = prop.slices
        self.producers = prop.producers
        self.depthwise = prop.depthwise
        self.unknown_ops = prop.unknown_ops
        self.fixed_axes = prop.fixed_axes
        self._make_rectangular()
        self._regroup()

    def _regroup(self) -> None:
        self.root_of = self._frozen_normalized_roots()
        self.groups = self._find_groups()
        self.frozen_groups = self._find_frozen_groups()

    def freeze_units(self, units: list[int], reason: str) -> None:
        """Make ``units`` unprunable after the analysis (e.g. a constant they would slice two ways)."""
        for u in units:
            self._uf.union(u, FROZEN, reason)
        self._regroup()

    def conflicting_slices(self) -> list[list[ParamSlice]]:
        """Slices of one constant along one axis that disagree on which unit owns an index."""
        by_axis: dict[tuple[str, int], list[ParamSlice]] = {}
        for s in self.slices:
            by_axis.setdefault((s.node.target, s.axis), []).append(s)
        out = []
        for slices in by_axis.values():
            first = self.root_of[slices[0].labels]
            if any(not torch.equal(self.root_of[s.labels], first) for s in slices[1:]):
                out.append(slices)
        return out

    def is_excluded(self, layer: str) -> bool:
        return any(layer == name or layer.startswith(name + ".") for name in self.exclude)

    def is_excluded_node(self, node: fx.Node) -> bool:
        return any(self.is_excluded(name) for name in layer_names(node))

    # ------------------------------------------------------------ fix-point
    def tensors(self):
        """(node, label tensor) for every tensor value the graph computes."""
        for node, value in self.labels.items():
            for t in (value if isinstance(value, tuple) else (value,)):
                if isinstance(t, torch.Tensor):
                    yield node, t

    def _make_rectangular(self) -> None:
        changed = True
        while changed:
            changed = False
            roots = self._uf.roots()
            for node, raw in self.tensors():
                t = self._compressed_roots(raw, roots)
                axes = varying_axes(t)
                if not axes:
                    unit = int(t.reshape(-1)[0]) if t.numel() else FROZEN
                    changed |= self._uf.union(unit, FROZEN, f"the whole of {node.name} is one unit")
                    continue
                if len(axes) > 1:
                    keep = max(axes, key=lambda d: (len(torch.unique(_along(t, d))), d))
                    rows = t.movedim(keep, 0).reshape(t.shape[keep], -1)
                    for row in rows:
                        for u in torch.unique(row).tolist():
                            changed |= self._uf.union(int(row[0]), u, f"{node.name} mixes channels with other axes")
                changed |= self._index_constraints(node, roots)
            for raw, axis, op in self.fixed_axes:
                t = self._compressed_roots(raw, self._uf.roots())
                if axis in varying_axes(t):
                    for u in torch.unique(t).tolist():
                        changed |= self._uf.union(u, FROZEN, f"{op} combines it with a fixed-width tensor")

    def _index_constraints(self, node: fx.Node, roots: torch.Tensor) -> bool:
        """select/strided slice along a prunable axis: freeze the units picked."""
        if not is_op(node, aten.select, aten.slice):
            return False
        src = self.labels.get(node.args[0])
        if not isinstance(src, torch.Tensor):
            return False
        dim = node.args[1] % src.dim()
        t = self._compressed_roots(src, roots)
        if dim not in varying_axes(t):
            return False
        step = node.args[4] if is_op(node, aten.slice) and len(node.args) > 4 else 1
        if is_op(node, aten.slice) and step == 1:
            return False
        picked = t if is_op(node, aten.slice) else t.select(dim, node.args[2])
        changed = False
        for u in torch.unique(picked).tolist():
            changed |= self._uf.union(u, FROZEN, f"indexed by {node.name}")
        return changed

    def _compressed_roots(self, raw: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
        # index only the stored core: broadcast (stride 0) axes stay broadcast
        return compress(roots[core(raw)].expand(raw.shape))

    def _frozen_normalized_roots(self) -> torch.Tensor:
        roots = self._uf.roots()
        return torch.where(roots == self._uf.find(FROZEN), torch.zeros_like(roots), roots)

    # --------------------------------------------------------------- groups
    def _find_groups(self) -> list[ChannelGroup]:
        g = nx.Graph()
        channels: dict[int, int] = {}
        for node, units in self.producers.items():
            roots = [u for u in self.root_of[units].tolist() if u != FROZEN]
            g.add_edges_from((("layer", node), ("unit", u)) for u in set(roots))
            for u in roots:
                channels[u] = channels.get(u, 0) + 1
        by_unit: dict[int, list[ParamSlice]] = {}
        for s in self.slices:
            for u in torch.unique(self.root_of[s.labels]).tolist():
                by_unit.setdefault(u, []).append(s)
        groups = []
        for comp in nx.connected_components(g):
            units = sorted(u for kind, u in comp if kind == "unit")
            layers = sorted(layer_name(n) for kind, n in comp if kind == "layer")
            slices = list({id(s): s for u in units for s in by_unit.get(u, [])}.values())
            groups.append(ChannelGroup(0, units, layers, sum(channels[u] for u in units), slices,
                                       [channels[u] for u in units]))
        groups.sort(key=lambda gr: gr.units[0])
        for i, gr in enumerate(groups):
            gr.index = i
        return groups

    def _find_frozen_groups(self) -> list[FrozenGroup]:
        """Frozen producer channels, in the classes of the shadow union-find (see _UnionFind),
        joined per layer like :meth:`_find_groups` joins units."""
        shadow = self._uf.shadow_roots()
        g = nx.Graph()
        channels: dict[int, int] = {}
        for node, units in self.producers.items():
            for cls in shadow[units[self.root_of[units] == FROZEN]].tolist():
                g.add_edge(("layer", node), ("class", cls))
                channels[cls] = channels.get(cls, 0) + 1
        groups = []
        for comp in nx.connected_components(g):
            classes = sorted(c for kind, c in comp if kind == "class")
            reasons = list(dict.fromkeys(r for c in classes for r in self._uf.reasons.get(c, ["unknown"])))
            groups.append(FrozenGroup(sorted(layer_name(n) for kind, n in comp if kind == "layer"),
                                      sum(channels[c] for c in classes), reasons[:6]))
        return sorted(groups, key=lambda gr: gr.layers)

    def to_networkx(self) -> nx.Graph:
        """Layers and the constants they share units with, one node per layer/constant."""
        g = nx.Graph()
        for grp in self.groups:
            for s in grp.slices:
                g.add_edge(f"group{grp.index}", f"{s.node.target}[{s.axis}]", role=s.role)
        return g

    def describe(self) -> str:
        lines = [f"{len(self.groups)} channel groups"]
        for grp in self.groups:
            lines.append(f"  group {grp.index}: {len(grp.units)} units ({grp.channels} channels) "
                         f"of {', '.join(grp.layers)}")
        if self.unknown_ops:
            lines.append("  frozen by unmodelled ops: " + ", ".join(f"{k} x{v}" for k, v in self.unknown_ops.items()))
        return "\n".join(lines)

    def kept_along(self, labels: torch.Tensor, pruned: torch.Tensor) -> list[torch.Tensor | None]:
        """Per axis of a label tensor: bool mask of kept indices, or None if the axis does not shrink."""
        t = self._compressed_roots(labels, self.root_of)
        out: list[torch.Tensor | None] = [None] * t.dim()
        for d in varying_axes(t):
            out[d] = ~pruned[_along(t, d)]
        return out


def _along(t: torch.Tensor, d: int) -> torch.Tensor:
    """The labels along axis ``d`` (first index of every other axis)."""
    return t.movedim(d, 0).reshape(t.shape[d], -1)[:, 0]
