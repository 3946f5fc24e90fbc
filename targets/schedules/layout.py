"""Relax-level weight re-layout that runs before LegalizeOps.

Dense conv2d kernels are vectorized over output channels (see conv2d.py), which wants
the weight's output-channel axis innermost.  PyTorch hands us OIHW, so every conv2d
whose weight is a compile-time constant is rewritten to ``kernel_layout="HWIO"`` with
the weight transposed *here, in numpy*: the transpose costs nothing at run time and no
FoldConstant is needed for it.  Activations stay NCHW, so no layout_transform ops are
added between layers.

relax.transform.ConvertLayout would do the same but crashes (std::bad_alloc) on the
transformer encoder graph in TVM 0.27, hence this small dedicated mutator.
Depthwise/grouped convs are left OIHW: their rule vectorizes over output width and
reads one scalar weight per tap.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")


def _constant_array(const) -> np.ndarray:
    # TVM 0.27 renamed relax.Constant.data to ir.expr.Constant.value.
    value = getattr(const, "value", None)
    if value is None:
        value = const.data
    return value.numpy()


@mutator
class _ConvWeightToHWIO(PyExprMutator):
    def visit_call_(self, call):  # noqa: N802 - PyExprMutator naming
        call = super().visit_call_(call)
        if not call.op.same_as(_CONV2D):
            return call
        attrs = call.attrs
        weight = call.args[1]
        if (
            int(attrs.groups) != 1
            or str(attrs.data_layout) != "NCHW"
            or str(attrs.kernel_layout) != "OIHW"
            or str(attrs.out_layout) != "NCHW"
            or not isinstance(weight, tvm.ir.expr.Constant)
        ):
            return call
        w = _constant_array(weight)
        w_hwio = relax.const(np.ascontiguousarray(w.transpose(2, 3, 1, 0)), str(w.dtype))
        return relax.op.nn.conv2d(
            call.args[0],
            w_hwio,
            strides=attrs.strides,
            padding=attrs.padding,
            dilation=attrs.dilation,
            groups=1,
            data_layout="NCHW",
            kernel_layout="HWIO",
            out_layout="NCHW",
            out_dtype=attrs.out_dtype if str(attrs.out_dtype) else None,
        )


@tvm.transform.module_pass(opt_level=0, name="graphopt.ConvWeightToHWIO")
def conv_weight_to_hwio(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite constant-weight NCHW/OIHW conv2d calls to HWIO weights (see module doc)."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            new = _ConvWeightToHWIO().visit_expr(func)
            mod[gv] = new
    return mod
