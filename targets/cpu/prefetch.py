"""Software prefetch of weight streams: a loop annotation set by the schedule rules and a
TIR pass, run after lowering, that turns it into ``llvm.prefetch`` calls.

Why.  The weights of a network's deep layers do not stay in cache from one image to the
next (mobilenet_v2: 14 MB of them, resnet18: 46 MB), so each conv reads its weights from
memory.  A conv kernel walks them tile by tile (conv2d.py packs them in that order), and
the first pass over a tile stalls on each miss: the hardware prefetchers stop at page
boundaries and run only a few lines ahead.  mobilenet_v2's 320 -> 1280 conv at 7x7 took
0.25 ms with cold weights against 0.17 ms warm (one thread).  Prefetching the *next* tile
while computing on the current one, spread evenly over the loop that re-reads the current
tile, hides that: 0.25 -> 0.19 ms.

How.  A rule calls ``annotate(sch, loop, weight, ahead, lines, period)`` on a loop whose
body reads ``weight``.  The pass finds the first load of that buffer in the loop body,
sets every loop inside the body to its start, which gives the address the current
iteration starts reading at, and inserts at the top of the body::

    for p in range(lines):
        prefetch(&weight[start + ahead + ((i - min) % period) * lines * L + p * L])

where ``L`` is the number of elements in a 64-byte cache line.  So over ``period``
iterations of the loop, ``lines`` cache lines each, the region ``ahead`` elements past the
current one is brought into cache.  The annotation holds only names and integers, so a
rule's schedule still replays from a tuning record.  A loop whose buffer is not found
just loses its annotation.
"""

from __future__ import annotations

import tvm
import tvm.sym
from tvm import tirx
from tvm.ir.expr import Call, TensorLoad

from graphopt.targets.cpu.tir_rewrite import rewrite_annotated_loops, without_annotation

PREFETCH = "graphopt.prefetch"
CACHE_LINE = 64


def annotate(sch, loop, weight_name: str, ahead: int, lines: int, period: int) -> None:
    """Mark ``loop`` to prefetch ``lines`` cache lines of ``weight_name`` per iteration into
    L1 (the annotation's last field, LLVM's locality 3), ``ahead`` elements past what the
    iteration reads, cycling every ``period`` iterations."""
    if lines > 0 and period > 0:
        sch.annotate(loop, PREFETCH, [weight_name, int(ahead), int(lines), int(period), 3])


def lines_per_iteration(region_bytes: int, iterations: int) -> int:
    """Cache lines each of ``iterations`` loop iterations prefetches to cover the region."""
    return -(-region_bytes // (CACHE_LINE * max(iterations, 1)))


# TVM 0.27 exposes no TIR visitor/mutator to Python: these walk the few node kinds that
# lowered CPU kernels contain (statements are flat: LetStmt and DeclBuffer have no body).
def _children(node) -> list:
    if isinstance(node, tirx.SeqStmt):
        return list(node.seq)
    if isinstance(node, tirx.For):
        return [node.min, node.extent, node.body]
    if isinstance(node, tirx.AttrStmt):
        return [node.value, node.body]
    if isinstance(node, tirx.While):
        return [node.condition, node.body]
    if isinstance(node, tirx.IfThenElse):
        return [node.condition, node.then_case, node.else_case]
    if isinstance(node, tirx.BufferStore):
        return [node.value, *node.indices]
    if isinstance(node, TensorLoad):
        return list(node.indices)
    if isinstance(node, (tirx.Evaluate, tirx.LetStmt, tirx.Cast, tirx.Broadcast)):
        return [node.value]
    if isinstance(node, tirx.Ramp):
        return [node.base, node.stride]
    if isinstance(node, tirx.Select):
        return [node.condition, node.true_value, node.false_value]
    if isinstance(node, tirx.Let):
        return [node.value, node.body]
    if isinstance(node, Call):
        return list(node.args)
    if isinstance(node, tirx.Shuffle):
        return list(node.vectors)
    if hasattr(node, "a") and hasattr(node, "b"):  # binary arithmetic and comparisons
        return [node.a, node.b]
    if isinstance(node, tirx.Not):
        return [node.a]
    return []


def _walk(node, visit) -> None:
    """Pre-order walk over statements and expressions."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n is None:
            continue
        visit(n)
        stack.extend(reversed(_children(n)))


def _start_index(loop: tirx.For, name: str):
    """The flat index of the first load of buffer ``name`` in ``loop``'s body, with every
    loop inside the body at its start and let-bound variables (from common-subexpression
    elimination) substituted: where the iteration starts reading.  None if not found."""
    loads, lets, inner = [], [], []

    def visit(n):
        if isinstance(n, TensorLoad) and n.source.name == name:
            loads.append(n)
        elif isinstance(n, tirx.LetStmt):
            lets.append((n.var, n.value))
        elif isinstance(n, tirx.For):
            inner.append(n)

    _walk(loop.body, visit)
    if not loads or len(loads[0].indices) != 1:
        return None, None
    index = loads[0].indices[0]
    if isinstance(index, tirx.Ramp):
        index = index.base
    analyzer = tvm.sym.Analyzer()
    for var, value in lets:  # in program order: a let's value may use earlier lets
        analyzer.bind(var, analyzer.simplify(value))
    for f in inner:
        analyzer.bind(f.loop_var, analyzer.simplify(f.min))
    return loads[0].source, analyzer.simplify(index)


def _with_prefetch(loop: tirx.For, body):
    name, ahead, lines, period, locality = loop.annotations[PREFETCH]
    buffer, start = _start_index(loop, str(name))
    if buffer is None:
        return without_annotation(loop, PREFETCH, body)
    dtype = str(start.ty)
    per_line = max(CACHE_LINE * 8 // tvm.runtime.DataType(str(buffer.dtype)).bits, 1)
    p = tirx.Var("prefetch_line", dtype)
    i = loop.loop_var - loop.min
    if str(loop.loop_var.ty) != dtype:
        i = tirx.Cast(dtype, i)
    step = tirx.floormod(i, tirx.const(int(period), dtype))
    offset = (start + tirx.const(int(ahead), dtype)
              + step * tirx.const(int(lines) * per_line, dtype) + p * tirx.const(per_line, dtype))
    pointer = tirx.call_intrin("handle", "tirx.tvm_access_ptr", tirx.type_annotation(buffer.dtype),
                               buffer.data, offset, tirx.const(per_line, dtype), 1)
    # llvm.prefetch(ptr, rw = 0: read, locality = 3: into L1 / 2: into L2, cache = 1: data).
    # A prefetch never faults, so the last tile may run past the end of the weights.
    call = tirx.call_llvm_intrin("void", "llvm.prefetch.p0", pointer, tirx.const(0, "int32"),
                                 tirx.const(int(locality), "int32"), tirx.const(1, "int32"))
    prefetch = tirx.For(p, tirx.const(0, dtype), tirx.const(int(lines), dtype), tirx.ForKind.SERIAL,
                        tirx.Evaluate(call))
    return without_annotation(loop, PREFETCH, tirx.SeqStmt([prefetch, body]))


@tirx.transform.prim_func_pass(opt_level=0, name="graphopt.InjectPrefetch")
def inject_prefetch(func, _mod, _ctx):
    """Lower every ``graphopt.prefetch`` loop annotation (module doc)."""
    body = rewrite_annotated_loops(func.body, PREFETCH, _with_prefetch)
    return func if body.same_as(func.body) else func.with_body(body)
