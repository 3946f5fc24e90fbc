"""Readable IR text for a Graph: one line per node with its type, as in MLIR or Relax.

    graph Net(x: f32[1, 3, 32, 32]) -> (f32[1, 10])
      %conv2d: f32[1, 32, 32, 32] = conv2d(%x, @p_c1_weight, @p_c1_bias, [1, 1], [1, 1])  # group 0
      return (%linear,)

Constants print as ``@name`` with their shapes listed once in the header; fusion groups
and calibration ranges (``node.meta``) print as trailing comments, so IR dumps show them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int64": "i64",
          "int32": "i32", "int8": "i8", "uint8": "u8", "bool": "i1"}


def type_str(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dt = str(val.dtype).removeprefix("torch.")
        return f"{_SHORT.get(dt, dt)}[{', '.join(str(d) for d in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(type_str(v) for v in val) + ")"
    return type(val).__name__


def _arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"@{a.target}" if a.op == "get_attr" else f"%{a.name}"
    if isinstance(a, (tuple, list)):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    if isinstance(a, float):
        return f"{a:g}"
    return repr(a) if isinstance(a, str) else str(a)


def op_name(node: fx.Node) -> str:
    t = node.target
    if node.op != "call_function":
        return node.op
    name = getattr(t, "__name__", str(t))
    if name == "getitem":
        return "getitem"
    # aten.conv2d.default -> conv2d; keep non-default overloads visible (add.Tensor).
    base, _, overload = name.partition(".")
    return base if overload in ("default", "") else f"{base}.{overload}"


def print_graph(graph) -> str:
    ins = ", ".join(f"{n.target}: {type_str(n.meta.get('val'))}" for n in graph.input_nodes)
    outs = ", ".join(type_str(n.meta.get("val")) for n in graph.output_values())
    lines = [f"graph {graph.name}({ins}) -> ({outs})"]
    consts = [n for n in graph.nodes if n.op == "get_attr"]
    if consts:
        lines.append("  // constants:")
        for n in consts:
            lines.append(f"  //   @{n.target}: {type_str(graph.constant(n))}")
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            continue
        if n.op == "output":
            lines.append(f"  return ({', '.join(_arg(v) for v in graph.output_values())},)")
            continue
        args = [_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()]
        comment = []
        if "fusion_group" in n.meta:
            comment.append(f"group {n.meta['fusion_group']}")
        if "qrange" in n.meta:
            lo, hi = n.meta["qrange"]
            comment.append(f"range [{lo:.4g}, {hi:.4g}]")
        tail = f"  # {'; '.join(comment)}" if comment else ""
        lines.append(f"  %{n.name}: {type_str(n.meta.get('val'))} = {op_name(n)}({', '.join(args)}){tail}")
    return "\n".join(lines)
