"""The graph: graphopt's single source of truth.

A :class:`Graph` owns a ``torch.fx.GraphModule`` at the functional ATen level that
``torch.export`` produces (``run_decompositions({})``: no in-place ops, but ``conv2d``,
``linear``, ``layer_norm`` and ``scaled_dot_product_attention`` kept whole, so passes can
match them). Parameters, buffers and folded constants are attributes of that module,
reached through ``get_attr`` nodes: placeholders are the *user* inputs only.

Invariants (checked by :meth:`Graph.check`, run after every pass by the pass manager):

* every placeholder and ``call_function`` node carries ``meta["val"]``: a FakeTensor with
  its shape (possibly symbolic in the batch dimension) and dtype;
* every ``get_attr`` node names a tensor owned by the module, and every owned tensor is
  used (unused ones are dropped by :meth:`Graph.prune_unused_constants`);
* no node without users except the output;
* fusion decisions live in ``node.meta["fusion_group"]`` (an int) — see passes/fuse.py.

The graph runs as PyTorch (``graph(*inputs)``): that is the numerical reference every
pass and every backend is checked against.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphopt.errors import GraphInvariantError, InputError
from graphopt.summary import GraphSummary, summarize


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a graph input or output; symbolic dims are strings."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dim_name(d: torch.SymInt) -> str:
    """The user's name for a symbolic dimension: the ``torch.export.Dim`` name ("batch"),
    not torch's internal symbol ("s31"); an expression of named dims reads "2*batch".

    torch keeps the name as the debug name of the symbol's source; a dimension torch made
    dynamic on its own has none and keeps its symbol. We read the symbol's *original*
    expression (``_expr``): a pass that guarded on the example size would otherwise make
    the dim print as that number.
    """
    node = d.node
    expr = getattr(node, "_expr", None)
    env = getattr(node, "shape_env", None)
    if expr is None or env is None:
        return str(d)
    names = getattr(env, "source_name_to_debug_name", {})
    rename = {}
    for sym in getattr(expr, "free_symbols", ()):
        sources = env.var_to_sources.get(sym) or []
        name = next((names[s.name] for s in sources if s.name in names), None)
        if name:
            rename[sym] = type(sym)(name)
    return str(expr.xreplace(rename)) if rename else str(expr)


def _dim(d: Any) -> int | str:
    return int(d) if not isinstance(d, torch.SymInt) else dim_name(d)


def spec_of(name: str, val: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(_dim(d) for d in val.shape), dtype_name(val.dtype))


class Graph:
    """An ATen-level fx graph plus the tensors it owns. See the module docstring."""

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...],
                 name: str = "model", fake_mode: FakeTensorMode | None = None):
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self.name = name
        self.fake_mode = fake_mode or FakeTensorMode(allow_non_fake_inputs=True)
        # Pipeline text of the passes that produced this graph (appended by the pass manager).
        self.history: list[str] = []
        # Free-form per-graph records that passes leave for later stages (calibration ranges, ...).
        self.annotations: dict[str, Any] = {}
        # How the model is called and what it returns (graphopt/signature.py): pytree specs of
        # ``(args, kwargs)`` and of the outputs, as torch.export recorded them; None for a
        # graph called with its flat inputs that returns a flat tuple.
        self.in_spec: Any = None
        self.out_spec: Any = None
        # The sizes each named dynamic dim may take, inclusive; max None when unbounded.
        self.dim_ranges: dict[str, tuple[int, int | None]] = {}

    # ----------------------------------------------------------------- access
    @property
    def fx_graph(self) -> fx.Graph:
        return self.gm.graph

    @property
    def nodes(self) -> Iterable[fx.Node]:
        return self.gm.graph.nodes

    def call_nodes(self) -> Iterator[fx.Node]:
        return (n for n in self.gm.graph.nodes if n.op == "call_function")

    @property
    def input_nodes(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    @property
    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")

    def output_values(self) -> list[fx.Node]:
        out = self.output_node.args[0]
        return list(out) if isinstance(out, (tuple, list)) else [out]

    @property
    def input_specs(self) -> list[TensorSpec]:
        return [spec_of(str(n.target), n.meta["val"]) for n in self.input_nodes]

    @property
    def output_specs(self) -> list[TensorSpec]:
        return [spec_of(f"output{i}", n.meta["val"]) for i, n in enumerate(self.output_values())]

    def constant(self, node: fx.Node) -> torch.Tensor:
        """The tensor behind a ``get_attr`` node."""
        return getattr(self.gm, node.target)

    def is_constant(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node.op == "get_attr"

    def constants(self) -> dict[str, torch.Tensor]:
        return {n.target: self.constant(n) for n in self.nodes if n.op == "get_attr"}

    # -------------------------------------------------------------- mutation
    def add_constant(self, tensor: torch.Tensor, name_hint: str, before: fx.Node | None = None,
                     keep_strides: bool = False) -> fx.Node:
        """Register ``tensor`` on the module and return a ``get_attr`` node for it.

        ``keep_strides`` keeps a folded value's memory layout: kernels such as matmul pick
        their algorithm by layout, so a transposed constant made contiguous would round
        differently from the value computed at run time.
        """
        base = re.sub(r"[^0-9a-zA-Z_]", "_", name_hint) or "const"
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        copy_ = tensor.detach().clone()  # clone preserves strides of dense tensors
        self.gm.register_buffer(name, copy_ if keep_strides else copy_.contiguous())
        anchor = before if before is not None else self._first_non_placeholder()
        with self.fx_graph.inserting_before(anchor):
            node = self.fx_graph.get_attr(name)
        node.meta["val"] = self.fake_mode.from_tensor(getattr(self.gm, name), static_shapes=True)
        return node

    def set_constant(self, node: fx.Node, tensor: torch.Tensor) -> None:
        """Replace the tensor behind a get_attr node (e.g. after BN folding or pruning)."""
        old = getattr(self.gm, node.target)
        new = tensor.detach().clone().contiguous()
        if isinstance(old, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            delattr(self.gm, node.target)
            self.gm.register_parameter(node.target, new)
        else:
            delattr(self.gm, node.target)
            self.gm.register_buffer(node.target, new)
        node.meta["val"] = self.fake_mode.from_tensor(new, static_shapes=True)

    def _first_non_placeholder(self) -> fx.Node:
        return next(n for n in self.nodes if n.op != "placeholder")

    def prune_unused_constants(self) -> int:
        """Drop get_attr nodes without users and the tensors no node reaches."""
        removed = 0
        for node in list(self.nodes):
            if node.op == "get_attr" and not node.users:
                self.fx_graph.erase_node(node)
                removed += 1
        used = {n.target for n in self.nodes if n.op == "get_attr"}
        for name in [k for k, _ in self.gm.named_parameters(recurse=False)] + \
                [k for k, _ in self.gm.named_buffers(recurse=False)]:
            if name not in used:
                delattr(self.gm, name)
        return removed

    def recompile(self) -> None:
        """Regenerate code and shape/dtype meta after a structural change."""
        self.fx_graph.lint()
        self.gm.recompile()
        self.refresh_meta()

    def refresh_meta(self) -> None:
        """Recompute ``meta["val"]`` of every node with torch's own fake-tensor propagation."""
        fake_inputs = [n.meta["val"] for n in self.input_nodes]
        mode = self.fake_mode
        # get_attr tensors are real; let the mode wrap them on the fly.
        prev, mode.allow_non_fake_inputs = mode.allow_non_fake_inputs, True
        try:
            FakeTensorProp(self.gm, mode).propagate_dont_convert_inputs(*fake_inputs)
        finally:
            mode.allow_non_fake_inputs = prev
        for n in self.nodes:
            if n.op == "get_attr" and not isinstance(n.meta.get("val"), FakeTensor):
                n.meta["val"] = mode.from_tensor(self.constant(n), static_shapes=True)
            elif n.op == "call_function":
                n.meta.setdefault("val", None)  # ops returning nothing (runtime assertions)

    def check(self) -> None:
        """Assert the invariants in the module docstring; raise GraphInvariantError."""
        try:
            self.fx_graph.lint()
        except Exception as e:  # fx's lint raises a bare RuntimeError
            raise GraphInvariantError(f"graph {self.name!r} is malformed: {e}") from e
        for n in self.nodes:
            if n.op in ("placeholder", "call_function", "get_attr") and "val" not in n.meta:
                raise GraphInvariantError(f"node {n.name!r} ({n.op}) has no shape/dtype meta")
            if n.op == "get_attr" and not hasattr(self.gm, n.target):
                raise GraphInvariantError(f"get_attr node {n.name!r} names missing tensor {n.target!r}")
            if n.op == "call_function" and not n.users:
                raise GraphInvariantError(f"node {n.name!r} has no users (dead code left behind)")
            if n.op == "call_module":
                raise GraphInvariantError(f"node {n.name!r} calls a submodule; graphs are flat")

    # --------------------------------------------------------------- running
    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the graph on its flat inputs; returns its flat outputs as a tuple.

        This is the form passes, verification, the fuzzer and bisect compare; :meth:`forward`
        is the model's own interface.
        """
        self.validate_inputs(inputs)
        with torch.no_grad():
            out = self.gm(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the graph called as the model is called (its positional and keyword inputs)
        and return what the model returns: a tensor, or its tuple/list/dict/dataclass/
        ModelOutput structure."""
        from graphopt.signature import flatten_call, output_builder

        flat = self(*flatten_call(self.in_spec, args, kwargs))
        return output_builder(self.out_spec, len(flat))(list(flat))

    def validate_inputs(self, inputs: tuple[Any, ...]) -> None:
        specs = self.input_specs
        if len(inputs) != len(specs):
            raise InputError(f"{self.name}: expected {len(specs)} input(s) "
                             f"({', '.join(s.name for s in specs)}), got {len(inputs)}")
        for spec, x in zip(specs, inputs):
            if not isinstance(x, torch.Tensor):
                raise InputError(f"input {spec.name!r}: expected a torch.Tensor, got {type(x).__name__}")
            check_shape(spec, tuple(x.shape), dtype_name(x.dtype))
        check_dim_sizes(specs, [tuple(x.shape) for x in inputs], self.dim_ranges)

    def module(self) -> torch.nn.Module:
        """A runnable ``torch.nn.Module`` (a copy: changing it does not change the graph)."""
        return copy.deepcopy(self.gm)

    def copy(self) -> "Graph":
        gm = copy.deepcopy(self.gm)
        g = Graph(gm, self.example_inputs, self.name, self.fake_mode)
        g.history = list(self.history)
        g.annotations = copy.deepcopy(self.annotations)
        g.in_spec, g.out_spec, g.dim_ranges = self.in_spec, self.out_spec, dict(self.dim_ranges)
        return g

    # -------------------------------------------------------------- analysis
    def summary(self) -> GraphSummary:
        return summarize(self)

    def to_networkx(self):
        from graphopt.visualize import to_networkx

        return to_networkx(self)

    def draw(self, path: str) -> str:
        """Write a picture of the graph: ``.dot`` (Graphviz text), ``.svg`` or ``.png``."""
        from graphopt.visualize import draw

        return draw(self, path)

    def __str__(self) -> str:
        from graphopt.printer import print_graph

        return print_graph(self)


def check_shape(spec: TensorSpec, shape: tuple[int, ...], dtype: str) -> None:
    """Raise InputError when a concrete shape/dtype does not fit a (maybe symbolic) spec."""
    if dtype != spec.dtype:
        raise InputError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {dtype}")
    symbolic = [d for d in spec.shape if isinstance(d, str)]
    shown = str(tuple(spec.shape)).replace("'", "")  # (batch, 3, 32, 32), not ('batch', 3, 32, 32)
    if symbolic:  # name the dims that vary, or "(batch, 4)" could read like a typo
        shown += f" where {', '.join(dict.fromkeys(symbolic))} can be any size"
    if len(shape) != len(spec.shape):
        raise InputError(f"input {spec.name!r}: expected rank {len(spec.shape)} "
                         f"(shape {shown}), got rank {len(shape)} (shape {shape})")
    for axis, (want, got) in enumerate(zip(spec.shape, shape)):
        if isinstance(want, int) and want != got:
            raise InputError(f"input {spec.name!r}: expected shape {shown}, got {shape} "
                             f"(dimension {axis} must be {want})")


def check_dim_sizes(specs: list[TensorSpec], shapes: list[tuple[int, ...]],
                    ranges: dict[str, tuple[int, int | None]]) -> None:
    """Raise InputError when a named dynamic dim has different sizes in two inputs, or a size
    outside the range it was captured for (the compiled code is only valid inside it)."""
    sizes: dict[str, tuple[int, str]] = {}
    for spec, shape in zip(specs, shapes):
        for want, got in zip(spec.shape, shape):
            if not isinstance(want, str):
                continue
            seen = sizes.setdefault(want, (got, spec.name))
            if seen[0] != got:
                raise InputError(f"input {spec.name!r}: dimension {want} is {got} here but {seen[0]} "
                                 f"in input {seen[1]!r}")
            low, high = ranges.get(want, (0, None))
            if got < low or (high is not None and got > high):
                shown = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise InputError(f"input {spec.name!r}: dimension {want} is {got}, outside the range "
                                 f"{shown} the module was compiled for")
