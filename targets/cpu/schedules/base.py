"""Shared helpers for graphopt's CPU schedule rules.

Every rule is a ``CPURule``: ``match(info, target)`` reads the analyzed PrimFunc and
returns what scheduling it needs (operands, tile sizes: the rule's decisions) or None when
the rule does not apply, changing nothing; ``schedule(info, match, target)`` carries those
decisions out on ``info.sch``.  The base class owns the rest of TVM's dlight
``ScheduleRule.apply(func, target, tunable)`` contract.  The helpers here answer the
questions every rule asks:

* how wide is a vector register on this target, how many registers may a register tile
  hold as accumulators (``vector_isa``, ``simd_lanes``), and how many cores does it have
  (``num_cores``) -- all read from the target, never from the host, so that a cross build
  for aarch64 gets NEON-sized tiles and an AVX2 build gets 16-register tiles;
* what is the structure of the PrimFunc (``analyze``): the one "main" block a rule
  schedules (a reduction for conv/matmul/pool, the last block for injective funcs),
  the producers before it (padding) and the fused epilogue after it;
* how to fold a fused epilogue into the main block's output tile (``fuse_epilogue``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from tvm import ir, s_tir, tirx
from tvm.s_tir.dlight import ScheduleRule
from tvm.target import Target

from graphopt.targets.cpu.tir_rewrite import const_int  # noqa: F401 - the rules call base.const_int
from graphopt.targets.registry import VectorISA, vector_isa

SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")

__all__ = ["CPURule", "FuncInfo", "VectorISA", "analyze", "num_cores", "simd_lanes", "vector_isa"]


def simd_lanes(target: Target, dtype_bits: int = 32) -> int:
    """Number of ``dtype_bits``-wide lanes of the target's widest vector register."""
    return vector_isa(target).lanes(dtype_bits)


def num_cores(target: Target) -> int:
    cores = target.attrs.get("num-cores")
    if cores is not None and int(cores) > 0:
        return int(cores)
    return int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))


def is_scheduled(func: tirx.PrimFunc) -> bool:
    attrs = func.attrs
    if attrs is None:
        return False
    return any(k in attrs and bool(attrs[k]) for k in SCHEDULED_ATTRS)


class CPURule(ScheduleRule):
    """A schedule rule for LLVM (CPU) targets, declared as ``match`` + ``schedule``.

    ``analyze`` prepares the func for ``match`` (by default ``base.analyze``: the blocks
    around its one reduction); a rule that looks at the root blocks only overrides it with
    ``root_blocks``.  Exceptions are not caught here: a rule that raises is a bug, which the
    dispatcher (dispatch.py) reports."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def analyze(self, func: tirx.PrimFunc) -> FuncInfo | None:
        return analyze(func)

    def match(self, info: FuncInfo, target: Target) -> Any:
        """What ``schedule`` needs to schedule ``info``, or None: the rule does not apply."""
        raise NotImplementedError

    def schedule(self, info: FuncInfo, match: Any, target: Target) -> s_tir.Schedule:
        """Schedule ``info.sch`` as ``match`` decided; returns the schedule."""
        raise NotImplementedError

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not self.is_target_available(target):
            return None
        info = self.analyze(func)
        if info is None:
            return None
        found = self.match(info, target)
        if found is None:
            return None
        return self.schedule(info, found, target)


# --------------------------------------------------------------------------- analysis


def loop_extent(sch: s_tir.Schedule, loop) -> int | None:
    return const_int(sch.get(loop).extent)


def spread_loops(sch: s_tir.Schedule, parallel, cores: int, unroll=(), vectorize=None):
    """The usual end of a loop nest: ``parallel`` (a loop, or loops fused into one) spread over
    the cores when there is more than one, the ``unroll`` loops unrolled, ``vectorize``
    vectorized. Returns the parallel loop."""
    outer = sch.fuse(*parallel) if isinstance(parallel, (list, tuple)) else parallel
    if cores > 1:
        sch.parallel(outer)
    for loop in unroll:
        sch.unroll(loop)
    if vectorize is not None:
        sch.vectorize(vectorize)
    return outer


def iter_kinds(block: tirx.SBlock) -> str:
    """'S' for a data-parallel block iter, 'R' for a reduction one, 'O' otherwise."""
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return "".join(kinds.get(int(iv.iter_type), "O") for iv in block.iter_vars)


def subexpressions(node):
    """``node`` and every expression below it (operands, call arguments, load indices).

    TVM 0.27's Python API has no post_order_visit, so the tree is walked by its fields."""
    pending = [node]
    while pending:
        node = pending.pop()
        yield node
        for name in ("a", "b", "value", "condition", "true_value", "false_value"):
            child = getattr(node, name, None)
            if child is not None and not isinstance(child, (int, float, str)):
                pending.append(child)
        pending.extend(getattr(node, "args", ()) if hasattr(node, "op") else ())
        pending.extend(getattr(node, "indices", ()))


def uses_var(expr, var) -> bool:
    """True when ``var`` occurs in ``expr``."""
    return any(isinstance(e, tirx.Var) and e.same_as(var) for e in subexpressions(expr))


def writes_bool(block: tirx.SBlock) -> bool:
    """Bool blocks stay scalar: LLVM 22 rejects TVM's vector code for them (i8 in memory,
    i1 in registers: ``or <6 x i8>, <6 x i1>``)."""
    return str(block.writes[0].source.dtype) == "bool"


def reduces_trailing_axes(block: tirx.SBlock) -> bool:
    """True when every buffer the block reads is reduced over its trailing axes only.

    Row-reduction schedules (dlight's and ours) parallelize the leading axes and walk the
    reduced ones inside; a softmax over a middle axis (``softmax(x, dim=1)`` on (1, 6, 1))
    would put the reduced axis in the parallel loop."""
    reduce_vars = [iv.var for iv in block.iter_vars if int(iv.iter_type) == tirx.IterVar.CommReduce]
    for region in block.reads:
        reduced = [any(uses_var(r.min, v) for v in reduce_vars) for r in region.region]
        if any(reduced) and not all(reduced[reduced.index(True):]):
            return False
    return True


@dataclass
class FuncInfo:
    """A PrimFunc as ``pre`` blocks -> ``main`` block -> ``post`` blocks (all root children)."""

    sch: s_tir.Schedule
    blocks: list = field(default_factory=list)
    main: object = None
    pre: list = field(default_factory=list)
    post: list = field(default_factory=list)

    def stmt(self, rv) -> tirx.SBlock:
        return self.sch.get(rv)


def analyze(func: tirx.PrimFunc) -> FuncInfo | None:
    """Split the root's child blocks around the single reduction block.

    Returns None for shapes the structured rules do not handle (blocks nested below the
    root, dynamic extents, several reductions); the fallback rule takes those.
    """
    try:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        blocks = list(sch.get_child_blocks(root))
    except Exception:  # noqa: BLE001 - unusual funcs (no root block) go to the fallback
        return None
    info = FuncInfo(sch=sch, blocks=blocks)
    reductions = [i for i, b in enumerate(blocks) if "R" in iter_kinds(sch.get(b))]
    for b in blocks:
        blk = sch.get(b)
        if "O" in iter_kinds(blk) or any(const_int(iv.dom.extent) is None for iv in blk.iter_vars):
            return None
        # Every block must sit alone in its perfect loop nest, one loop per iter.
        if len(sch.get_loops(b)) != len(blk.iter_vars):
            return None
    if len(reductions) == 1:
        idx = reductions[0]
        info.main = blocks[idx]
        info.pre, info.post = blocks[:idx], blocks[idx + 1 :]
    elif not reductions:
        info.main = blocks[-1] if blocks else None
        info.pre = blocks[:-1]
    else:
        info.main = None
    return info


def root_blocks(func: tirx.PrimFunc) -> FuncInfo | None:
    """The root's child blocks only (no main block chosen), for rules that look at the
    whole func; None for a func without a root block."""
    try:
        sch = s_tir.Schedule(func)
        blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # noqa: BLE001 - unusual funcs (no root block) are nobody's
        return None
    return FuncInfo(sch=sch, blocks=blocks)


# TVM 0.27 represents buffer reads as ``ir.TensorLoad`` (``.source`` is the buffer var);
# ``tirx.BufferLoad`` is only a constructor function, not a class.
Load = ir.expr.TensorLoad


def load_buffer(load):
    return load.source


def same_buffer(a, b) -> bool:
    return a.same_as(b)


def conv_mac(info: "FuncInfo"):
    """(store, a, b, iter vars) when ``info``'s main block is a conv-shaped multiply-accumulate
    (four spatial and three reduction loops: n, f, y, x, rc, ry, rx), else None."""
    if info is None or info.main is None:
        return None
    block = info.stmt(info.main)
    ops = mac_operands(block) if iter_kinds(block) == "SSSSRRR" else None
    if ops is None:
        return None
    return (*ops, [v.var for v in block.iter_vars])


def mac_operands(block: tirx.SBlock):
    """For ``C[...] = C[...] + A[...] * B[...]`` return (C_store, A_load, B_load), else None.

    Allows a cast around the product (mixed-precision accumulation)."""
    body = block.body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tirx.Add):
        return None
    lhs, rhs = body.value.a, body.value.b
    if not (isinstance(lhs, Load) and same_buffer(lhs.source, body.buffer)):
        return None
    if isinstance(rhs, tirx.Cast):
        rhs = rhs.value
    if not isinstance(rhs, tirx.Mul):
        return None
    a, b = rhs.a, rhs.b
    if isinstance(a, tirx.Cast):
        a = a.value
    if isinstance(b, tirx.Cast):
        b = b.value
    if not (isinstance(a, Load) and isinstance(b, Load)):
        return None
    return body, a, b


# --------------------------------------------------------------------------- scheduling


def largest_divisor(n: int, limit: int, multiple_of: int = 1) -> int:
    """Largest d <= limit with n % d == 0 and d % multiple_of == 0 (0 when none)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0 and d % multiple_of == 0:
            return d
    return 0


def register_tile(ext: int, lanes: int, narrowest: int) -> int:
    """Widest of 2 vectors, 1 vector, or a power-of-two part of one (down to ``narrowest``
    lanes) that divides ``ext``; 0 when none does.

    Register tiles are whole registers or power-of-two parts: LLVM legalizes odd widths
    such as <20 x float> or <24 x float> into zmm + ymm/xmm mixes with shuffles and spills."""
    width = 2 * lanes
    while width >= max(narrowest, 1):
        if ext % width == 0:
            return width
        width //= 2
    return 0


# Independent accumulators a core needs in flight to keep its FMA units busy: two FMA pipes
# x 4 cycles of latency (x86 cores since Haswell, big AArch64 cores).
FMA_CHAINS = 8


def _outer_product_score(count: int, vecs: int) -> float:
    """FMAs per load of one reduction step of a ``count`` broadcasts x ``vecs`` vectors tile,
    scaled down when its accumulators are too few to hide the FMA latency."""
    accumulators = count * vecs
    return accumulators / (count + vecs) * min(1.0, accumulators / FMA_CHAINS)


def outer_product_tile(ext: int, width: int, lanes: int, max_acc: int) -> tuple[int, int]:
    """(vector lanes, broadcast count) of an outer-product register tile: ``width`` lanes of
    vectors (from ``register_tile``) times a count of broadcast scalars that divides ``ext``.

    The count is as large as the accumulator budget allows; a 2-vector width halves it, and
    when ``ext`` has no divisor near that the tile collapses: with AVX2's 12 accumulators a
    7-wide row takes 1 pixel x 2 vectors (2 accumulators, latency-bound), where 1 vector x 7
    pixels keeps the FMA pipes busy.  The width narrows to one vector only when that scores
    strictly better, so 32-register targets keep their 2-vector tiles."""
    def count(w):
        return largest_divisor(ext, max(max_acc // max(-(-w // lanes), 1), 1)) or 1

    best = (width, count(width))
    if width == 2 * lanes and _outer_product_score(count(lanes), 1) > _outer_product_score(best[1], 2):
        best = (lanes, count(lanes))
    return best


def output_blocks(sch: s_tir.Schedule) -> set:
    root = sch.get_sblock("root")
    return {sch.get(b).name_hint for b in sch.get_output_blocks(root)}


def writes_channel_blocked(sch: s_tir.Schedule, post: list, lanes: int) -> bool:
    """The function's output is NCHW[lanes]c: its last epilogue block writes a 5-D buffer
    whose last axis is ``lanes`` wide (a layout_transform that blocked.py appended)."""
    if not post:
        return False
    out = sch.get(post[-1]).writes[0].source
    return len(out.shape) == 5 and const_int(out.shape[4]) == lanes


def reads_channel_blocked(sch: s_tir.Schedule, pre: list, lanes: int) -> bool:
    """The function's first prologue block unblocks an NCHW[lanes]c input (blocked.py)."""
    if not pre:
        return False
    reads = sch.get(pre[0]).reads
    return (len(reads) == 1 and len(reads[0].source.shape) == 5
            and const_int(reads[0].source.shape[4]) == lanes)


def inline_post(sch: s_tir.Schedule, post: list) -> list:
    """compute_inline every epilogue block that does not write a function output.

    What remains are the blocks that write outputs (normally one: the epilogue's last
    op).  Returns the remaining block RVs in order."""
    outs = output_blocks(sch)
    remaining = []
    for b in post:
        if sch.get(b).name_hint not in outs:
            try:
                sch.compute_inline(b)
                continue
            except Exception:  # noqa: BLE001 - e.g. a reduction-like epilogue; keep it
                pass
        remaining.append(b)
    return remaining


def inline_plain_copies(sch: s_tir.Schedule, pre: list) -> list:
    """compute_inline every prologue block that is a plain copy; return the others.

    The "pad_temp" of an unpadded conv (every 1x1 conv) is a copy of the input: as its
    own block it is a full parallel pass over memory, and with two cores each conv task
    then reads half its input from the other core's cache.  Real padding stays a block
    (inlined, it would put a bounds check on every load of the inner loop)."""
    kept = []
    for b in pre:
        if isinstance(sch.get(b).body.value, Load):
            try:
                sch.compute_inline(b)
                continue
            except Exception:  # noqa: BLE001 - e.g. a copy feeding two consumers; keep it
                pass
        kept.append(b)
    return kept


def fuse_epilogue(sch: s_tir.Schedule, writeback, post: list) -> list:
    """Fold the (already compute-inlined) epilogue into ``writeback``.

    ``writeback`` is the cache_write copy block of the main block's accumulator; each
    epilogue block that consumes it elementwise is reverse_compute_inlined so that bias,
    relu, residual add ... are applied while the tile is still in registers/L1 and the
    epilogue does not need its own pass over memory.  Returns the blocks that could not
    be folded (the caller places them with reverse_compute_at)."""
    left = []
    for b in post:
        try:
            sch.reverse_compute_inline(b)
        except Exception:  # noqa: BLE001
            left.append(b)
    return left


def pad_in_task(sch: s_tir.Schedule, pad, task_loop) -> None:
    """Compute a padding copy under ``task_loop`` (a parallel loop over planes), region by
    region, instead of as a pass of its own over the whole input: the padded plane is still
    in L1/L2 when the taps read it, and the kernel has one parallel region fewer.

    Raises when ``pad`` cannot move there (e.g. a producer shared by several tasks).  The
    padded row (e.g. 114 wide) becomes one vector loop: LLVM splits it into whole registers
    and a short tail, far better than a scalar copy."""
    sch.compute_at(pad, task_loop, preserve_unit_loops=True)
    try:
        sch.vectorize(sch.get_loops(pad)[-1])
    except Exception:  # noqa: BLE001 - a row it cannot vectorize stays a scalar copy
        pass


def parallel_vectorize_injective(sch: s_tir.Schedule, block, lanes: int, cores: int,
                                 min_parallel_work: int = 4096) -> None:
    """Parallelize the outer loops and vectorize the innermost of one spatial block.

    Used for padding copies, epilogues that could not be fused, and by the fallback rule.
    Tiny blocks stay serial: waking the thread pool costs more than it saves."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [loop_extent(sch, lp) or 1 for lp in loops]
    total = 1
    for e in extents:
        total *= e
    inner = loops[-1]
    inner_ext = extents[-1]
    outer_loops = loops[:-1]
    # Vectorize the innermost loop: whole loop if short, else a `lanes`-wide (or a
    # small multiple) divisor so no tail predicate blocks vectorization.
    if inner_ext > 1 and not writes_bool(sch.get(block)):
        vec = largest_divisor(inner_ext, 4 * lanes, 1)
        if vec >= 4 or vec == inner_ext:
            if vec < inner_ext:
                o, i = sch.split(inner, [None, vec])
                outer_loops = [*outer_loops, o]
                inner = i
            try:
                sch.vectorize(inner)
            except Exception:  # noqa: BLE001 - e.g. data-dependent access; stay scalar
                pass
    if cores > 1 and total >= min_parallel_work and outer_loops:
        fused = sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0]
        try:
            sch.parallel(fused)
        except Exception:  # noqa: BLE001
            pass


def _reads_per_channel_only(sch: s_tir.Schedule, block, tile) -> bool:
    """Every buffer ``block`` reads besides ``tile`` holds one value per channel (bias, BN
    scale): a residual or any other per-pixel input would turn into a gather once the
    block runs vectorized over channels."""
    for region in sch.get(block).reads:
        if region.source.same_as(tile):
            continue
        if sum(const_int(r.extent) != 1 for r in region.region) > 1:
            return False
    return True


def _writes_in_tile_order(sch: s_tir.Schedule, block) -> bool:
    """``block`` writes element (n, f, y, x) of a 4-D output for its iteration (n, f, y, x):
    no reshape or permutation was folded into the write-back.  Its scratch tile then covers
    exactly what the task computed; with a folded reshape the copy's bounding box spans
    other tasks' outputs too (fuzzer seed 29: conv -> reshape -> transpose -> tanh)."""
    b = sch.get(block)
    if len(b.writes) != 1 or len(b.iter_vars) != 4 or len(b.writes[0].region) != 4:
        return False
    return all(r.min.same_as(iv.var) and const_int(r.extent) == 1 for r, iv in zip(b.writes[0].region, b.iter_vars))


def write_back_transposed(sch: s_tir.Schedule, writeback, at, lanes: int, target: Target) -> bool:
    """Write a (n, y, x, f) register tile back to NCHW through register shuffles.

    ``writeback`` (the cache_write copy, epilogue folded in) is split in two: the epilogue,
    vectorized over channels into a (pixel, channel) scratch tile, and a copy from it to
    the output whose channel loop ``transpose.lower_transposes`` turns into a shuffle
    network (targets/cpu/transpose.py).  Returns False, changing nothing, for a target whose
    kernels that pass does not lower (only LLVM ones go through graphopt's TIR pipeline), or
    when the epilogue reads a per-pixel input (a residual: that would be a gather instead)
    or writes through a folded reshape or permutation."""
    from .. import transpose

    tile = sch.get(writeback).reads[0].source
    if (target.kind.name != "llvm" or len(sch.get_loops(writeback)) < 5
            or not _writes_in_tile_order(sch, writeback) or not _reads_per_channel_only(sch, writeback, tile)):
        return False
    copy = sch.cache_write(writeback, 0, "local")
    sch.transform_layout(writeback, ("write", 0), lambda n, f, y, x: (n, y, x, f))
    wn, wf, wy, wx = sch.get_loops(writeback)[-4:]
    sch.reorder(wn, wy, wx, wf)
    sch.vectorize(wf)
    sch.reverse_compute_at(copy, at, preserve_unit_loops=True)
    cn, cf, cy, cx = sch.get_loops(copy)[-4:]
    sch.reorder(cn, cy, cf, cx)
    f_ext = sch.get(cf).extent
    if int(f_ext) > lanes:
        _, cf = sch.split(cf, [None, lanes])
    sch.vectorize(cx)
    transpose.annotate(sch, cf)
    return True
