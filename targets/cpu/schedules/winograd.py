"""3x3 stride-1 convolutions by Winograd's minimal filtering, F(4x4, 3x3) and F(2x2, 3x3).

A direct 3x3 conv spends 9 multiply-adds per input channel on every output pixel.  Winograd
(Lavin & Gray, 2016) computes an m x m output tile from an (m+2) x (m+2) input tile with
(m+2)^2 products per channel pair instead of 9 m^2: 36 instead of 144 for m = 4, 16 instead
of 36 for m = 2.  The channel reduction, where the time goes, becomes (m+2)^2 independent
GEMMs.  The price is two transforms (input tiles in, output tiles out) and a larger weight
((m+2)^2 instead of 9 values per channel pair), transformed here in numpy at compile time.

Stages of the kernel (one PrimFunc; the conv's fused epilogue follows the last):

  winograd_pad        x [N, C, H, W] -> zero-padded NHWC [N, m*TH + 2, m*TW + 2, C]
  winograd_data_pack  V[e1, e2, p, c] = sum_{a,b} B[a, e1] B[b, e2] pad[tile p + (a, b), c]
  winograd_bgemm      M[e1, e2, p, k] = sum_c V[e1, e2, p, c] U[e1, e2, c, k]
  winograd_inverse    Y[n, k, y, x]   = sum_{a,b} A[a, y % m] A[b, x % m] M[a, b, tile(y, x), k]

(both transforms are computed separably, rows then columns: ``*_rows`` stages).  Channels
are the fastest axis of every intermediate, so each stage is vectorized over c or k with
contiguous loads; the pad stage pays the one NCHW -> NHWC transpose.

When it pays (``choose_tile``): the GEMMs need enough tiles per weight matrix, and the
saving must survive the tiles' overhang of the image.  resnet18 at batch 1 (2 threads):
the 56x56 and 28x28 layers take 4x4 tiles (0.49 -> 0.22 ms, 0.55 -> 0.34 ms), the 14x14
layers 2x2 tiles; the 7x7 layers stay direct.  Accuracy: F(4x4, 3x3) with TVM's
interpolation points (0, +-1, 1/2, -2) rounds about ten times more than the direct sum
(max error 1.4e-5 against 1e-6 on a 64-channel layer with outputs of magnitude 6), well
inside the fp32 tolerance (docs/TOLERANCES.md); F(2x2, 3x3) about twice.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.target import Target
from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points, const_matrix

from graphopt.rewrite import Rewrite

from . import base
from .layout import CallSite, call_rewrite_pass, constant_array, static_shape

TILES = (4, 2)  # output tile sizes m of F(m x m, 3 x 3), in order of preference
# The smallest number of tiles (GEMM rows) per weight matrix for which Winograd beats the
# direct kernel (measured on resnet18: 49 tiles win, 16 lose).
MIN_TILES = 48
# ... and the smallest saving in multiplies (``saving``) that pays for the transforms:
# resnet18's 7x7 layers at batch 8 in 2x2 tiles save 1.7x and ran no faster (3.99 vs
# 3.94 ms); its 14x14 layers in 4x4 tiles save 3.1x and ran 1.4x faster.
MIN_SAVING = 2.0
# ... and enough work to pay for four parallel passes instead of one: the small CNN's
# 32 -> 64 conv on 16x16 (4.7M multiply-adds) ran at the direct kernel's speed at batch 1
# (0.032 ms) and 1.4x faster at batch 8 (38M).
MIN_MACS = 10_000_000

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")


def transform_matrices(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A [a, m], B [a, a], G [a, 3]) of F(m x m, 3 x 3), a = m + 2:
    Y = A^T [(G g G^T) * (B^T d B)] A."""
    a, b, g = _cook_toom_convolution(_interpolation_points(tile + 1), tile, 3)
    return a.astype(np.float64), b.astype(np.float64), g.astype(np.float64)


def transform_weight(w: np.ndarray, tile: int) -> np.ndarray:
    """OIHW 3x3 weight -> U[e1, e2, C, K] = G w G^T, computed in float64."""
    _, _, g = transform_matrices(tile)
    return np.einsum("ia,kcab,jb->ijck", g, w.astype(np.float64), g).astype(w.dtype)


def tiles(shape: list[int], tile: int) -> int:
    n, _, h, w = shape
    return n * -(-h // tile) * -(-w // tile)


def choose_tile(x_shape: list[int], channels_out: int, lanes: int) -> int | None:
    """The output tile m for this conv, or None when the direct kernel is the better one.

    F(4x4) saves the most arithmetic (4x against 2.25x for F(2x2)) but needs a 4x larger
    image for the same number of tiles: resnet18's 14x14 layers at batch 1 get 16 tiles
    of 4x4 and 49 of 2x2."""
    if len(x_shape) != 4 or x_shape[1] < lanes or channels_out % lanes:
        return None
    n, c, h, w = x_shape
    if n * c * h * w * channels_out * 9 < MIN_MACS:
        return None
    return next((m for m in TILES if tiles(x_shape, m) >= MIN_TILES and saving(x_shape, m) >= MIN_SAVING), None)


def saving(x_shape: list[int], tile: int) -> float:
    """How many times fewer multiplies than the direct conv, counting the tiles' overhang
    (a 7x7 image in 2x2 tiles computes 8x8 outputs)."""
    _, _, h, w = x_shape
    covered = -(-h // tile) * tile * -(-w // tile) * tile
    return 9 * tile * tile / (tile + 2) ** 2 * (h * w) / covered


def winograd_conv2d_te(x: te.Tensor, u: te.Tensor, tile: int) -> te.Tensor:
    """3x3 stride-1 pad-1 conv of NCHW ``x`` with the transformed weight ``u`` (module doc).

    Both transforms are separable (B^T d B = rows, then columns): two reductions of 6
    taps each instead of one of 36, half the arithmetic once the zero taps are gone."""
    n_ext, c_ext, h_ext, w_ext = (int(d) for d in x.shape)
    k_ext = int(u.shape[3])
    alpha = tile + 2
    th, tw = -(-h_ext // tile), -(-w_ext // tile)
    per_image = th * tw
    a_np, b_np, _ = transform_matrices(tile)
    mat_a = const_matrix(a_np.astype("float32"), "winograd_A")
    mat_b = const_matrix(b_np.astype("float32"), "winograd_B")

    def tile_origin(p):
        return p // per_image, p % per_image // tw * tile, p % tw * tile

    pad = te.compute(
        (n_ext, th * tile + 2, tw * tile + 2, c_ext),
        lambda n, y, xx, c: tirx.if_then_else(
            tirx.all(y >= 1, y <= h_ext, xx >= 1, xx <= w_ext), x[n, c, y - 1, xx - 1], tirx.const(0.0, "float32")),
        name="winograd_pad")
    ra = te.reduce_axis((0, alpha), "ra")

    def rows(e1, b, p, c):
        n, y0, x0 = tile_origin(p)
        return te.sum(pad[n, y0 + ra, x0 + b, c] * mat_b[ra, e1], axis=ra)

    pack_rows = te.compute((alpha, alpha, n_ext * per_image, c_ext), rows, name="winograd_pack_rows")
    rb = te.reduce_axis((0, alpha), "rb")
    v = te.compute((alpha, alpha, n_ext * per_image, c_ext),
                   lambda e1, e2, p, c: te.sum(pack_rows[e1, rb, p, c] * mat_b[rb, e2], axis=rb),
                   name="winograd_data_pack")
    rc = te.reduce_axis((0, c_ext), "rc")
    m = te.compute((alpha, alpha, n_ext * per_image, k_ext),
                   lambda e1, e2, p, k: te.sum(v[e1, e2, p, rc] * u[e1, e2, rc, k], axis=rc),
                   name="winograd_bgemm")
    r1 = te.reduce_axis((0, alpha), "r1")
    inv_rows = te.compute((tile, alpha, n_ext * per_image, k_ext),
                          lambda i, b, p, k: te.sum(mat_a[r1, i] * m[r1, b, p, k], axis=r1),
                          name="winograd_inverse_rows")
    r2 = te.reduce_axis((0, alpha), "r2")
    return te.compute(
        (n_ext, k_ext, h_ext, w_ext),
        lambda n, k, y, xx: te.sum(
            inv_rows[y % tile, r2, n * per_image + y // tile * tw + xx // tile, k] * mat_a[r2, xx % tile], axis=r2),
        name="winograd_inverse")


def _winograd_rule(lanes: int) -> Rewrite:
    def match(site: CallSite):
        if not site.is_call_to(_CONV2D):
            return None
        attrs = site.call.attrs
        x, weight = site.call.args
        shape = static_shape(x.ty)
        if (not isinstance(weight, tvm.ir.expr.Constant) or shape is None
                or str(x.ty.dtype) != "float32"
                or str(attrs.out_dtype) not in ("", "None", "void", "float32")
                or int(attrs.groups) != 1
                or (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "OIHW", "NCHW")
                or [int(s) for s in attrs.strides] != [1, 1] or [int(d) for d in attrs.dilation] != [1, 1]
                or [int(p) for p in attrs.padding] != [1, 1, 1, 1]):
            return None
        w = constant_array(weight)
        tile = choose_tile(shape, w.shape[0], lanes)
        if w.shape[2:] != (3, 3) or str(w.dtype) != "float32" or tile is None:
            return None
        return w, tile

    def replace(site: CallSite, bound):
        w, tile = bound
        return site.call_te(winograd_conv2d_te, site.call.args[0], relax.const(transform_weight(w, tile), "float32"),
                            tile, primfunc_name_hint="conv2d_winograd")

    return Rewrite("conv2d-winograd", match, replace, "3x3 stride-1 float32 conv with enough tiles -> Winograd")


def winograd_convs(lanes: int) -> tvm.transform.Pass:
    """Module pass: 3x3 stride-1 float32 convs with constant weights and enough tiles become
    Winograd kernels (module doc).  Runs before ``conv_weight_to_hwio``."""
    return call_rewrite_pass("graphopt.WinogradConvs", [_winograd_rule(lanes)])


# --------------------------------------------------------------------------- schedule

_STAGES = ("winograd_pad", "winograd_pack_rows", "winograd_data_pack", "winograd_bgemm",
           "winograd_inverse_rows", "winograd_inverse")


def _block(sch, name):
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - not this kernel
        return None


def _blocks_after(sch, block) -> list:
    """The root blocks after ``block``: the conv's fused epilogue."""
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    idx = next(i for i, b in enumerate(blocks) if sch.get(b).same_as(sch.get(block)))
    return blocks[idx + 1:]


class WinogradConv2d(base.CPURule):
    """The stages of ``winograd_conv2d_te`` (pad, input transform, GEMMs, output transform)
    plus the fused epilogue."""

    def analyze(self, func: tirx.PrimFunc):
        return base.root_blocks(func)

    def match(self, info: base.FuncInfo, target: Target):
        blocks = [_block(info.sch, name) for name in _STAGES]
        return None if any(b is None for b in blocks) else blocks

    def schedule(self, info: base.FuncInfo, stages: list, target: Target):
        sch = info.sch
        pad, rows, pack, gemm, inv_rows, inverse = stages
        # The transform matrices are select chains (topi's const_matrix): inlined, they fold
        # to constants once the tap loops are unrolled, and zero taps disappear.
        for name in ("winograd_A", "winograd_B"):
            const = _block(sch, name)
            if const is not None:
                sch.compute_inline(const)
        isa = base.vector_isa(target)
        lanes = isa.lanes(32)
        cores = base.num_cores(target)
        post = base.inline_post(sch, _blocks_after(sch, inverse))
        # Image by image: at batch 8, V and M of a 64-channel 56x56 layer are 14 MB each,
        # twice through DRAM; one image's (1.8 MB) stay in L2/L3.  Each stage is a
        # parallel loop of its own under the serial image loop, scheduled consumer first
        # (compute_at regenerates a producer's loops under the image loop).
        image = _schedule_inverse(sch, inverse, inv_rows, post, lanes, cores)
        sch.compute_at(gemm, image, preserve_unit_loops=True)
        _schedule_gemm(sch, gemm, lanes, cores, isa.accumulators)
        sch.compute_at(pack, image, preserve_unit_loops=True)
        _schedule_pack(sch, pack, rows, lanes, cores)
        sch.compute_at(pad, image, preserve_unit_loops=True)
        _schedule_pad(sch, pad, lanes, cores)
        return sch


def _schedule_pad(sch, pad, lanes, cores):
    _, n, y, x, c = sch.get_loops(pad)
    rows = sch.fuse(n, y)
    if cores > 1:
        sch.parallel(rows)
    c_ext = base.loop_extent(sch, c)
    vec = base.largest_divisor(c_ext, lanes)
    if vec > 1:
        _, cv = sch.split(c, [None, vec])
        sch.vectorize(cv)


def _schedule_pack(sch, pack, rows, lanes, cores):
    """One task per (tile, channel vector): the tile's row transform stays in registers."""
    _, e1, e2, p, c, rb = sch.get_loops(pack)
    co, cv = sch.split(c, [None, lanes])
    sch.reorder(p, co, e1, e2, rb, cv)
    outer = base.spread_loops(sch, (p, co), cores, unroll=(e1, e2, rb), vectorize=cv)
    _local_transform(sch, rows, outer)
    init = sch.decompose_reduction(pack, e1)
    _unroll_vectorize(sch, init, 2)


def _local_transform(sch, block, at):
    """The first (row) half of a separable transform, per tile, in registers under ``at``."""
    sch.compute_at(block, at, preserve_unit_loops=True)
    sch.set_scope(block, 0, "local")
    loops = sch.get_loops(block)
    depth = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(at))) + 1
    *spatial, vec, red = loops[depth:]  # (e, b, tile, channels, tap)
    sch.reorder(*spatial, red, vec)
    for lp in (*spatial, red):
        sch.unroll(lp)
    sch.vectorize(vec)
    init = sch.decompose_reduction(block, spatial[0])
    _unroll_vectorize(sch, init, depth)


def _unroll_vectorize(sch, block, skip):
    loops = sch.get_loops(block)[skip:]
    for lp in loops[:-1]:
        sch.unroll(lp)
    sch.vectorize(loops[-1])


def _schedule_gemm(sch, gemm, lanes, cores, max_acc):
    _, e1, e2, p, k, rc = sch.get_loops(gemm)
    k_ext = base.loop_extent(sch, k)
    p_ext = base.loop_extent(sch, p)
    ki, rp = base.outer_product_tile(p_ext, 2 * lanes if k_ext % (2 * lanes) == 0 else lanes, lanes, max_acc)
    acc = sch.cache_write(gemm, 0, "local")
    ko, kv = sch.split(k, [None, ki])
    po, pi = sch.split(p, [None, rp])
    sch.reorder(e1, e2, ko, po, rc, pi, kv)
    base.spread_loops(sch, (e1, e2, ko), cores, unroll=(pi,), vectorize=kv)
    sch.reverse_compute_at(acc, po, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.decompose_reduction(gemm, rc)


def _schedule_inverse(sch, inverse, rows, post, lanes, cores):
    """One task per row of tiles; per (tile, channel vector) the 4x4 outputs accumulate in
    registers and are stored with the fused epilogue, 4 contiguous pixels at a time."""
    n, k, y, x, r2 = sch.get_loops(inverse)
    acc = sch.cache_write(inverse, 0, "local")
    # The accumulator tile is laid out (y, x, k): its vector axis k contiguous.
    sch.transform_layout(inverse, ("write", 0), lambda n, k, y, x: (n, y, x, k))
    tile = int(sch.get(rows).writes[0].source.shape[0])  # inverse_rows: [m, a, tiles, K]
    yo, yi = sch.split(y, [None, tile])
    xo, xi = sch.split(x, [None, tile])
    ko, kv = sch.split(k, [None, lanes])
    sch.reorder(n, yo, xo, ko, yi, xi, r2, kv)
    base.spread_loops(sch, yo, cores, unroll=(yi, xi, r2), vectorize=kv)
    _local_transform(sch, rows, ko)
    sch.reverse_compute_at(acc, ko, preserve_unit_loops=True)
    left = base.fuse_epilogue(sch, acc, post)
    for b in left:
        sch.reverse_compute_at(b, ko, preserve_unit_loops=True)
    init = sch.decompose_reduction(inverse, yi)
    _unroll_vectorize(sch, init, 4)
    wb = sch.get_loops(acc)[4:]  # (n, k, y, x) of the tile
    if len(wb) == 4:
        sch.vectorize(wb[-1])
    return n
