"""Graph statistics: op counts, parameters, bytes, FLOPs/MACs per node.

FLOPs come from torch's own ``FlopCounterMode`` run node by node on fake tensors (so the
counting rules are torch's: matmuls, convolutions and attention, 2 FLOPs per
multiply-add); MACs are FLOPs / 2. Elementwise work is not counted, as in torch, fvcore
and ptflops.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from graphopt.printer import op_name



@dataclass
class NodeCost:
    name: str
    op: str
    shape: tuple
    flops: int
    macs: int
    out_bytes: int
    fusion_group: int | None = None


@dataclass
class GraphSummary:
    """Op counts, parameters and FLOPs of a graph; prints as a table."""

    name: str
    op_counts: dict[str, int]
    params: int
    bytes: int
    flops: int
    macs: int
    nodes: list[NodeCost] = field(default_factory=list)
    fusion_groups: dict[int, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        return format_summary(self)


def _node_flops(graph, node: fx.Node) -> int:
    def fake(a):
        if isinstance(a, fx.Node):
            return a.meta.get("val")
        return a

    args = torch.fx.node.map_aggregate(node.args, fake)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, fake)
    counter = FlopCounterMode(display=False)
    try:
        with graph.fake_mode, counter:
            node.target(*args, **kwargs)
    except Exception:  # an op fake tensors cannot run (rare); count it as zero, not a crash
        return 0
    return int(counter.get_total_flops())


def _nbytes(val) -> int:
    if isinstance(val, torch.Tensor):
        try:
            return int(val.numel()) * val.element_size()
        except Exception:  # symbolic shape: size depends on the batch
            return 0
    if isinstance(val, (tuple, list)):
        return sum(_nbytes(v) for v in val)
    return 0


def summarize(graph) -> GraphSummary:
    ops: Counter[str] = Counter()
    nodes: list[NodeCost] = []
    groups: dict[int, list[str]] = {}
    prev_allow = graph.fake_mode.allow_non_fake_inputs
    graph.fake_mode.allow_non_fake_inputs = True
    try:
        for n in graph.call_nodes():
            name = op_name(n)
            if name == "getitem":
                continue
            ops[name] += 1
            flops = _node_flops(graph, n)
            val = n.meta.get("val")
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else ()
            g = n.meta.get("fusion_group")
            nodes.append(NodeCost(n.name, name, shape, flops, flops // 2, _nbytes(val), g))
            if g is not None:
                groups.setdefault(g, []).append(n.name)
    finally:
        graph.fake_mode.allow_non_fake_inputs = prev_allow
    tensors = graph.constants()
    params = sum(int(t.numel()) for t in tensors.values())
    nbytes = sum(int(t.numel()) * t.element_size() for t in tensors.values())
    flops = sum(c.flops for c in nodes)
    return GraphSummary(graph.name, dict(ops.most_common()), params, nbytes, flops, flops // 2, nodes, groups)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def format_summary(s: GraphSummary, top: int = 12) -> str:
    lines = [f"graph {s.name}: {sum(s.op_counts.values())} ops, {_human(s.params)} params "
             f"({s.bytes / 2**20:.2f} MiB), {_human(s.flops)}FLOPs ({_human(s.macs)} MACs)"]
    if s.fusion_groups:
        lines.append(f"fusion groups: {len(s.fusion_groups)} (kernels)")
    lines.append("")
    lines.append("| op | count |")
    lines.append("|---|---|")
    lines += [f"| {op} | {c} |" for op, c in s.op_counts.items()]
    heavy = sorted((c for c in s.nodes if c.flops), key=lambda c: -c.flops)[:top]
    if heavy:
        lines += ["", "| node | op | output | MACs | % FLOPs | group |", "|---|---|---|---|---|---|"]
        for c in heavy:
            pct = 100 * c.flops / max(s.flops, 1)
            grp = "" if c.fusion_group is None else str(c.fusion_group)
            lines.append(f"| {c.name} | {c.op} | {list(c.shape)} | {_human(c.macs)} | {pct:.1f} | {grp} |")
    return "\n".join(lines)
