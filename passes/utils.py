"""Small helpers shared by passes: matching ATen ops and editing nodes."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphopt.op_kinds import is_pure  # the op vocabulary passes and targets share

aten = torch.ops.aten

__all__ = ["aten", "is_op", "is_pure", "arg", "set_arg", "shape", "single_user", "module_path"]


def is_op(node: Any, *ops: Any) -> bool:
    """``node`` calls one of ``ops`` (an OpOverload like aten.relu.default, or a packet like aten.relu)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    t = node.target
    for op in ops:
        if t is op or getattr(t, "overloadpacket", None) is op:
            return True
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of an ATen call, with its schema default."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, index: int, value: Any) -> None:
    """Set positional argument ``index``, padding skipped ones with the schema defaults."""
    args = list(node.args)
    schema = node.target._schema
    while len(args) <= index:
        a = schema.arguments[len(args)]
        args.append(a.default_value if a.has_default_value() else None)
    args[index] = value
    node.args = tuple(args)


def shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def module_path(node: fx.Node) -> str:
    """The model's own name for the layer that produced ``node`` (e.g. ``layer1.0.conv1``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    # export prefixes paths with "L['self']." in some versions; keep the user's dotted name
    return str(path).replace("L['self'].", "").replace("L__self__.", "")
