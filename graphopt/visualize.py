"""networkx view of a Graph, and pictures of it (Graphviz DOT text, SVG/PNG via matplotlib).

The networkx view has one vertex per computing node (inputs and ops; constants are folded
into their users' attributes so pictures stay readable) and one edge per tensor passed,
weighted by its bytes: the graph analyses of the fusion and pruning passes run on it.
"""

from __future__ import annotations

import os
import zlib

import networkx as nx
import torch
from torch.fx.experimental.symbolic_shapes import optimization_hint

from graphopt.printer import op_name, type_str

_PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
            "#d9d9d9", "#bc80bd", "#ccebc5", "#ffed6f"]


def to_networkx(graph) -> nx.DiGraph:
    g = nx.DiGraph(name=graph.name)
    for n in graph.nodes:
        if n.op == "get_attr":
            continue
        val = n.meta.get("val")
        g.add_node(n.name, op=op_name(n) if n.op == "call_function" else n.op, kind=n.op,
                   type=type_str(val) if val is not None else "",
                   shape=tuple(val.shape) if isinstance(val, torch.Tensor) else None,
                   group=n.meta.get("fusion_group"),
                   constants=[a.target for a in n.all_input_nodes if a.op == "get_attr"])
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                continue
            aval = a.meta.get("val")
            nbytes = 0
            if isinstance(aval, torch.Tensor):
                # a symbolic (dynamic) dim counts at its example size: int() on the SymInt
                # itself would guard it, i.e. specialize the graph to the example batch
                nbytes = int(optimization_hint(aval.numel())) * aval.element_size()
            g.add_edge(a.name, n.name, bytes=nbytes)
    return g


def to_dot(graph) -> str:
    g = to_networkx(graph)
    lines = [f'digraph "{graph.name}" {{', "  rankdir=TB;", '  node [shape=box, style="rounded,filled", '
             'fontname="Helvetica", fontsize=10];']
    groups: dict[int, list[str]] = {}
    for name, d in g.nodes(data=True):
        color = "#eeeeee" if d["kind"] != "call_function" else _PALETTE[zlib.crc32(d["op"].encode()) % len(_PALETTE)]
        label = f"{d['op']}\\n{d['type']}"
        lines.append(f'  "{name}" [label="{label}", fillcolor="{color}"];')
        if d["group"] is not None:
            groups.setdefault(d["group"], []).append(name)
    for gid, members in sorted(groups.items()):
        lines.append(f'  subgraph "cluster_group_{gid}" {{ label="group {gid}"; style=dashed; '
                     + " ".join(f'"{m}";' for m in members) + " }")
    for a, b in g.edges:
        lines.append(f'  "{a}" -> "{b}";')
    lines.append("}")
    return "\n".join(lines)


def draw(graph, path: str) -> str:
    """Write a picture; the format follows the file suffix (.dot, .svg, .png)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".dot":
        with open(path, "w") as f:
            f.write(to_dot(graph))
        return path
    if ext not in (".svg", ".png", ".pdf"):
        raise ValueError(f"cannot draw to {path!r}: use .dot, .svg, .png or .pdf")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = to_networkx(graph)
    for layer, names in enumerate(nx.topological_generations(g)):
        for name in names:
            g.nodes[name]["layer"] = layer
    pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal", scale=1.0)
    pos = {k: (x, -y) for k, (x, y) in pos.items()}
    depth = max((d["layer"] for _, d in g.nodes(data=True)), default=0) + 1
    fig, ax = plt.subplots(figsize=(10, max(4, 0.45 * depth)))
    colors = []
    for _, d in g.nodes(data=True):
        if d["group"] is not None:
            colors.append(_PALETTE[d["group"] % len(_PALETTE)])
        else:
            colors.append("#eeeeee" if d["kind"] != "call_function" else "#cfe2f3")
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=6, width=0.6, edge_color="#888888")
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_size=260, edgecolors="#555555", linewidths=0.5)
    labels = {n: d["op"] + ("" if d["group"] is None else f" [{d['group']}]") for n, d in g.nodes(data=True)}
    nx.draw_networkx_labels(g, pos, labels=labels, ax=ax, font_size=6)
    ax.set_title(f"{graph.name}: {g.number_of_nodes()} nodes")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
