"""Lowering ``graphopt::linear_int4`` (passes/quantize/int4.py) to a TE kernel that reads int4.

The graph's packed weight (``out_features x in_features/2`` bytes, two input features per
byte) is laid out again at compile time as ``[N / TILE][K / 2][TILE]``: for one byte
column (two input features) the bytes of ``TILE`` consecutive output features are
contiguous, so the kernel's inner loop loads ``TILE`` bytes, unpacks both nibbles in
registers and multiply-accumulates a vector of output features; the scales get the same
``[N / TILE][groups][TILE]`` layout. ``TILE`` is one 64-byte cache line of packed weight,
a whole number of vectors on every CPU the rules tile for (8 x 8 fp32 lanes for AVX2,
4 x 16 for AVX-512, 16 x 4 for NEON), so the layout does not depend on the target.

Each group's dot product of the input with the unsigned nibbles is taken first, then scaled
and corrected for the nibbles' offset of 8 once per group (``int4_linear_te``); the nibble's
shift is a constant of the unrolled innermost loop; the float weight never exists.
``out_features`` is padded to a multiple of ``TILE`` with zero weights (the padded outputs
are cut off by the epilogue, which also adds the bias); ``in_features`` that is not a
multiple of the group reads zeros past its end. The schedule is
targets/cpu/schedules/int4_linear.py, which finds the reduction block by ``INT4_BLOCK_ATTR``.
"""

from __future__ import annotations

import numpy as np
import torch.fx as fx
from tvm import relax, te, tirx

from graphopt.errors import UnsupportedOpError
from graphopt.targets.frontend.lower import register_converter

TILE = 64  # output features per weight tile: 64 packed bytes, one cache line per input-feature pair
INT4_BLOCK_ATTR = "graphopt.int4_linear"  # block annotation: the tile width
_PAD_BYTE = 0x88  # two nibbles of 8: the weight 0


def tiled_weight(packed: np.ndarray, scales: np.ndarray, group: int, tile: int = TILE) -> tuple[np.ndarray, np.ndarray]:
    """(``[N/tile][groups*group/2][tile]`` uint8, ``[N/tile][groups][tile]`` float32) of the graph's
    ``(N, ceil(K/2))`` packed weight and ``(N, groups)`` scales, N padded up to a multiple of ``tile``."""
    n, groups = scales.shape
    n_pad = -(-n // tile) * tile
    bytes_ = np.full((n_pad, groups * group // 2), _PAD_BYTE, dtype=np.uint8)
    bytes_[:n, :packed.shape[1]] = packed
    s = np.zeros((n_pad, groups), dtype=np.float32)
    s[:n] = scales
    w_tiled = bytes_.reshape(n_pad // tile, tile, -1).transpose(0, 2, 1)
    s_tiled = s.reshape(n_pad // tile, tile, groups).transpose(0, 2, 1)
    return np.ascontiguousarray(w_tiled), np.ascontiguousarray(s_tiled)


def int4_linear_te(x: te.Tensor, weight: te.Tensor, scales: te.Tensor, bias: te.Tensor | None,
                   in_features: int, out_features: int, group: int):
    """``x (M, K) @ dequantize(weight).T + bias`` with the unpacking inside the reduction.

    With ``u`` the stored nibble (``q + 8``), ``sum_k x_k (u_k - 8) s_g`` is computed per group
    as ``s_g * (sum_{k in g} x_k u_k - 8 sum_{k in g} x_k)``: the innermost step is an unpack,
    a conversion and one multiply-add; the scale and the offset cost once per group."""
    n_tiles, groups, tile = (int(d) for d in scales.shape)
    half = group // 2

    def x_at(m, k):
        if in_features % group == 0:
            return x[m, k]
        return tirx.if_then_else(k < in_features, x[m, tirx.min(k, in_features - 1)], tirx.const(0.0, "float32"))

    kk = te.reduce_axis((0, group), "kk")
    x_sum = te.compute((x.shape[0], groups), lambda m, g: te.sum(x_at(m, g * group + kk), axis=kk),
                       name="linear_int4_xsum")
    kb = te.reduce_axis((0, half), "kb")
    nib = te.reduce_axis((0, 2), "nib")

    def group_dot(m, g, n):
        byte = weight[n // tile, g * half + kb, n % tile]
        u = ((byte >> (nib * 4).astype("uint8")) & tirx.const(15, "uint8")).astype("float32")
        return te.sum(x_at(m, g * group + kb * 2 + nib) * u, axis=[kb, nib])

    dots = te.compute((x.shape[0], groups, n_tiles * tile), group_dot, name="linear_int4_group")
    g = te.reduce_axis((0, groups), "g")
    acc = te.compute(
        (x.shape[0], n_tiles * tile),
        lambda m, n: te.sum(scales[n // tile, g, n % tile]
                            * (dots[m, g, n] - tirx.const(8.0, "float32") * x_sum[m, g]), axis=g),
        name="linear_int4", attrs={INT4_BLOCK_ATTR: tile})
    if bias is None and out_features == n_tiles * tile:
        return acc
    if bias is None:
        return te.compute((x.shape[0], out_features), lambda m, n: acc[m, n], name="linear_int4_out")
    return te.compute((x.shape[0], out_features), lambda m, n: acc[m, n] + bias[n], name="linear_int4_bias")


@register_converter("linear_int4.default")
def linear_int4(importer, node: fx.Node) -> relax.Expr:
    x_node, packed_node, scales_node, group = node.args[:4]
    bias_node = node.args[4] if len(node.args) > 4 else node.kwargs.get("bias")
    if packed_node.op != "get_attr" or scales_node.op != "get_attr":
        raise UnsupportedOpError(f"linear_int4 node {node.name!r}: the packed weight and scales must be constants")
    packed = importer.env[packed_node].value.numpy()
    scales = importer.env[scales_node].value.numpy()
    val = x_node.meta["val"]
    in_features = val.shape[-1]
    if not isinstance(in_features, int):
        raise UnsupportedOpError(f"linear_int4 node {node.name!r}: in_features must be static")
    out_features = packed.shape[0]
    w_tiled, s_tiled = tiled_weight(packed, scales, int(group))
    bb = importer.block_builder
    x = importer.env[x_node]
    lead = importer._relax_shape(val)[:-1]
    x2 = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, [_product(lead), in_features]))
    args = [x2, relax.const(w_tiled), relax.const(s_tiled)]
    if bias_node is not None:
        args.append(importer.env[bias_node])

    def kernel(x_te, w_te, s_te, b_te=None):
        return int4_linear_te(x_te, w_te, s_te, b_te, in_features, out_features, int(group))

    out = bb.emit_te(kernel, *args, primfunc_name_hint="linear_int4")
    if len(lead) != 1:
        out = bb.emit(relax.op.reshape(out, [*lead, out_features]))
    return out


def _product(dims):
    total = dims[0]
    for d in dims[1:]:
        total = total * d
    return total
