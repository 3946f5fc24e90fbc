"""``torch.compile(model, backend="graphopt")``: graphopt as a TorchDynamo backend.

Dynamo cuts a model's Python into FX graphs at every graph break (a ``print``, a
``.item()`` branching on data) and hands each graph to the backend. Each one is compiled
here with :func:`graphopt.compile`; the Python between them stays Python. A graph graphopt
cannot capture or build runs eagerly instead, with a warning on the ``graphopt.dynamo``
logger that says why, so a model works as a whole even where one piece is not supported.

Dynamo passes a module's parameters and buffers to its graphs as inputs. They are bound
into the compiled graph as constants (so passes can fold them and the build can re-lay
them out), and every call checks they are still the same tensors, unmodified (their
version counters): weights changed after compiling run that call eagerly.

When a second call changes a shape, Dynamo asks again with that dimension symbolic; those
dims become dynamic dims of the graphopt build, so one build serves every size.

An inference backend: outputs carry no autograd history. Options, all optional::

    torch.compile(model, backend="graphopt", options={"target": "x86", "pipeline": "fold"})

``target`` (default ``"x86"``), ``pipeline`` (default ``"default"``), and any other keyword of
:func:`graphopt.compile` (``fusion``, ``tune``, ...).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

log = logging.getLogger("graphopt.dynamo")

BACKEND_NAME = "graphopt"


def graphopt_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None,
                     mode: str | None = None) -> Callable[..., Any]:
    """Compile one Dynamo graph with graphopt; returns a callable taking the graph's inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if _op_count(gm) == 0:
        return gm.forward  # nothing to compute (Dynamo's empty graphs around a break)
    options = dict(options or {})
    target = options.pop("target", "x86")
    options.setdefault("pipeline", "default")
    try:
        bound = _BoundGraph(gm, placeholders, list(example_inputs))
        import graphopt

        # torch.export runs its own trace; outside Dynamo's tracing context, or the guards of
        # that trace land among the guards of the frame Dynamo is compiling.
        with torch._guards.tracing(None):
            compiled = graphopt.compile(bound, target, example_inputs=bound.user_examples,
                                        dynamic_shapes=bound.dynamic_shapes, **options)
    except Exception as e:  # any failure to capture or build: this graph stays eager
        first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
        log.warning("graphopt: running a %d-op graph eagerly: %s: %s", _op_count(gm), type(e).__name__, first)
        return gm.forward
    return CompiledSubgraph(gm, bound, compiled)


class _BoundGraph(torch.nn.Module):
    """A Dynamo graph with its parameter/buffer inputs bound as buffers and its size inputs
    (SymInts of a dynamic dim) read from the tensors that carry them; called with the user
    tensors only."""

    def __init__(self, gm: fx.GraphModule, placeholders: list[fx.Node], examples: list[Any]):
        super().__init__()
        self.gm = gm
        self.arity = len(placeholders)
        self.constant_slots: dict[int, torch.Tensor] = {}
        self.user_slots: list[int] = []
        self.size_slots: dict[int, tuple[int, int]] = {}  # slot -> (user tensor index, dim)
        symbols: dict[Any, tuple[int, int]] = {}
        for slot, (node, value) in enumerate(zip(placeholders, examples)):
            if isinstance(value, torch.Tensor) and _is_module_state(node, value):
                self.constant_slots[slot] = value
                self.register_buffer(f"c{slot}", value.detach(), persistent=False)
            elif isinstance(value, torch.Tensor):
                fake = node.meta.get("example_value")
                for dim, size in enumerate(getattr(fake, "shape", ())):
                    if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                        symbols.setdefault(size.node.expr, (len(self.user_slots), dim))
                self.user_slots.append(slot)
        for slot, (node, value) in enumerate(zip(placeholders, examples)):
            if slot in self.constant_slots or slot in self.user_slots:
                continue
            expr = getattr(getattr(node.meta.get("example_value"), "node", None), "expr", None)
            if expr not in symbols:
                raise TypeError(f"graph input {node.name} is a {type(value).__name__}, not a tensor or a tensor's size")
            self.size_slots[slot] = symbols[expr]
        self.user_examples = tuple(examples[s] for s in self.user_slots)
        self.dynamic_shapes = _dynamic_dims(placeholders, self.user_slots, symbols) if symbols else None

    def forward(self, *user: torch.Tensor) -> Any:
        args: list[Any] = [None] * self.arity
        for slot, x in zip(self.user_slots, user):
            args[slot] = x
        for slot in self.constant_slots:
            args[slot] = getattr(self, f"c{slot}")
        for slot, (index, dim) in self.size_slots.items():
            args[slot] = user[index].shape[dim]
        return self.gm(*args)


def _is_module_state(node: fx.Node, value: torch.Tensor) -> bool:
    """A parameter or buffer of a module, as Dynamo lifts them into a graph's inputs."""
    if isinstance(value, torch.nn.Parameter):
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    return source is not None and "._buffers[" in source.name


def _dynamic_dims(placeholders: list[fx.Node], user_slots: list[int], symbols: dict[Any, tuple[int, int]]):
    """torch.export's dynamic_shapes for the user tensors: one Dim per Dynamo symbol (nested
    once: they are all the ``*user`` argument of :meth:`_BoundGraph.forward`)."""
    dims = {sym: torch.export.Dim(str(sym)) for sym in symbols}
    spec = []
    for slot in user_slots:
        fake = placeholders[slot].meta.get("example_value")
        spec.append({d: dims[s.node.expr] for d, s in enumerate(getattr(fake, "shape", ()))
                     if isinstance(s, torch.SymInt) and s.node.expr in dims} or None)
    return (tuple(spec),)


def _op_count(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))


class CompiledSubgraph:
    """What the backend returns for a graph it compiled: calls ``module`` (the
    CompiledModule) with the user tensors; runs eagerly when the bound weights changed."""

    def __init__(self, gm: fx.GraphModule, bound: _BoundGraph, module: Any):
        self.gm, self.bound, self.module = gm, bound, module
        self.versions = {slot: (t, t._version) for slot, t in bound.constant_slots.items()}
        self.warned = False

    def __call__(self, *args: Any) -> Any:
        for slot, (tensor, version) in self.versions.items():
            if args[slot] is not tensor or tensor._version != version:
                if not self.warned:
                    log.warning("graphopt: weights changed since this graph was compiled; running it eagerly")
                    self.warned = True
                return self.gm(*args)
        out = self.module(*(args[s] for s in self.bound.user_slots))
        return list(out) if isinstance(out, list) else out


def register() -> None:
    """Make ``backend="graphopt"`` known to ``torch.compile`` where the package's entry point
    is not installed (a source tree on ``sys.path``); idempotent."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if BACKEND_NAME not in _COMPILER_FNS:
        register_backend(graphopt_backend, name=BACKEND_NAME)
