"""A model's calling convention: how its positional and keyword inputs, and its outputs, are nested.

A graph (and the TVM function built from it) takes a flat list of tensors and returns one.
The model took ``(input_ids, attention_mask=mask)`` and returned a ``BaseModelOutput`` with
``last_hidden_state`` and ``pooler_output``. ``torch.export`` records both sides as pytree
``TreeSpec`` s (``ExportedProgram.call_spec``): the input spec of ``(args, kwargs)`` and the
output spec. This module flattens a call by the input spec, rebuilds outputs by the output
spec, and writes both into the artifact's manifest and reads them back.

In the manifest a spec is the JSON of ``torch.utils._pytree.treespec_dumps``. A container
type pytree cannot serialize (a dataclass registered without a ``serialized_type_name``) is
written as its plain equivalent, and a type that cannot be found when the artifact is loaded
(a HuggingFace ``ModelOutput`` where transformers is not installed) is read back as one: a
``dict`` with the same keys in the same order when the type had named fields, else a tuple.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable, Sequence

from torch.utils import _pytree as pytree

from graphopt.errors import InputError

TreeSpec = pytree.TreeSpec


# ------------------------------------------------------------------ calling
def flatten_call(in_spec: TreeSpec | None, args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
    """The flat inputs of a call ``f(*args, **kwargs)``, in the order the graph takes them.

    Keywords may come in any order; a missing or unexpected keyword, or positional inputs
    nested differently from the example the model was captured with, is an InputError.
    """
    if in_spec is None:
        if kwargs:
            raise InputError(f"this module takes positional inputs only; got keyword(s) {', '.join(kwargs)}")
        return list(args)
    args_spec, kwargs_spec = in_spec.children()
    expected = list(kwargs_spec.context or [])
    missing = [k for k in expected if k not in kwargs]
    extra = [k for k in kwargs if k not in expected]
    if missing or extra:
        problems = ([f"missing keyword input(s) {', '.join(missing)}"] if missing else []) + \
            ([f"unexpected keyword input(s) {', '.join(extra)}"] if extra else [])
        raise InputError(f"{'; '.join(problems)} (the module was compiled with keywords "
                         f"{', '.join(expected) or 'none'})")
    if len(args) != args_spec.num_children:
        raise InputError(f"expected {args_spec.num_children} positional input(s), got {len(args)}")
    leaves, spec = pytree.tree_flatten((tuple(args), {k: kwargs[k] for k in expected}))
    if spec != in_spec:
        raise InputError(f"inputs are nested as {describe(spec)}; the module was compiled for {describe(in_spec)}")
    return leaves


def takes_flat_positional(in_spec: TreeSpec | None) -> bool:
    """True when the call is just the graph's inputs in order (no keywords, no nesting)."""
    if in_spec is None:
        return True
    args_spec, kwargs_spec = in_spec.children()
    return kwargs_spec.num_children == 0 and all(c.is_leaf() for c in args_spec.children())


def output_builder(out_spec: TreeSpec | None, count: int) -> Callable[[list[Any]], Any]:
    """A function turning the graph's flat outputs into what the model returned.

    Without a spec (or one that no longer matches the outputs' count), one output comes
    back bare and several as a tuple. The common shapes skip pytree: a call on a small model
    takes a few microseconds, and rebuilding a tree costs about as much.
    """
    if out_spec is None or out_spec.num_leaves != count:
        return (lambda outs: outs[0]) if count == 1 else tuple
    if out_spec.is_leaf():
        return lambda outs: outs[0]
    if out_spec.type is tuple and all(c.is_leaf() for c in out_spec.children()):
        return tuple
    return lambda outs: pytree.tree_unflatten(list(outs), out_spec)


def describe(spec: TreeSpec | None) -> str:
    """A short readable form of a spec: ``((*, *), {attention_mask: *})``."""
    if spec is None or spec.is_leaf():
        return "*"
    inner = [describe(c) for c in spec.children()]
    if spec.type is dict:
        return "{" + ", ".join(f"{k}: {v}" for k, v in zip(spec.context, inner)) + "}"
    if spec.type is list:
        return "[" + ", ".join(inner) + "]"
    if spec.type is tuple:
        return "(" + ", ".join(inner) + ("," if len(inner) == 1 else "") + ")"
    return f"{getattr(spec.type, '__name__', spec.type)}({', '.join(inner)})"


# ----------------------------------------------------------------- manifest
def spec_to_json(spec: TreeSpec | None) -> Any:
    """The spec as a JSON value for the manifest (None stays None)."""
    if spec is None:
        return None
    try:
        text = pytree.treespec_dumps(spec)
    except Exception:  # a type registered without a serialized name: write its plain equivalent
        text = pytree.treespec_dumps(_plain(spec))
    return json.loads(text)


def spec_from_json(data: Any) -> TreeSpec | None:
    """Read a spec written by :func:`spec_to_json`; unknown container types become plain ones."""
    if data is None:
        return None
    protocol, tree = data
    return pytree.treespec_loads(json.dumps([protocol, _resolve_types(tree)]))


def _plain(spec: TreeSpec) -> TreeSpec:
    if spec.is_leaf():
        return spec
    children = [_plain(c) for c in spec.children()]
    if spec.type in (tuple, list, dict):
        return TreeSpec(spec.type, spec.context, children)
    keys = _field_names(spec.context, len(children))
    return TreeSpec(dict, keys, children) if keys else TreeSpec(tuple, None, children)


def _resolve_types(node: dict[str, Any]) -> dict[str, Any]:
    """Replace container types this process cannot rebuild by dict (named fields) or tuple."""
    name = node.get("type")
    children = [_resolve_types(c) for c in node.get("children_spec", [])]
    node = dict(node, children_spec=children)
    if name is None or _known_type(name):
        return node
    keys = _field_names(_json_or_none(node.get("context")), len(children))
    if keys:
        return dict(node, type="builtins.dict", context=json.dumps(keys))
    return dict(node, type="builtins.tuple", context="null")


def _field_names(context: Any, count: int) -> list[str] | None:
    """The children's names in a container's pytree context, when it has them: a ModelOutput's
    context is its keys; a dataclass's is (names of the fields it flattens, names of None fields)."""
    def names(c: Any) -> bool:
        return isinstance(c, (list, tuple)) and len(c) == count and all(isinstance(k, str) for k in c)

    if names(context):
        return list(context)
    if isinstance(context, (list, tuple)) and len(context) == 2 and names(context[0]):
        return list(context[0])
    return None


def _known_type(name: str) -> bool:
    """Whether pytree can rebuild the serialized type ``name``, importing its module if needed
    (a HuggingFace ModelOutput class registers itself with pytree when its module is imported)."""
    if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
        return True
    module = name.rpartition(".")[0]
    if not module:
        return False
    try:
        importlib.import_module(module)
    except Exception:  # not installed, or fails to import here: the plain fallback serves
        return False
    return name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE


def _json_or_none(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return None
