"""Lower a graphopt Graph to a TVM Relax IRModule.

We reuse TVM's PyTorch importer op by op (its ``convert_map`` covers the ATen ops
``torch.export`` produces) but drive it from our graph instead of an ExportedProgram:
placeholders are the user inputs (symbolic dims become shared TIR variables, so a dynamic
batch stays dynamic), ``get_attr`` constants become Relax constants embedded in the
module, and the function always returns a tuple, so the calling convention does not
depend on the number of outputs.

Anything the importer cannot translate is reported as UnsupportedOpError naming the op,
the node and the line of the user's model it came from — never a TVM traceback.

Fusion groups (``node.meta["fusion_group"]``, set by passes/fuse.py): when the graph has
any, every kernel the graph describes — each group, and each computing op outside a group
— is emitted as a private Relax function carrying the attribute ``graphopt.kernel``, called
from ``main``; free views outside groups stay inline (TVM turns them into no-copy
reshapes). In fusion mode ``"graph"`` the build (targets/build.py) marks those functions
``Primitive`` after legalization, so FuseTIR makes exactly one PrimFunc per function; any
other mode inlines them back first, which gives the plain op-by-op module.

Sizes (``sym_size.int`` of a dynamic batch, arithmetic on sizes) are not tensors: they are
TIR expressions built from the node's shape meta, with one TIR variable per symbolic dim,
named as the user named the dim ("batch"). They are never kernels nor Relax parameters of
one; a kernel whose sizes its tensor parameters do not define (a reshape to
``(batch, 4096)``, or an input of shape ``(128*batch, 256)``) takes them as an ``R.Shape``.
"""

from __future__ import annotations

from typing import Any, Callable

import sympy
import torch
import torch.fx as fx

from graphopt.errors import UnsupportedOpError
from graphopt.graph import Graph

try:  # TVM is imported lazily by graphopt; this module is only loaded when lowering.
    import tvm
    import tvm_ffi
    from tvm import relax, tirx
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter
except ImportError as e:  # pragma: no cover - TVM is a hard dependency
    raise ImportError(f"graphopt's TVM backend needs apache-tvm 0.27: {e}") from e


# Converters graphopt adds to TVM's importer, keyed by the ATen op's ``__name__`` like the
# importer's own map, in two tiers:
#  * fixes (``register_converter(op, fixes_importer=True)``) correct what TVM's importer gets
#    wrong (NaN semantics, half precision, attention's scale): they replace its entry in the
#    *base* map, ``importer.importer_convert_map``, which every other converter defers to;
#  * extras (quantize/dequantize, integer kernels, ...) sit on top of the base map.
# A converter is called as ``fn(importer, node)`` and returns the node's Relax expression;
# ``importer.tvm_convert_map`` holds TVM's untouched converters for the fixes to defer to.
FIX_CONVERTERS: dict[str, Callable[["GraphImporter", fx.Node], Any]] = {}
EXTRA_CONVERTERS: dict[str, Callable[["GraphImporter", fx.Node], Any]] = {}
# Modules that register converters; imported on first use so TVM-free code paths stay light.
_CONVERTER_MODULES = ("graphopt.targets.frontend.converters", "graphopt.targets.frontend.indexing",
                      "graphopt.targets.frontend.extra_ops", "graphopt.targets.frontend.quantized",
                      "graphopt.targets.frontend.quantized_int4")


def register_converter(op_name: str, *, fixes_importer: bool = False):
    def wrap(fn):
        (FIX_CONVERTERS if fixes_importer else EXTRA_CONVERTERS)[op_name] = fn
        return fn

    return wrap


def _load_converter_modules() -> None:
    import importlib

    for name in _CONVERTER_MODULES:
        importlib.import_module(name)


def source_location(node: fx.Node) -> str:
    """The user's line that produced ``node``, from the stack trace export recorded."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    # the deepest frame in the user's code, not inside torch.nn's own modules
    user = [ln for ln in lines if "site-packages" not in ln and "/torch/" not in ln]
    return (user or lines or ["unknown source location"])[-1]


class GraphImporter(ExportedProgramImporter):
    """TVM's ExportedProgram importer, fed from a graphopt Graph."""

    def __init__(self, extra_convert_map: dict[str, Callable[[fx.Node], Any]] | None = None):
        super().__init__()
        _load_converter_modules()
        bind = lambda f: lambda node: f(self, node)  # noqa: E731
        self.tvm_convert_map = dict(self.convert_map)
        self.importer_convert_map = {**self.tvm_convert_map, **{op: bind(f) for op, f in FIX_CONVERTERS.items()}}
        self.convert_map = {**self.importer_convert_map, **{op: bind(f) for op, f in EXTRA_CONVERTERS.items()}}
        if extra_convert_map:
            self.convert_map.update(extra_convert_map)
        self._sym_vars: dict[str, tirx.Var] = {}

    def _relax_shape(self, val: torch.Tensor) -> list[Any]:
        dims: list[Any] = []
        for d in val.shape:
            dims.append(self._tir_expr(d.node.expr) if isinstance(d, torch.SymInt) else int(d))
        return dims

    def _tir_expr(self, expr: Any) -> tirx.PrimExpr:
        """A sympy size expression of torch's ShapeEnv as a TIR expression.

        Symbols become TIR variables shared by every function of the module and named by the
        user's dim ("batch", via graph.dim_name), so TVM's messages and the IR say what the
        user called them. Only what export produces for sizes is handled: + * // % of
        integers and symbols.
        """
        if isinstance(expr, (int, sympy.Integer)):
            return tirx.IntImm("int64", int(expr))
        if isinstance(expr, sympy.Symbol):
            key = str(expr)
            if key not in self._sym_vars:
                self._sym_vars[key] = tirx.Var(self._sym_names.get(key, key), "int64")
            return self._sym_vars[key]
        args = [self._tir_expr(a) for a in expr.args]
        if isinstance(expr, sympy.Add):
            return _fold(lambda a, b: a + b, args)
        if isinstance(expr, sympy.Mul):
            return _fold(lambda a, b: a * b, args)
        name = type(expr).__name__
        if name == "FloorDiv":
            return tirx.floordiv(args[0], args[1])
        if name in ("Mod", "PythonMod"):
            return tirx.floormod(args[0], args[1])
        raise UnsupportedOpError(f"symbolic size {expr} ({name}) cannot be expressed in TVM")

    def _symbolic_scalar(self, node: fx.Node) -> Any:
        """A size-valued node (``sym_size.int``, arithmetic on sizes) as a TIR expression,
        from its shape meta; None when its value is not a symbolic size."""
        val = node.meta.get("val")
        if not isinstance(val, torch.SymInt):
            return None
        try:
            return self._tir_expr(val.node.expr)
        except UnsupportedOpError:  # an unusual size expression: let the importer try
            return None

    def check_supported(self, graph: Graph) -> None:
        for node in graph.call_nodes():
            name = node.target.__name__
            if name not in self.convert_map:
                raise UnsupportedOpError(
                    f"operator {node.target} (node {node.name!r}, from {source_location(node)}) "
                    "is not supported by the TVM backend")

    def lower(self, graph: Graph) -> tvm.IRModule:
        from graphopt.targets.frontend.decompose import decompose_unsupported

        graph = decompose_unsupported(graph, frozenset(self.convert_map))
        self.check_supported(graph)
        self._sym_names = _symbol_names(graph)
        params = []
        for node in graph.input_nodes:
            val = node.meta["val"]
            var = relax.Var(str(node.target), relax.TensorType(self._relax_shape(val),
                                                                     self._convert_data_type(val.dtype)))
            self.env[node] = var
            params.append(var)
        self.block_builder = relax.BlockBuilder()
        with self.block_builder.function(name="main", params=params):
            with self.block_builder.dataflow():
                outputs = self._translate(graph)
                out = self.block_builder.emit_output(relax.Tuple(outputs))
            self.block_builder.emit_func_output(out)
        mod = self.block_builder.get()
        return relax.transform.CanonicalizeBindings()(mod)

    def _translate(self, graph: Graph) -> list[relax.Expr]:
        kernels = kernel_partition(graph)
        for node in graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                tensor = graph.constant(node).detach().contiguous()
                self.env[node] = relax.const(self._convert_pytorch_tensor_to_tvm(tensor))
            elif node.op == "call_function":
                kernel = kernels.get(node)
                if is_size_value(node):
                    # sizes are TIR expressions, not tensors: read from the meta, which also
                    # works when the node reads the shape of a value inside a kernel
                    size = self._symbolic_scalar(node)
                    self.env[node] = size if size is not None else self._convert(node)
                elif kernel is None:
                    self.env[node] = self._convert(node)
                elif node is kernel.output:  # members come before their output in graph order
                    self.env[node] = self._emit_kernel(kernel)
            elif node.op == "output":
                return [self.env[v] for v in graph.output_values()]
        raise UnsupportedOpError("graph has no output node")

    def _emit_kernel(self, kernel: "Kernel") -> relax.Expr:
        """Emit ``kernel``'s ops as a private function and call it from the current function.

        Its parameters are the values its members read from outside: their fx inputs, plus
        any value a converter reaches past them (the integer lowering reads the scale of a
        dynamic quantization behind the dequantize node), found as free variables of a
        first emission — a kernel function that used a variable of ``main`` would fail FuseTIR.
        """
        members = set(kernel.nodes)
        inputs: list[fx.Node] = []
        for m in kernel.nodes:
            for a in m.all_input_nodes:
                # sizes (a view's symbolic batch) stay TIR expressions inside the kernel
                if a not in members and a.op != "get_attr" and a not in inputs and not is_size_value(a):
                    inputs.append(a)
        func, outer_args, constant_fields = self._kernel_function(kernel, inputs)
        free = relax.analysis.free_vars(func)
        if free:
            outer = [(n, v) for n, v in self.env.items() if isinstance(v, relax.Var)]
            missing = [next((n for n, v in outer if v.same_as(f)), None) for f in free]
            if any(n is None for n in missing):
                raise UnsupportedOpError(f"kernel {kernel.name!r}: a converter read a value that is not "
                                         "a node of the graph")
            func, outer_args, constant_fields = self._kernel_function(kernel, inputs + missing)
        gvar = self.block_builder.add_func(func, kernel.name)
        call = relax.Call(gvar, outer_args)
        if not constant_fields:
            return self.block_builder.emit(call, name_hint=kernel.output.name)
        # rebuild the tuple output in the caller: the kernel returned only its computed fields
        computed = self.block_builder.emit(call, name_hint=f"{kernel.output.name}_computed")
        if isinstance(func.ret_ty, relax.TupleType):
            parts = iter([relax.TupleGetItem(computed, j) for j in range(len(func.ret_ty.fields))])
        else:
            parts = iter([computed])
        arity = len(constant_fields) + (len(func.ret_ty.fields) if isinstance(func.ret_ty, relax.TupleType) else 1)
        fields = [constant_fields[i] if i in constant_fields else next(parts) for i in range(arity)]
        return self.block_builder.emit(relax.Tuple(fields), name_hint=kernel.output.name)

    def _kernel_function(self, kernel: "Kernel", inputs: list[fx.Node]) -> tuple[relax.Function, list, dict]:
        """(the kernel's private function with ``inputs`` as parameters, the outer arguments,
        {field index: constant} of a tuple output's constant fields, which the function omits).

        A tuple output can hold a constant (``choose_qparams``' zero point): the build lifts
        constants of a Primitive function to parameters, and FuseTIR reads a function that
        returns one of its parameters as an in-place kernel ("There must be an in-place index
        specified for each output"). So only the computed fields are returned.
        """
        outer_args = [self.env[a] for a in inputs]
        params = [relax.Var(f"p_{a.name}", arg.ty) for a, arg in zip(inputs, outer_args)]
        # Every size variable the kernel uses must be defined by its signature, or Relax
        # erases the shapes that use it (the output of a kernel on a (128*batch, 256) view
        # becomes "some 2-d tensor" and legalization of the next reshape fails). A parameter
        # of shape (batch, ...) defines ``batch``; one of shape (128*batch, ...) does not, nor
        # does a size the kernel reads (a reshape to (batch, 4096)): those symbols are passed
        # as one extra R.Shape parameter.
        defined = [v for p in params for v in relax.analysis.definable_tir_vars_in_type(p.ty)]
        used = [v for p in params for v in relax.analysis.tir_vars_in_type(p.ty)] + self._kernel_symbols(kernel)
        needed: list[tirx.Var] = []
        for v in used:
            if not any(v.same_as(d) for d in defined) and not any(v.same_as(n) for n in needed):
                needed.append(v)
        if needed:
            params.append(relax.Var("sizes", relax.ShapeType(needed)))
            outer_args = [*outer_args, relax.ShapeExpr(needed)]
        outer_bb, sub = self.block_builder, relax.BlockBuilder()
        self.block_builder = sub
        try:
            self.env.update(zip(inputs, params))
            with sub.function(kernel.name, params, attrs={KERNEL_ATTR: kernel.group}, private=True):
                with sub.dataflow():
                    for m in kernel.nodes:
                        self.env[m] = self._convert(m)
                    out, constant_fields = _split_constant_fields(self.env[kernel.output])
                    out = sub.emit_output(out)
                sub.emit_func_output(out)
        finally:
            self.block_builder = outer_bb
            self.env.update(zip(inputs, outer_args))
        built = sub.get()
        func = built[kernel.name]
        # PrimFuncs a converter emitted itself (emit_te, e.g. the NaN-propagating max pool) move
        # to the module being built; the kernel's call_tir calls are pointed at their new names
        moved = {gvar: outer_bb.add_func(f, gvar.name_hint) for gvar, f in built.functions.items()
                 if gvar.name_hint != kernel.name}
        if moved:
            func = _RenameGlobals(moved).visit_expr(func)
        return func, outer_args, constant_fields

    def _kernel_symbols(self, kernel: "Kernel") -> list[tirx.Var]:
        """The TIR size variables the sizes read by ``kernel``'s members depend on."""
        found: dict[str, tirx.Var] = {}
        for m in kernel.nodes:
            for a in m.all_input_nodes:
                val = a.meta.get("val")
                if is_size_value(a) and isinstance(val, torch.SymInt):
                    for sym in sorted(val.node.expr.free_symbols, key=str):
                        found.setdefault(str(sym), self._tir_expr(sym))
        return list(found.values())

    def _convert(self, node: fx.Node) -> relax.Expr:
        try:
            return self._with_known_shape(node, self.convert_map[node.target.__name__](node))
        except UnsupportedOpError:
            raise
        except Exception as e:  # the importer asserts or raises TVM errors on odd arguments
            msg = str(e).strip().splitlines()
            raise UnsupportedOpError(
                f"operator {node.target} (node {node.name!r}, from {source_location(node)}) could not be "
                f"lowered to TVM with these arguments: {msg[-1] if msg else type(e).__name__}") from e

    def _with_known_shape(self, node: fx.Node, expr: relax.Expr) -> relax.Expr:
        """``expr`` with the shape torch's meta gives it, where Relax lost it.

        With a symbolic size among an op's arguments (a slice up to ``seq``, a reshape to
        ``(seq, 2, 32)``) Relax's shape inference can give up and call the result a tensor of
        unknown shape, or a shape it cannot simplify (a slice of 64 rows up to ``seq`` is
        ``min(seq, 64)`` rows, where torch knows ``seq <= 64``); every op after it that needs
        a rank, or that broadcasts it with ``seq``, then fails. torch's meta knows the shape
        as an expression of the input dims: a reshape to it states it (free at run time: the VM
        makes it a view). Not a match_cast: TVM's CanonicalizeBindings crashes on one here."""
        val = node.meta.get("val")
        ty = getattr(expr, "ty", None)
        if not isinstance(val, torch.Tensor) or not isinstance(ty, relax.TensorType):
            return expr
        if ty.shape is not None and not any(isinstance(d, torch.SymInt) for d in val.shape):
            return expr
        dims = self._relax_shape(val)
        if ty.shape is not None and tvm_ffi.structural_equal(ty.shape, relax.ShapeExpr(dims)):
            return expr
        return self.block_builder.emit(relax.op.reshape(expr, dims), name_hint=node.name)


@relax.expr_functor.mutator
class _RenameGlobals(relax.PyExprMutator):
    """Replace GlobalVars by the ones ``renamed`` maps them to."""

    def __init__(self, renamed: dict):
        super().__init__()
        self.renamed = renamed

    def visit_global_var_(self, op):
        for old, new in self.renamed.items():
            if old.same_as(op):
                return new
        return op


def _split_constant_fields(out: relax.Expr) -> tuple[relax.Expr, dict[int, relax.Expr]]:
    """(``out`` without the constant fields of a tuple, {field index: constant})."""
    if not isinstance(out, relax.Tuple):
        return out, {}
    constants = {i: f for i, f in enumerate(out.fields) if isinstance(f, tvm.ir.expr.Constant)}
    if not constants or len(constants) == len(out.fields):
        return out, {}
    computed = [f for i, f in enumerate(out.fields) if i not in constants]
    return (computed[0] if len(computed) == 1 else relax.Tuple(computed)), constants


def _fold(op: Callable, args: list) -> Any:
    out = args[0]
    for a in args[1:]:
        out = op(out, a)
    return out


def is_size_value(node: fx.Node) -> bool:
    """Whether ``node`` computes a size (``sym_size.int``, arithmetic on sizes), not a tensor:
    such nodes are TIR expressions in TVM, never kernels or kernel parameters."""
    return node.op == "call_function" and isinstance(node.meta.get("val"), (torch.SymInt, int))


def _symbol_names(graph: Graph) -> dict[str, str]:
    """torch's symbol ("s31") -> the user's name for it ("batch"), from the inputs' shapes."""
    from graphopt.graph import dim_name

    names: dict[str, str] = {}
    for node in graph.input_nodes:
        for d in node.meta["val"].shape:
            if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                names[str(d.node.expr)] = dim_name(d)
    return names


# Attribute on the private Relax function of one kernel: its fusion group id, or -1 for an
# ungrouped op. targets/build.py turns these functions into Primitive ones (mode "graph").
KERNEL_ATTR = "graphopt.kernel"


# Ops whose value is a fill: they read only the shape (and dtype) of their input.
FILL_OPS = frozenset({"new_ones.default", "new_zeros.default", "new_full.default", "new_empty.default",
                      "ones_like.default", "zeros_like.default", "full_like.default", "empty_like.default"})


def is_static_fill(node: fx.Node) -> bool:
    """A fill of a static shape: a constant, even when its input depends on a dynamic size.

    It is emitted inline in ``main`` (FoldConstant makes it a constant there): a kernel made of
    it alone would fold to a function that computes nothing, which FuseTIR cannot make a
    PrimFunc of (the mask of transformers' BERT over a dynamic sequence has one)."""
    val = node.meta.get("val")
    return (node.op == "call_function" and getattr(node.target, "__name__", "") in FILL_OPS
            and isinstance(val, torch.Tensor) and not any(isinstance(d, torch.SymInt) for d in val.shape))


class Kernel:
    """The nodes the graph runs as one kernel: a fusion group, or one ungrouped op."""

    def __init__(self, name: str, nodes: list[fx.Node], group: int):
        self.name, self.nodes, self.group = name, nodes, group
        names = {n.name for n in nodes}
        self.output = next(n for n in nodes if any(u.name not in names for u in n.users))


def kernel_partition(graph: Graph) -> dict[fx.Node, Kernel]:
    """Node -> its kernel, when the graph has fusion groups; empty (op-by-op) otherwise.

    Groups are checked first (a pass after ``fuse`` may have broken one): GraphInvariantError.
    """
    from graphopt.fusion_groups import compile_time_nodes, validate_groups
    from graphopt.op_kinds import is_compute
    from graphopt.printer import op_name

    groups = validate_groups(graph)
    if not groups:
        return {}
    # Ops on constants only are emitted inline in ``main``, where the build's FoldConstant
    # evaluates them: inside a kernel function they would fold away and leave a function
    # that computes nothing, which FuseTIR cannot make a PrimFunc of. They feed a group's
    # function as a parameter (a group's output is such an op only if all its members are).
    inline = compile_time_nodes(graph)
    partition: dict[fx.Node, Kernel] = {}
    for gid, members in groups.items():
        # sizes and fills are emitted inline
        members = [m for m in members if not is_size_value(m) and m not in inline and not is_static_fill(m)]
        if not members:
            continue
        ops = [op_name(m).split(".")[0] for m in members if is_compute(m)]
        kernel = Kernel(f"group{gid}_" + "_".join(ops)[:48], members, gid)
        partition.update((m, kernel) for m in members)
    for n in graph.call_nodes():
        if n not in partition and is_compute(n) and not is_size_value(n) and n not in inline and not is_static_fill(n):
            partition[n] = Kernel(f"op_{n.name}", [n], -1)
    return partition


def lower_to_relax(graph: Graph, extra_convert_map: dict[str, Callable] | None = None) -> tvm.IRModule:
    """Translate ``graph`` into an IRModule whose ``main`` takes the user inputs and returns a tuple."""
    return GraphImporter(extra_convert_map).lower(graph)


# --- converters the importer lacks or gets wrong (found by graphopt.fuzz; tests/test_regressions.py)
@register_converter("_unsafe_view.default", fixes_importer=True)
def _unsafe_view(importer: GraphImporter, node: fx.Node) -> relax.Expr:
    """export spells ``flatten`` of a non-contiguous tensor as clone + ``_unsafe_view``: a reshape."""
    return importer._reshape(node)


@register_converter("scaled_dot_product_attention.default", fixes_importer=True)
def _sdpa(importer: GraphImporter, node: fx.Node) -> relax.Expr:
    """SDPA for 2-, 3- and 4-d inputs, honouring ``scale``.

    TVM's importer rejects 3-d inputs (``(batch, seq, dim)``, valid in torch) and drops
    the ``scale`` argument. Relax's attention wants ``(batch, seq, heads, dim)``.
    """
    q = importer.env[node.args[0]]
    rank = len(q.ty.shape)
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    scale = node.args[6] if len(node.args) > 6 else node.kwargs.get("scale")
    if dropout or node.kwargs.get("enable_gqa") or rank not in (2, 3, 4) or (mask is not None and rank != 4):
        raise UnsupportedOpError(f"operator {node.target} (node {node.name!r}, from {source_location(node)}): "
                                 f"only rank-2/3/4 inputs without dropout (and masks only at rank 4) lower to TVM")
    bb = importer.block_builder

    def to_relax(t: relax.Expr) -> relax.Expr:
        if rank == 4:  # (batch, heads, seq, dim) -> (batch, seq, heads, dim)
            return bb.emit(relax.op.permute_dims(t, [0, 2, 1, 3]))
        if rank == 2:
            t = bb.emit(relax.op.expand_dims(t, axis=0))
        return bb.emit(relax.op.expand_dims(t, axis=2))  # one head

    q4, k4, v4 = (to_relax(importer.env[a]) for a in node.args[:3])
    bias = importer.env[mask] if mask is not None else None
    if bias is not None and bias.ty.dtype == "bool":
        # a boolean mask says which keys take part; Relax's bias is added to the scores
        dtype = q.ty.dtype
        bias = bb.emit(relax.op.where(bias, relax.const(0.0, dtype), relax.const(float("-inf"), dtype)))
    out = bb.emit(relax.op.nn.attention(q4, k4, v4, bias=bias, scale=None if scale is None else float(scale),
                                        causal_mask="TopLeft" if causal else None))
    if rank == 4:
        return bb.emit(relax.op.permute_dims(out, [0, 2, 1, 3]))
    return bb.emit(relax.op.squeeze(out, axis=[0, 2] if rank == 2 else [2]))
