"""Small per-task buffers on the stack, not in TVM's workspace pool.

Schedule rules keep register tiles (accumulators, transposed write-back tiles, packed int8
activations) in "local" buffers allocated inside parallel loops. TVM's LowerTVMBuiltin turns
every CPU allocation into a ``TVMBackendAllocWorkspace`` / ``FreeWorkspace`` call pair unless
it is "global" and under 1 KiB, so each task of each kernel paid two calls into the runtime
(measured under qemu on aarch64: ~4% of an fp32 transformer's instructions and over a third of
its int8 build's), and LLVM saw the tile behind an opaque pointer. Annotated
``disable_lower_builtin``, the allocation stays an ``alloca`` in the task's entry block.

Only constant-size buffers up to ``STACK_TILE_BYTES`` move: worker threads (TVM's pool, or
torch's OpenMP threads when shared) have megabytes of stack, and anything larger is a
staging buffer better served by the pool.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from graphopt.targets.cpu.tir_rewrite import const_int, rewrite_statements

STACK_TILE_BYTES = 16 * 1024
DISABLE_LOWER_BUILTIN = "disable_lower_builtin"  # tvm/tir/transform.h: kDisableLowerTVMBuiltin


def _tile_bytes(buffer: tirx.Buffer) -> int | None:
    """Bytes of a constant-shape buffer, None for a symbolic one."""
    count = 1
    for extent in buffer.shape:
        value = const_int(extent)
        if value is None:
            return None
        count *= value
    dtype = tvm.DataType(buffer.dtype)
    return count * dtype.bits * dtype.lanes // 8


def _on_stack(alloc: tirx.AllocBuffer) -> tirx.AllocBuffer:
    buffer = alloc.buffer
    if buffer.scope() not in ("local", "global") or DISABLE_LOWER_BUILTIN in alloc.annotations:
        return alloc
    size = _tile_bytes(buffer)
    if size is None or size > STACK_TILE_BYTES:
        return alloc
    return tirx.AllocBuffer(buffer, annotations={**alloc.annotations, DISABLE_LOWER_BUILTIN: tirx.IntImm("int32", 1)})


@tirx.transform.prim_func_pass(opt_level=0, name="graphopt.StackTiles")
def keep_small_tiles_on_stack(func: tirx.PrimFunc, mod, ctx) -> tirx.PrimFunc:
    body = rewrite_statements(func.body, lambda s, visit: _on_stack(s) if isinstance(s, tirx.AllocBuffer) else None)
    return func if body.same_as(func.body) else func.with_body(body)
