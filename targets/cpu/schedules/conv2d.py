"""Dense (groups=1) conv2d in NCHW with fused epilogue.

Design (the micro-kernel of oneDNN / TOPI's conv2d_NCHWc, without repacking activations):

* ``cpu_layout_passes`` stores every constant conv weight as HWIO (output channels
  innermost) at compile time, so a ``lanes``-wide vector of consecutive output channels
  is one contiguous load.  Activations stay NCHW: no layout_transform ops at run time.
* The output tile is ``RN`` output pixels of one row x ``FI`` output channels
  (FI = 1-2 vector registers).  For each (rc, ry, rx) of the reduction the kernel loads
  FI/lanes weight vectors, broadcasts RN input scalars and issues RN*FI/lanes FMAs into
  accumulators that stay in registers for the whole reduction: RN*FI/lanes at most the
  target's accumulator budget (``VectorISA.accumulators``: 24 of AVX-512's or NEON's 32
  registers, 12 of AVX2's 16), so accumulators, weight vectors and broadcast all fit.
  RN divides the row; where a 2-vector tile would leave too few pixels to hide the FMA
  latency (7- and 14-wide rows on AVX2), FI is one vector (``base.outer_product_tile``).
* The accumulator is a ``cache_write`` buffer re-laid out as (n, y, x, f) so its fast
  axis is the vectorized one; the copy back to NCHW carries the fused epilogue (BN
  affine, bias, relu, residual add, clip) by ``reverse_compute_inline``.
* Parallelism: the fused (n, f-block, y) loop.  When one f-block of weights is big
  (> 32 KiB, deep layers) the weights are instead repacked per f-block into
  (rc, ry, rx, FI) order -- a sequential stream -- and the parallel loop is (n, f-block)
  so the repack is amortized over all rows (resnet18's 512-channel 3x3: 59 -> 75 GFLOPS).
* The write-back is vectorized over pixels (contiguous NCHW stores; the epilogue, which
  includes BN's per-element division, runs on vectors).
* Padding stays a separate, parallel copy: inlining it would put a bounds check on every
  broadcast in the inner loop.
* 1x1 stride-1 convs whose H*W splits into row-aligned vector tiles take a second
  kernel (``_schedule_pointwise``): a GEMM over the fused, contiguous H*W axis with
  output channels register-blocked -- no transposed write-back, and no constraint that
  the channel count be a multiple of the vector width (mobilenet's 24-channel layers
  reach 100 GFLOPS/core this way, 5 with the general kernel).

* When the output goes to a depthwise conv as NCHW[lanes]c (blocked.py), the tile's
  channel vectors are stored as they are (no transpose), so every conv, 1x1 included,
  takes the channel-vectorized kernel.

Register tiles are always whole registers (or a power-of-two part of one): LLVM turns
odd vector widths like <24 x float> or <112 x float> into shuffle/spill-heavy code.

When the weight is not constant (OIHW at run time) the same schedule still applies;
only the weight loads become strided.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.target import Target

from .. import prefetch
from . import base


def _read_index(block, load) -> int:
    for i, region in enumerate(block.reads):
        if region.source.same_as(load.source):
            return i
    raise ValueError("weight buffer not among the block's reads")


def match_conv2d(info: base.FuncInfo):
    """(C_store, data_load, weight_load) when info.main is a dense NCHW conv2d, else None."""
    found = base.conv_mac(info)
    if found is None:
        return None
    store, a, b, iv = found
    # The weight's indices are plain iter vars and include the output channel.
    for data, weight in ((a, b), (b, a)):
        if len(data.indices) != 4 or len(weight.indices) != 4:
            continue
        if not all(isinstance(i, tirx.Var) for i in weight.indices):
            continue
        if not any(i.same_as(iv[1]) for i in weight.indices):
            continue
        # Dense conv: the data's channel index is exactly rc (grouped convs use f too).
        if not data.indices[1].same_as(iv[4]):
            return None
        return store, data, weight
    return None


def _is_hwio(block, weight) -> bool:
    """The weight is read as HWIO: layout.py's compile-time relayout of a constant weight
    (an OIHW weight is a run-time tensor: packing it would cost a copy per call)."""
    iv = [v.var for v in block.iter_vars]
    want = [iv[5], iv[6], iv[4], iv[1]]  # ry, rx, rc, f
    return all(i.same_as(v) for i, v in zip(weight.indices, want))


def _prepack_weight(sch, main, weight, fi: int) -> str:
    """Read the weight as ``[F / fi, C, KH, KW, fi]``: the order the kernel walks it.

    Read as HWIO, one f-tile's taps are C*F*4 bytes apart
    (2 KiB at F=512), which defeats the hardware prefetcher: resnet18's 512-channel
    convs, whose 9.4 MB of weights come from DRAM on every image, ran at 0.85 ms instead
    of the 0.6 ms they take with warm caches.  Packed, each f-tile is one sequential
    stream.  The pack is a root-level copy marked as a layout-rewrite preprocess:
    ``SplitLayoutRewritePreproc`` moves it out of the kernel and ``FoldConstant`` runs
    it at compile time (targets/build.py), so no copy is left at run time."""
    w_idx = _read_index(sch.get(main), weight)
    packed = sch.cache_read(main, w_idx, "global")
    sch.annotate(packed, "meta_schedule.layout_rewrite_preproc", True)
    name = sch.get(packed).writes[0].source.name
    ivs = [v.var for v in sch.get(main).iter_vars]
    rc, ry, rx, f = (next(j for j, idx in enumerate(weight.indices) if idx.same_as(v))
                     for v in (ivs[4], ivs[5], ivs[6], ivs[1]))
    sch.transform_layout(main, ("read", w_idx),
                         lambda *i: (i[f] // fi, i[rc], i[ry], i[rx], i[f] % fi))
    return name


def _unit_index(expr, var, rvar) -> bool:
    """True for ``var`` or ``var + rvar`` (stride 1; rvar has extent 1 for a 1x1 conv)."""
    if expr.same_as(var):
        return True
    return isinstance(expr, tirx.Add) and expr.a.same_as(var) and expr.b.same_as(rvar)


def _channel_tile(f_ext: int, lanes: int) -> int:
    """Output channels per tile: 2 or 1 full vectors, else a power-of-two part vector.

    Never an odd width like 24 (measured 10x slower than two 8-lane tiles)."""
    return base.register_tile(f_ext, lanes, lanes // 4) or (2 if f_ext % 2 == 0 else 1)


def _reduction_chunk(c_ext: int, per_channel: int, budget: int = 10 << 10) -> int:
    """Input channels per step of a streamed reduction (``per_channel`` weights each):
    ``budget`` bytes of weights, or 0 when that is all of them."""
    chunk = base.largest_divisor(c_ext, max(budget // (per_channel * 4), 1))
    return chunk if chunk < c_ext else 0


def _pointwise_tile(f_ext, w_ext, hw_ext, lanes, max_acc):
    """(pixels, channels) of the register tile, or None.

    The pixel tile must cover whole rows or divide a row: the write-back's region is a
    (rows x cols) box, so a tile straddling a row boundary would make it write pixels
    of the neighbouring tile.  Score = FMAs per load of one reduction step."""
    best, best_score = None, 0.0
    for vecs in range(1, 9):
        hwi = vecs * lanes
        if hw_ext % hwi or (w_ext % hwi and hwi % w_ext):
            continue
        fi = base.largest_divisor(f_ext, max(max_acc // vecs, 1))
        if not fi:
            continue
        score = fi * vecs / (fi + vecs)
        if score > best_score:
            best, best_score = (hwi, fi), score
    return best


@dataclass(frozen=True)
class ConvShape:
    """Extents of a conv's block: batch, output channels, rows, columns; input channels, taps."""

    n: int
    f: int
    y: int
    x: int
    c: int
    kh: int
    kw: int

    @staticmethod
    def of(block: tirx.SBlock) -> ConvShape:
        return ConvShape(*(int(iv.dom.extent) for iv in block.iter_vars))


@dataclass(frozen=True)
class PointwiseTile:
    """The GEMM kernel's register tile (``_schedule_pointwise``)."""

    pixels: int  # of the fused H*W axis: whole vectors
    channels: int  # output channels, each broadcast against the pixel vectors


@dataclass(frozen=True)
class ChannelTile:
    """The channel-vectorized kernel's decisions (``_schedule_channel_vectorized``)."""

    channels: int  # output channels per tile: 1-2 vectors (or a power-of-two part of one)
    pixels: int  # pixels of a row per tile, as many as the accumulator registers allow
    per_f_tile: bool  # tasks are whole f-tiles (each core streams its own weights)
    chunk: int  # input channels per step of a streamed reduction; 0: not streamed
    hwio: bool  # constant weight, read pre-packed per f-tile
    blocked_out: bool  # the output is NCHW[lanes]c: channel vectors are stored as they are


@dataclass(frozen=True)
class ConvMatch:
    data: object  # the data load
    weight: object  # the weight load
    shape: ConvShape
    lanes: int
    cores: int
    pointwise: PointwiseTile | None  # the GEMM kernel, else ``tile``
    tile: ChannelTile | None


def takes_pointwise_kernel(shape: ConvShape, data, ivs, lanes: int, max_acc: int,
                           blocked_out: bool) -> PointwiseTile | None:
    """The pointwise (GEMM) kernel's tile for a 1x1 stride-1 conv whose H*W splits into
    row-aligned vector tiles, when that kernel beats the channel-vectorized one."""
    if (blocked_out or shape.kh != 1 or shape.kw != 1 or (shape.y * shape.x) % lanes
            or not _unit_index(data.indices[2], ivs[2], ivs[5]) or not _unit_index(data.indices[3], ivs[3], ivs[6])):
        return None
    plan = _pointwise_tile(shape.f, shape.x, shape.y * shape.x, lanes, max_acc)
    if plan is None or (plan[1] <= 2 and shape.f % (2 * lanes) == 0):
        # Two output channels per tile (a 28-wide row forces a 7-vector pixel tile) lose
        # to the channel-vectorized kernel's 2 x 16 channels whenever F allows them:
        # mobilenet_v2's 192 -> 32 projection at 28x28 (with its residual add), 0.055
        # against 0.034 ms; with 3 or more channels per tile (24 -> 144 at 56x56) the
        # pointwise kernel stays ahead (0.067 against 0.114 ms).
        return None
    return PointwiseTile(*plan)


def channel_tile_width(shape: ConvShape, lanes: int, cores: int) -> int:
    """Output channels per tile: 2 vectors when possible (fewer input broadcasts per FMA).

    Weight-bound layers whose 2-vector tiles do not split evenly between the cores take
    1-vector tiles, so that each core streams its half of the weights once: mobilenet_v2's
    960 -> 160 at 7x7 has 5 tiles of 32; with 10 of 16, 0.052 -> 0.042 ms with cold weights
    (and 0.032 -> 0.037 warm: half as many FMAs per load)."""
    fi = _channel_tile(shape.f, lanes)
    weight_bound = shape.f * shape.c * shape.kh * shape.kw > 2 * shape.c * shape.y * shape.x * shape.n
    if weight_bound and fi == 2 * lanes and (shape.f // fi) % cores and (shape.f // lanes) % cores == 0:
        return lanes
    return fi


def parallel_over_f_tiles(shape: ConvShape, fi: int, cores: int) -> bool:
    """Layers whose f-tile has more than 4 KiB of weights parallelize over f-tiles only, so
    that each core streams its own half of the weights once per image instead of both cores
    re-reading all of them (needs enough f-tiles, evenly split: 5 tiles on 2 cores would
    leave one idle a fifth of the time).  At 4 KiB, mobilenet_v2's 160 -> 960 at 7x7 took
    0.038 ms with cold weights against 0.047 at 32 KiB; its 64 -> 384 and 96 -> 576 5-10%
    less."""
    f_blocks = shape.f // fi
    return f_blocks >= 2 * cores and f_blocks % cores == 0 and shape.c * shape.kh * shape.kw * fi * 4 > (4 << 10)


def streamed_chunk(shape: ConvShape, fi: int, per_f_tile: bool, hwio: bool) -> int:
    """Input channels per step of a streamed reduction, or 0.

    Per-f-tile convs stream their (packed, contiguous) weights: the reduction walks them in
    chunks of ~10 KiB, each applied to every row of the tile while it is in L1, the partial
    sums in an (L1) accumulator of the whole f-tile, and the next chunk is prefetched over
    those rows (prefetch.py).  Row by row, every row re-read the whole tile (40 KiB for
    320 -> 1280 at 7x7, 590 KiB for resnet18's 512-channel 3x3), which L1 does not hold, and
    the first row of each tile waited on memory for it: with cold weights, as they are in a
    whole network, mobilenet_v2's last conv took 0.25 ms (one thread), 0.19 chunked and
    prefetched, and resnet18's 512-channel convs 0.56 -> 0.46 ms (two threads); warm,
    within a few percent.  Only while the tile's sums fit in L1: 28x28 x 32 channels would
    round-trip to L2 once per chunk."""
    acc_in_l1 = shape.y * shape.x * fi * 4 <= (32 << 10)
    if not (per_f_tile and hwio and acc_in_l1):
        return 0
    return _reduction_chunk(shape.c, shape.kh * shape.kw * fi)


def channel_vectorized_tile(shape: ConvShape, lanes: int, cores: int, max_acc: int, hwio: bool,
                            blocked_out: bool) -> ChannelTile | None:
    """The channel-vectorized kernel's tile, or None when no tile stores whole blocks."""
    fi = channel_tile_width(shape, lanes, cores)
    if blocked_out and fi % lanes:
        return None  # a part-vector tile would not store whole blocks
    # Width tile: as many pixels of a row as accumulator registers allow (ceil: a 24-wide
    # channel tile is 16 + 8 lanes = 2 registers); on a short row, maybe 1 vector of channels.
    fi, rn = base.outer_product_tile(shape.x, fi, lanes, max_acc)
    per_f_tile = parallel_over_f_tiles(shape, fi, cores)
    return ChannelTile(fi, rn, per_f_tile, streamed_chunk(shape, fi, per_f_tile, hwio), hwio, blocked_out)


def _schedule_pointwise(sch, info: base.FuncInfo, m: ConvMatch):
    """1x1 stride-1 conv = GEMM out[F, HW] = W[F, C] x in[C, HW] on NCHW data.

    Vectorize over the fused (contiguous) H*W axis, register-block output channels, and
    write the tile straight back in NCHW (no transpose in the write-back): better than
    the channel-vectorized kernel when C is small (short reductions) or F is not a
    multiple of the vector width (mobilenet's 24-channel layers)."""
    main, lanes, cores = info.main, m.lanes, m.cores
    hwi, fi = m.pointwise.pixels, m.pointwise.channels
    hw_ext = m.shape.y * m.shape.x
    post = base.inline_post(sch, info.post)
    pre = base.inline_plain_copies(sch, info.pre)
    wb = sch.cache_write(main, 0, "local")
    n, f, y, x, rc, ry, rx = sch.get_loops(main)
    hw = sch.fuse(y, x)
    # Vector loop exactly one register wide, the register count unrolled: LLVM makes
    # poor code from odd-sized wide vectors such as <112 x float>.
    hwo, hwu, hwv = sch.split(hw, [None, hwi // lanes, lanes])
    fo, fv = sch.split(f, [None, fi])
    # hw tile outermost: its input panel (C x hwi) stays in L1 across all f tiles.
    sch.reorder(n, hwo, fo, rc, ry, rx, fv, hwu, hwv)
    if cores > 1 and (m.shape.n * hw_ext // hwi) % cores:
        # Pixel tiles that do not split evenly between the cores leave one idle for a
        # whole tile (mobilenet_v2's 28x28 layers: 7 tiles, 4 + 3); the channel tiles
        # join the parallel loop (each core still walks a contiguous run of them).
        outer = fo = sch.fuse(n, hwo, fo)
    else:
        outer = sch.fuse(n, hwo)
    base.spread_loops(sch, outer, cores, unroll=(fv, hwu), vectorize=hwv)
    sch.reverse_compute_at(wb, fo, preserve_unit_loops=True)
    left = base.fuse_epilogue(sch, wb, post)
    wl = sch.get_loops(wb)
    try:
        # The tile is whole rows or part of one: fuse (y, x) so the write-back splits
        # into whole vectors (no tail predicate that would scalarize the epilogue).
        wyx = sch.fuse(wl[-2], wl[-1])
        _, wv = sch.split(wyx, [None, lanes])
        sch.vectorize(wv)
    except Exception:  # noqa: BLE001
        pass
    for b in left:
        sch.reverse_compute_at(b, fo, preserve_unit_loops=True)
    sch.decompose_reduction(main, rc)
    for b in pre:
        base.parallel_vectorize_injective(sch, b, lanes, cores)
    return sch


def _schedule_channel_vectorized(sch, info: base.FuncInfo, m: ConvMatch, target: Target):
    """The register-tile kernel vectorized over output channels (module doc)."""
    main, lanes, cores, tile, shape = info.main, m.lanes, m.cores, m.tile, m.shape
    post = base.inline_post(sch, info.post)
    pre = base.inline_plain_copies(sch, info.pre)
    wb = sch.cache_write(main, 0, "local")
    # Accumulator laid out (n, y, x, f): vector axis f contiguous.
    sch.transform_layout(main, ("write", 0), lambda n, f, y, x: (n, y, x, f))

    n, f, y, x, rc, ry, rx = sch.get_loops(main)
    fo, fv = sch.split(f, [None, tile.channels])
    xo, xi = sch.split(x, [None, tile.pixels])
    if tile.chunk:
        rco, rci = sch.split(rc, [None, tile.chunk])
        sch.reorder(n, fo, rco, y, xo, rci, ry, rx, xi, fv)
    else:
        rco = rc
        sch.reorder(n, fo, y, xo, rc, ry, rx, xi, fv)
    outer = sch.fuse(n, fo) if tile.per_f_tile else sch.fuse(n, fo, y)
    sch.parallel(outer)
    packed = _prepack_weight(sch, main, m.weight, tile.channels) if tile.hwio else None
    sch.unroll(xi)
    sch.vectorize(fv)

    # A chunked reduction's sums are complete only after the last chunk: write them back
    # per task; otherwise per register tile.
    wb_at = outer if tile.chunk else xo
    sch.reverse_compute_at(wb, wb_at, preserve_unit_loops=True)
    left = base.fuse_epilogue(sch, wb, post)
    _write_back(sch, wb, wb_at, bool(left), tile.blocked_out, lanes, target)
    for b in left:
        sch.reverse_compute_at(b, wb_at, preserve_unit_loops=True)
    sch.decompose_reduction(main, rco)
    if tile.chunk:
        # The next chunk (after the last, the next f-tile's first) over this one's rows;
        # annotated last, so that the init loops decompose_reduction copies go without.
        chunk_bytes = tile.chunk * shape.kh * shape.kw * tile.channels * 4
        prefetch.annotate(sch, y, packed, chunk_bytes // 4,
                          prefetch.lines_per_iteration(chunk_bytes, shape.y), shape.y)
    for b in pre:  # padding copies
        base.parallel_vectorize_injective(sch, b, lanes, cores)
    return sch


def _write_back(sch, wb, at, epilogue_left: bool, blocked_out: bool, lanes: int, target: Target) -> None:
    """Order and vectorize the write-back of the (n, y, x, f) tile, epilogue folded in."""
    wb_loops = sch.get_loops(wb)[-4:]
    if len(wb_loops) != 4:
        return
    wn, wf, wy, wx = wb_loops
    if blocked_out:
        # Pixel outer, channels inner: each vector of the tile is one contiguous store.
        sch.reorder(wn, wy, wx, wf)
        _, wv = sch.split(wf, [None, lanes])
        sch.vectorize(wv)
    elif epilogue_left or not base.write_back_transposed(sch, wb, at, lanes, target):
        # (Transposed through register shuffles when it can be: resnet18's first conv alone
        # 0.53 -> 0.51 ms.)  Otherwise vector over the pixel axis: a strided gather from the
        # L1-resident accumulator, but contiguous NCHW stores and a vectorized epilogue (BN
        # affine incl. a division per element): 25% faster on resnet's first conv.
        sch.reorder(wn, wy, wf, wx)
        try:
            sch.vectorize(wx)
        except Exception:  # noqa: BLE001
            pass


class Conv2dNCHW(base.CPURule):
    """Register-blocked direct convolution: the pointwise GEMM kernel for 1x1 stride-1
    convs where it wins, else the kernel vectorized over output channels."""

    def match(self, info: base.FuncInfo, target: Target) -> ConvMatch | None:
        ops = match_conv2d(info)
        if ops is None:
            return None
        _store, data, weight = ops
        sch = info.sch
        block = sch.get(info.main)
        shape = ConvShape.of(block)
        isa = base.vector_isa(target)
        lanes = isa.lanes(block.body.buffer.dtype.bits)
        cores = base.num_cores(target)
        # Output NCHW[lanes]c (blocked.py: a depthwise conv reads it): the tile's channel
        # vectors are stored as they are, so this kernel beats the pixel-vectorized one.
        blocked_out = base.writes_channel_blocked(sch, info.post, lanes)
        ivs = [v.var for v in block.iter_vars]
        pointwise = takes_pointwise_kernel(shape, data, ivs, lanes, isa.accumulators, blocked_out)
        if pointwise is not None:
            return ConvMatch(data, weight, shape, lanes, cores, pointwise, None)
        tile = channel_vectorized_tile(shape, lanes, cores, isa.accumulators, _is_hwio(block, weight), blocked_out)
        if tile is None:
            return None
        return ConvMatch(data, weight, shape, lanes, cores, None, tile)

    def schedule(self, info: base.FuncInfo, match: ConvMatch, target: Target):
        if match.pointwise is not None:
            return _schedule_pointwise(info.sch, info, match)
        return _schedule_channel_vectorized(info.sch, info, match, target)
