"""Software prefetch of weight streams (targets/cpu/prefetch.py).

Specification: a loop annotated ``graphopt.prefetch = [buffer, ahead, lines, period, locality]``
gets, at the top of its body, ``lines`` prefetches of that buffer, ``ahead`` elements past
where the iteration starts reading it, the iteration's share of the region picked by
``(i - min) % period``; the annotation disappears; a buffer the body does not read leaves
the loop as it was.  Results do not change.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TVM_NUM_THREADS", "2")
tvm = pytest.importorskip("tvm")
from tvm.script import tirx as T  # noqa: E402

from graphopt.targets.cpu import prefetch  # noqa: E402
from graphopt.targets.cpu.tir_pipeline import TIR_PIPELINE  # noqa: E402
from graphopt.testing import assert_close  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def _row_sums(buffer_name: str):
    """out[t, r] = sum_k w[t, k] for 4 tiles of 64 floats, each summed by 4 rows that
    reuse it: the shape of a conv's weight tile reused by its output rows."""

    @T.prim_func(s_tir=True)
    def func(w: T.Buffer((4, 64), "float32"), out: T.Buffer((4, 4), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in range(4):
            for r in T.serial(4, annotations={prefetch.PREFETCH: [buffer_name, 64, 1, 4, 3]}):
                with T.sblock("init"):
                    vt, vr = T.axis.remap("SS", [t, r])
                    out[vt, vr] = T.float32(0)
                for k in range(64):
                    with T.sblock("sum"):
                        vt, vr, vk = T.axis.remap("SSR", [t, r, k])
                        out[vt, vr] = out[vt, vr] + w[vt, vk]

    return func


def _lowered(func) -> str:
    mod = tvm.tirx.transform.BindTarget(TARGET.with_host(TARGET))(tvm.IRModule({"main": func}))
    pipeline, _, _ = tvm.tirx.get_tir_pipeline(TIR_PIPELINE)
    return pipeline(mod)["main"].script()


def test_annotated_loop_prefetches_the_next_tile_a_line_per_iteration():
    text = _lowered(_row_sums("w"))
    assert "graphopt.prefetch" not in text
    calls = [ln.strip() for ln in text.splitlines() if "llvm.prefetch" in ln]
    assert len(calls) == 1, text
    # tile t starts at t * 64; the next one 64 further; row r takes line r (16 floats)
    assert "t * 64 + 64 + r % 4 * 16 + prefetch_line * 16" in calls[0], calls[0]
    assert calls[0].endswith("0, 3, 1)")  # read, into L1, data
    assert "for prefetch_line in range(1)" in text


def test_annotation_naming_a_buffer_the_loop_does_not_read_is_dropped():
    text = _lowered(_row_sums("not_there"))
    assert "llvm.prefetch" not in text and "graphopt.prefetch" not in text


def test_prefetching_kernel_computes_the_same():
    lib = tvm.compile(tvm.IRModule({"main": _row_sums("w")}), target=TARGET, tir_pipeline=TIR_PIPELINE)
    w = np.random.default_rng(0).standard_normal((4, 64)).astype("float32")
    out = tvm.runtime.tensor(np.zeros((4, 4), "float32"))
    lib["main"](tvm.runtime.tensor(w), out)
    def row_sums(w):
        return np.repeat(w.sum(1, keepdims=True), 4, axis=1)

    assert_close(out.numpy(), row_sums(w), truth=row_sums(w.astype(np.float64)))


def test_lines_per_iteration_covers_the_region():
    assert prefetch.lines_per_iteration(80 * 32 * 4, 7) == 23  # 160 lines over 7 rows
    assert prefetch.lines_per_iteration(64, 7) == 1
