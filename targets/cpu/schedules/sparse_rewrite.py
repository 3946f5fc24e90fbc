"""The Relax rewrite that sends sparse linear weights to the sparse kernels.

A float32 ``x @ W`` with a constant weight (or a transposed constant, which is how a linear
arrives) is checked for all-zero blocks and for N:M structure (sparse_format.py decides, per
layer, and says why on the ``graphopt.sparse`` logger); the kernel that reads the smaller share
of the weight replaces the call: block-sparse (sparse_linear.py) or N:M (sparse_nm.py). The
dense weight leaves the module, so the artifact shrinks with the sparsity.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax

from graphopt.rewrite import Rewrite

from .layout import CallSite, _constant_weight, call_rewrite_pass, static_shape
from .sparse_format import NMWeight, choose, choose_nm
from .sparse_linear import sparse_kernel
from .sparse_nm import call_nm_kernel

logger = logging.getLogger("graphopt.sparse")

_MATMUL = tvm.ir.Op.get("relax.matmul")


def _sparse_weight(lanes: int):
    def match(site: CallSite):
        if not site.is_call_to(_MATMUL):
            return None
        x, weight = site.call.args
        w = _constant_weight(site, weight)
        shape = static_shape(x.ty)
        if (w is None or w.ndim != 2 or str(w.dtype) != "float32" or shape is None or len(shape) < 2
                or str(x.ty.dtype) != "float32"
                or str(site.call.attrs.out_dtype) not in ("", "None", "void", "float32")):
            return None
        rows = int(np.prod(shape[:-1]))
        w_out_in = np.ascontiguousarray(w.T)  # (out, in), as the linear's weight
        nm_choice, nm = choose_nm(w_out_in, rows, lanes)
        choice, bsr = choose(w_out_in, rows, lanes)
        if nm is not None and (bsr is None or nm.n / nm.m < bsr.kept_share):  # the kernel reading fewer weights
            logger.info("%s", nm_choice.reason())
            return nm, shape
        if bsr is None and nm_choice is not None:  # N:M says more about this weight than its few zero blocks
            logger.info("%s", nm_choice.reason())
            return None
        if choice.notable:
            logger.info("%s", choice.reason())
        return (bsr, shape) if bsr is not None else None

    def replace(site: CallSite, found):
        weight, shape = found  # a BSRWeight or an NMWeight
        builder = site.rewriter.builder_
        out_f, in_f = weight.shape
        rows = int(np.prod(shape[:-1]))
        x = site.call.args[0]
        if len(shape) != 2:
            x = builder.emit(relax.op.reshape(x, [rows, in_f]))
        if isinstance(weight, NMWeight):
            y = call_nm_kernel(builder, x, weight, rows, lanes)
            return y if len(shape) == 2 else relax.op.reshape(builder.emit(y), [*shape[:-1], out_f])
        kernel = builder.add_func(sparse_kernel(weight, rows), "sparse_linear")
        y = relax.call_tir(kernel, [x, relax.const(weight.values, "float32"), relax.const(weight.indices, "int32"),
                                    relax.const(weight.indptr, "int32")], relax.TensorType([rows, out_f], "float32"))
        if len(shape) == 2:
            return y
        return relax.op.reshape(builder.emit(y), [*shape[:-1], out_f])

    return Rewrite("matmul-block-sparse", match, replace,
                   "constant float32 matmul weight with enough all-zero blocks (or N:M) -> block-sparse (N:M) kernel")


def sparse_linear_weights(lanes: int) -> tvm.transform.Pass:
    """Module pass: constant-weight float32 matmuls whose weight is sparse enough become
    block-sparse kernels (module doc); run before ``pack_dense_weights``, which takes the rest."""
    return call_rewrite_pass("graphopt.SparseLinearWeights", [_sparse_weight(lanes)], cleanup=True)
