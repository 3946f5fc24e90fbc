"""Relax-level weight re-layout that runs before LegalizeOps.

Dense conv2d kernels are vectorized over output channels (see conv2d.py), which wants
the weight's output-channel axis innermost.  PyTorch hands us OIHW, so every conv2d
whose weight is a compile-time constant is rewritten to ``kernel_layout="HWIO"`` with
the weight transposed *here, in numpy*: the transpose costs nothing at run time and no
FoldConstant is needed for it.  Activations stay NCHW, so no layout_transform ops are
added between layers.

relax.transform.ConvertLayout would do the same but crashes (std::bad_alloc) on the
transformer encoder graph in TVM 0.27, hence this small dedicated rewrite.

The rewrites here, in int8.py and in winograd.py are declared as ``graphopt.rewrite.Rewrite``
rules over Relax calls (``CallSite``) and run by one driver, ``CallRewriter``, which counts
the hits per rule (logged by ``call_rewrite_pass`` on the ``graphopt.rewrite`` logger).
Depthwise/grouped convs are left OIHW: their rule vectorizes over output width and
reads one scalar weight per tap.

Dense layers get the same treatment (``pack_dense_weights``): ``x @ W`` with a constant
``W[K, N]`` becomes a matmul against ``W`` packed as ``[N / JI, K, JI]`` panels, JI being
the matmul rule's register-tile width (matmul.gemm_j_tile).  Unpacked, a tile's walk down
K reads JI floats every N*4 bytes: a new page every row or two and, at N = 2048, every
row in the same L1 set.  Packed, each tile streams one contiguous panel (mobilenet_v2's
1280x1000 classifier: 0.76 -> 0.2 ms with cold caches, one thread).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

from graphopt.rewrite import Rewrite, counter_stats, first_match

from .matmul import gemm_j_tile

logger = logging.getLogger("graphopt.rewrite")

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE_DIMS = tvm.ir.Op.get("relax.permute_dims")


def constant_array(const) -> np.ndarray:
    # TVM 0.27 renamed relax.Constant.data to ir.expr.Constant.value.
    value = getattr(const, "value", None)
    if value is None:
        value = const.data
    return value.numpy()


def static_shape(ty) -> list[int] | None:
    """The dimensions of a Relax tensor type when all are constants; None for a symbolic
    dimension, an unknown shape or a non-tensor."""
    shape = getattr(ty, "shape", None) if isinstance(ty, relax.TensorType) else None
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values):
        return None
    return [int(d) for d in shape.values]


class FunctionRewriter(PyExprMutator):
    """Visits every Relax function of ``mod`` (subclasses decorate with ``@mutator`` and
    override ``visit_*``)."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


@dataclass(frozen=True)
class CallSite:
    """A Relax call a rule looks at, with the rewriter it can build the replacement with."""

    call: relax.Call
    rewriter: "CallRewriter"

    def is_call_to(self, op: tvm.ir.Op) -> bool:
        return self.call.op.same_as(op)

    def call_te(self, fn, *args, **kwargs):
        return self.rewriter.builder_.call_te(fn, *args, **kwargs)

    def bound_value(self, expr):
        """The expression a dataflow variable is bound to (``expr`` itself otherwise)."""
        if isinstance(expr, relax.Var):
            bound = self.rewriter.lookup_binding(expr)
            return bound if bound is not None else expr
        return expr


@mutator
class CallRewriter(FunctionRewriter):
    """Runs declared rewrites (graphopt.rewrite.Rewrite over CallSites) on every Relax call,
    innermost first; ``counts`` holds the hits per rule."""

    def __init__(self, mod: tvm.IRModule, rules: Sequence[Rewrite]):
        super().__init__(mod)
        self.rules = rules
        self.counts: Counter = Counter()

    def visit_call_(self, call):  # noqa: N802 - PyExprMutator naming
        call = super().visit_call_(call)
        site = CallSite(call, self)
        hit = first_match(self.rules, site)
        if hit is None:
            return call
        rule, binding = hit
        new = rule.replace(site, binding)
        if new is None:
            return call
        self.counts[rule.name] += 1
        return new


def call_rewrite_pass(name: str, rules: Sequence[Rewrite], *, cleanup: bool = False) -> tvm.transform.Pass:
    """A Relax module pass running ``rules`` over every call (dead bindings removed after,
    with ``cleanup``); the hits per rule are logged at DEBUG."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = CallRewriter(mod, rules)
        out = rewriter.transform()
        if rewriter.counts:
            logger.debug("%s: %s", name, counter_stats(rewriter.counts))
        return relax.transform.DeadCodeElimination()(out) if cleanup else out

    return _pass


def _hwio_weight(site: CallSite) -> np.ndarray | None:
    if not site.is_call_to(_CONV2D):
        return None
    attrs, weight = site.call.attrs, site.call.args[1]
    if (int(attrs.groups) != 1
            or (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "OIHW", "NCHW")
            or not isinstance(weight, tvm.ir.expr.Constant)):
        return None
    return constant_array(weight)


def _conv_with_hwio_weight(site: CallSite, w: np.ndarray):
    attrs = site.call.attrs
    w_hwio = relax.const(np.ascontiguousarray(w.transpose(2, 3, 1, 0)), str(w.dtype))
    return relax.op.nn.conv2d(site.call.args[0], w_hwio, strides=attrs.strides, padding=attrs.padding,
                              dilation=attrs.dilation, groups=1, data_layout="NCHW", kernel_layout="HWIO",
                              out_layout="NCHW", out_dtype=attrs.out_dtype if str(attrs.out_dtype) else None)


CONV_WEIGHT_TO_HWIO = Rewrite("conv2d-weight-hwio", _hwio_weight, _conv_with_hwio_weight,
                              "constant OIHW conv2d weight -> HWIO, transposed at compile time")
conv_weight_to_hwio = call_rewrite_pass("graphopt.ConvWeightToHWIO", [CONV_WEIGHT_TO_HWIO])


def packed_dense_te(x: te.Tensor, panels: te.Tensor, n: int) -> te.Tensor:
    """``x[..., K] @ W[K, N]`` with ``W`` given as panels ``[N / JI, K, JI]``."""
    *lead, k_ext = x.shape
    width = panels.shape[2]
    k = te.reduce_axis((0, k_ext), "k")
    return te.compute((*lead, n), lambda *i: te.sum(x[(*i[:-1], k)] * panels[i[-1] // width, k, i[-1] % width],
                                                     axis=k), name="matmul")


def _constant_weight(site: CallSite, expr) -> np.ndarray | None:
    """The [K, N] weight when ``expr`` is a constant or a transposed constant."""
    expr = site.bound_value(expr)
    if isinstance(expr, tvm.ir.expr.Constant):
        return constant_array(expr)
    if (isinstance(expr, relax.Call) and expr.op.same_as(_PERMUTE_DIMS)
            and isinstance(expr.args[0], tvm.ir.expr.Constant)):
        axes = expr.attrs.axes
        if axes is None or [int(a) for a in axes] == [1, 0]:
            w = constant_array(expr.args[0])
            return np.ascontiguousarray(w.T) if w.ndim == 2 else None
    return None


def _dense_panels(lanes: int):
    def match(site: CallSite):
        if not site.is_call_to(_MATMUL):
            return None
        x, weight = site.call.args
        w = _constant_weight(site, weight)
        sinfo = x.ty  # TVM 0.27: struct_info became ``ty``
        if (w is None or w.ndim != 2 or str(w.dtype) != "float32" or str(sinfo.dtype) != "float32"
                or str(site.call.attrs.out_dtype) not in ("", "None", "void", "float32") or sinfo.shape is None
                or not all(isinstance(d, tvm.tirx.IntImm) for d in sinfo.shape.values)):
            return None  # dynamic shapes keep the plain matmul (its tile would not be known)
        return w

    def replace(site: CallSite, w: np.ndarray):
        x = site.call.args[0]
        k_ext, n = w.shape
        rows = int(np.prod([int(d) for d in x.ty.shape.values[:-1]]))  # the rule's M (batch merged)
        width = gemm_j_tile(n, lanes, rows)
        panels = np.ascontiguousarray(w.reshape(k_ext, n // width, width).transpose(1, 0, 2))
        return site.call_te(packed_dense_te, x, relax.const(panels, "float32"), n, primfunc_name_hint="matmul_packed")

    return Rewrite("matmul-weight-panels", match, replace, "constant [K, N] matmul weight -> [N/JI, K, JI] panels")


def pack_dense_weights(lanes: int) -> tvm.transform.Pass:
    """Module pass: constant-weight float32 matmuls read their weight as panels (module doc)."""
    return call_rewrite_pass("graphopt.PackDenseWeights", [_dense_panels(lanes)], cleanup=True)
