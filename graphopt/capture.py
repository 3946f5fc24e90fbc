"""Capture a ``torch.nn.Module`` as a :class:`~graphopt.graph.Graph` with ``torch.export``.

``torch.export`` gives a sound, whole-graph capture with shapes and dtypes on every node.
We then (1) run ``run_decompositions({})``, which functionalizes (``relu_`` becomes
``relu``, dropout in eval becomes ``clone``) but keeps composite ops like ``conv2d`` and
``linear`` whole, and (2) *unlift* parameters: export passes them as placeholders; we turn
them into ``get_attr`` constants of our own module so passes can fold, prune and rewrite
them without keeping an export signature in sync.

Capture failures are re-raised as :class:`CaptureError` naming the cause and, when the
traceback reaches the model's own source, the file and line that caused it.
"""

from __future__ import annotations

import inspect
import os
import traceback
import warnings
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils._sympy.numbers import int_oo

from graphopt.errors import CaptureError
from graphopt.graph import Graph, dim_name
from graphopt.signature import flatten_call


def capture(model: torch.nn.Module, example_inputs: Any = (), dynamic_shapes: Any = None,
            name: str | None = None, example_kwargs: dict[str, Any] | None = None) -> Graph:
    """Capture ``model`` (in eval mode) called as ``model(*example_inputs, **example_kwargs)``.

    ``example_inputs`` is a tensor or a tuple of tensors, ``example_kwargs`` a dict of
    keyword tensors (``{"attention_mask": mask}``). ``dynamic_shapes`` is torch.export's
    own spec, by argument name (``{"input_ids": {1: Dim("seq", max=512)}}``) or a tuple
    in argument order, or the shorthand ``"batch"`` making dimension 0 of every input
    symbolic. The graph keeps the call's structure and the output's (``graph.in_spec``,
    ``graph.out_spec``) and the range of sizes each dynamic dim was captured for.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    kwargs = normalize_kwargs(example_kwargs)
    args = normalize_inputs(example_inputs, allow_empty=bool(kwargs))
    if dynamic_shapes == "batch":
        dynamic_shapes = _batch_dims(model, args, kwargs)
    name = name or type(model).__name__

    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            ep = ep.run_decompositions({})
    except Exception as e:  # torch raises many unrelated types; we report one
        raise CaptureError(_describe_failure(model, e)) from e
    finally:
        model.train(was_training)

    gm, fake_mode = _unlift(ep)
    _keep_dynamic_dims_symbolic(gm)
    in_spec = ep.call_spec.in_spec
    flat = flatten_call(in_spec, args, kwargs)  # the placeholders' order
    graph = Graph(gm, tuple(a.detach() for a in flat), name=name, fake_mode=fake_mode)
    graph.in_spec, graph.out_spec = in_spec, ep.call_spec.out_spec
    graph.dim_ranges = _dim_ranges(gm, ep.range_constraints)
    graph.refresh_meta()
    graph.check()
    return graph


def normalize_inputs(example_inputs: Any, allow_empty: bool = False) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)) and (example_inputs or allow_empty):
        for i, x in enumerate(example_inputs):
            if not isinstance(x, torch.Tensor):
                raise CaptureError(f"example input {i} is a {type(x).__name__}; graphopt captures "
                                   "models whose inputs are tensors")
        return tuple(example_inputs)
    raise CaptureError("example_inputs must be a tensor or a non-empty tuple of tensors, "
                       f"got {type(example_inputs).__name__}")


def normalize_kwargs(example_kwargs: Any) -> dict[str, torch.Tensor]:
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, dict):
        raise CaptureError(f"example_kwargs must be a dict of tensors, got {type(example_kwargs).__name__}")
    for key, x in example_kwargs.items():
        if not isinstance(x, torch.Tensor):
            raise CaptureError(f"example keyword input {key!r} is a {type(x).__name__}; graphopt captures "
                               "models whose inputs are tensors")
    return dict(example_kwargs)


def _batch_dims(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """torch.export's spec for dimension 0 of every input being one symbolic ``batch``."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    if not kwargs:
        return tuple({0: batch} for _ in args)
    # With keywords, export wants the spec by argument name.
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"cannot capture {type(model).__name__}: the example inputs do not fit its "
                           f"forward(): {e}") from e
    return {name: {0: batch} for name in bound.arguments}


def _dim_ranges(gm: fx.GraphModule, constraints: dict[Any, Any]) -> dict[str, tuple[int, int | None]]:
    """The user's name of each dynamic input dim -> the sizes export promises the graph for."""
    ranges: dict[str, tuple[int, int | None]] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        for d in getattr(node.meta.get("val"), "shape", ()):
            if not isinstance(d, torch.SymInt):
                continue
            vr = constraints.get(d.node.expr)
            if vr is None:
                continue
            high = None if vr.upper in (int_oo, sympy.oo) else int(vr.upper)
            ranges[dim_name(d)] = (int(vr.lower), high)
    return ranges


def _unlift(ep: torch.export.ExportedProgram) -> tuple[fx.GraphModule, Any]:
    """Copy the exported graph, turning parameter/buffer/constant placeholders into get_attr."""
    root = torch.nn.Module()
    state = ep.state_dict
    constants = ep.constants
    lifted: dict[str, tuple[str, torch.Tensor, bool]] = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        if spec.kind == InputKind.PARAMETER:
            tensor, is_param = state[spec.target], True
        elif spec.kind == InputKind.BUFFER:
            tensor = state[spec.target] if spec.target in state else constants[spec.target]
            is_param = False
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            tensor, is_param = constants[spec.target], False
        else:
            raise CaptureError(f"unsupported export input kind {spec.kind} for {spec.target}")
        lifted[spec.arg.name] = (spec.target, tensor, is_param)

    scratch = _scratch_buffer_writes(ep)
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    fake_mode = None
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target in RUNTIME_ASSERTIONS:
            continue  # export re-checks dtypes/shapes at run time; our meta already fixes them
        if node.op == "output" and scratch:
            outputs = [out for out, spec in zip(node.args[0], ep.graph_signature.output_specs)
                       if spec.kind != OutputKind.BUFFER_MUTATION]
            env[node] = new_graph.output(fx.node.map_arg(tuple(outputs), lambda n: env[n]))
            continue
        if node.op == "placeholder" and node.name in lifted:
            target, tensor, is_param = lifted[node.name]
            attr = ("p_" if is_param else "b_") + target.replace(".", "_")
            if is_param:
                root.register_parameter(attr, torch.nn.Parameter(tensor.detach().clone(), requires_grad=False))
            else:
                root.register_buffer(attr, tensor.detach().clone())
            new = new_graph.get_attr(attr)
            new.meta["source"] = target  # the model's own name for it, e.g. "layer1.0.conv1.weight"
        else:
            new = new_graph.node_copy(node, lambda n: env[n])
            if node.op == "placeholder" and fake_mode is None:
                fake_mode = getattr(node.meta.get("val"), "fake_mode", None)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        env[node] = new
    if scratch:  # the writes' own work, now unread
        new_graph.eliminate_dead_code()
    # Buffers the graph never reads (e.g. BN's num_batches_tracked) become unused get_attrs.
    for node in list(new_graph.nodes):
        if node.op == "get_attr" and not node.users:
            new_graph.erase_node(node)
    # GraphModule copies only the attributes some get_attr node reaches.
    return fx.GraphModule(root, new_graph), fake_mode


# Ops that read the shape and dtype of their first argument, never its values.
_SHAPE_ONLY = {
    torch.ops.aten.zero.default, torch.ops.aten.zeros_like.default, torch.ops.aten.ones_like.default,
    torch.ops.aten.empty_like.default, torch.ops.aten.full_like.default, torch.ops.aten.fill.Scalar,
    torch.ops.aten.new_zeros.default, torch.ops.aten.new_ones.default, torch.ops.aten.new_empty.default,
    torch.ops.aten.new_full.default, torch.ops.aten.sym_size.int, torch.ops.aten.copy.default,
}


def _scratch_buffer_writes(ep: torch.export.ExportedProgram) -> list[str]:
    """The buffers ``forward`` writes in place, all of them scratch space: CaptureError otherwise.

    A compiled module is a function of its inputs. A buffer that ``forward`` overwrites before
    it reads it (a static KV cache reset at the start of every call) is scratch space: no call
    sees what an earlier one wrote, so its writes are work inside the call and the final value
    is not kept. A buffer whose value at entry is read (a cache filled across calls, running
    statistics) carries state from call to call, which a compiled function cannot keep."""
    sig = ep.graph_signature
    written = [spec.target for spec in sig.output_specs if spec.kind == OutputKind.BUFFER_MUTATION]
    if not written:
        return []
    placeholder = {spec.target: spec.arg.name for spec in sig.input_specs if spec.kind == InputKind.BUFFER}
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for target in written:
        buffer = nodes[placeholder[target]]
        readers = [u for u in buffer.users if u.target not in RUNTIME_ASSERTIONS
                   and not (u.target in _SHAPE_ONLY and u.args[0] is buffer and buffer not in u.args[1:])]
        if readers:
            trace = [ln.strip() for ln in (readers[0].meta.get("stack_trace") or "").splitlines()
                     if ln.strip().startswith("File ")]
            where = f"\n  read at {trace[-1]}" if trace else ""
            raise CaptureError(f"forward updates buffer {target!r} in place and reads the value an earlier call "
                               "left in it: a compiled module keeps no state between calls (reset the buffer "
                               f"at the start of forward, or pass the state as an input and return it){where}")
    return written


def _keep_dynamic_dims_symbolic(gm: fx.GraphModule) -> None:
    """Stop later code from silently specializing the user's dynamic dimensions.

    The graph's fake tensors share torch's ShapeEnv. Anything that asks a symbolic size for
    a Python value (``int(t.numel())`` in a cost model) gets the example value *and*
    records the guard ``s31 == 2``, which torch turns into a replacement: from then on
    every new shape meta, the output specs and the manifest say batch 2, and the graph
    (and its original) is static without anyone having asked for it. After capture there
    is no program left to guard, so on this graph's ShapeEnv such guards keep answering
    with the example value but no longer rewrite the symbols. (Passes must still not make
    structural decisions from that value; tests/test_dynamic_batch.py checks batches 1/3/8.)
    """
    placeholders = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    symbols, env = set(), None
    for val in placeholders:
        for d in getattr(val, "shape", ()):
            if isinstance(d, torch.SymInt):
                env = d.node.shape_env
                symbols |= d.node.expr.free_symbols
    if env is None or not hasattr(env, "_maybe_guard_rel"):
        return
    refine = env._maybe_guard_rel

    def guard_without_specializing(expr):
        if not (getattr(expr, "free_symbols", set()) & symbols):
            refine(expr)

    env._maybe_guard_rel = guard_without_specializing


RUNTIME_ASSERTIONS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


def _describe_failure(model: torch.nn.Module, e: BaseException) -> str:
    """One readable sentence: what torch said, and where in the user's code it happened."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    kind = _classify(str(e))
    where = _user_frame(model, e)
    msg = f"cannot capture {type(model).__name__}: {kind}{first}"
    if where:
        msg += f"\n  at {where}"
    return msg


def _classify(text: str) -> str:
    lowered = text.lower()
    if "data-dependent" in lowered or "data dependent" in lowered or "guardondatadependent" in lowered:
        return "data-dependent control flow or shape; "
    if "unsupported" in lowered and "operator" in lowered:
        return "unsupported operator; "
    return ""


def _user_frame(model: torch.nn.Module, e: BaseException) -> str | None:
    """The deepest traceback frame inside the model's source file (file:line `code`)."""
    try:
        src = os.path.abspath(inspect.getsourcefile(type(model)) or "")
    except (TypeError, OSError):  # classes defined in a REPL or `python -c` have no file
        src = ""
    frames: list[traceback.FrameSummary] = []
    exc: BaseException | None = e
    while exc is not None:
        frames.extend(traceback.extract_tb(exc.__traceback__))
        exc = exc.__cause__ or exc.__context__
    torch_dir = os.path.dirname(torch.__file__)
    mine = [f for f in frames if src and os.path.abspath(f.filename) == src]
    if not mine:  # fall back to the deepest frame outside torch and graphopt
        mine = [f for f in frames if not f.filename.startswith(torch_dir)
                and "graphopt" not in f.filename and "site-packages" not in f.filename]
    if not mine:
        return None
    f = mine[-1]
    return f"{f.filename}:{f.lineno} (`{(f.line or '').strip()}`)"


def user_inputs_of(graph: Graph) -> Sequence[fx.Node]:
    return graph.input_nodes
