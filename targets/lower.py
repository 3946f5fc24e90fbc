"""Lower a graphopt Graph to a TVM Relax IRModule.

We reuse TVM's PyTorch importer op by op (its ``convert_map`` covers the ATen ops
``torch.export`` produces) but drive it from our graph instead of an ExportedProgram:
placeholders are the user inputs (symbolic dims become shared TIR variables, so a dynamic
batch stays dynamic), ``get_attr`` constants become Relax constants embedded in the
module, and the function always returns a tuple, so the calling convention does not
depend on the number of outputs.

Anything the importer cannot translate is reported as UnsupportedOpError naming the op,
the node and the line of the user's model it came from — never a TVM traceback.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from graphopt.errors import UnsupportedOpError
from graphopt.graph import Graph

try:  # TVM is imported lazily by graphopt; this module is only loaded when lowering.
    import tvm
    from tvm import relax, tirx
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter
except ImportError as e:  # pragma: no cover - TVM is a hard dependency
    raise ImportError(f"graphopt's TVM backend needs apache-tvm 0.27: {e}") from e


# Converters for ops TVM's importer lacks (quantize/dequantize, integer kernels, ...), keyed
# by the ATen op's ``__name__`` like the importer's own map. Modules register into it with
# ``@register_converter("quantize_per_tensor.default")``; a converter is called as
# ``fn(importer, node)`` and returns the Relax expression for the node.
EXTRA_CONVERTERS: dict[str, Callable[["GraphImporter", fx.Node], Any]] = {}
# Modules that register converters; imported on first use so TVM-free code paths stay light.
_CONVERTER_MODULES = ("graphopt.targets.ops", "graphopt.targets.quantized")


def register_converter(op_name: str):
    def wrap(fn):
        EXTRA_CONVERTERS[op_name] = fn
        return fn

    return wrap


def _load_converter_modules() -> None:
    import importlib

    for name in _CONVERTER_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but something it imports is missing
                raise


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
        self.importer_convert_map = dict(self.convert_map)  # TVM's own, for converters to defer to
        for op_name, fn in EXTRA_CONVERTERS.items():
            self.convert_map[op_name] = (lambda f: lambda node: f(self, node))(fn)
        if extra_convert_map:
            self.convert_map.update(extra_convert_map)
        self._sym_vars: dict[str, tirx.Var] = {}

    def _relax_shape(self, val: torch.Tensor) -> list[Any]:
        dims: list[Any] = []
        for d in val.shape:
            if isinstance(d, torch.SymInt):
                name = str(d)
                dims.append(self._sym_vars.setdefault(name, tirx.Var(name, "int64")))
            else:
                dims.append(int(d))
        return dims

    def check_supported(self, graph: Graph) -> None:
        for node in graph.call_nodes():
            name = node.target.__name__
            if name not in self.convert_map:
                raise UnsupportedOpError(
                    f"operator {node.target} (node {node.name!r}, from {source_location(node)}) "
                    "is not supported by the TVM backend")

    def lower(self, graph: Graph) -> tvm.IRModule:
        self.check_supported(graph)
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
        for node in graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                tensor = graph.constant(node).detach().contiguous()
                self.env[node] = relax.const(self._convert_pytorch_tensor_to_tvm(tensor))
            elif node.op == "call_function":
                self.env[node] = self._convert(node)
            elif node.op == "output":
                return [self.env[v] for v in graph.output_values()]
        raise UnsupportedOpError("graph has no output node")

    def _convert(self, node: fx.Node) -> relax.Expr:
        try:
            return self.convert_map[node.target.__name__](node)
        except UnsupportedOpError:
            raise
        except Exception as e:  # the importer asserts or raises TVM errors on odd arguments
            msg = str(e).strip().splitlines()
            raise UnsupportedOpError(
                f"operator {node.target} (node {node.name!r}, from {source_location(node)}) could not be "
                f"lowered to TVM with these arguments: {msg[-1] if msg else type(e).__name__}") from e


def lower_to_relax(graph: Graph, extra_convert_map: dict[str, Callable] | None = None) -> tvm.IRModule:
    """Translate ``graph`` into an IRModule whose ``main`` takes the user inputs and returns a tuple."""
    return GraphImporter(extra_convert_map).lower(graph)
