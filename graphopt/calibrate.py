"""``graphopt.calibrate(graph, data)``: record activation ranges for static int8 quantization.

A thin public front for passes/quantize/calibrate.py: runs ``graph`` eagerly on each batch
of ``data`` (with a progress bar), stores ``node.meta["qrange"] = (lo, hi)`` on every
activation feeding a conv/linear/matmul (shown in the IR dump as ``# range [lo, hi]``) and
returns ``{node name: (lo, hi)}``. A later ``quantize{mode=int8,calib=<same method>}``
uses these ranges instead of calibrating again.
"""

from __future__ import annotations

from typing import Any, Iterable

from graphopt.graph import Graph


def calibrate(graph: Graph, data: Iterable[Any], method: str = "minmax",
              progress: bool = True) -> dict[str, tuple[float, float]]:
    """Calibrate ``graph`` in place on ``data`` (batches of inputs) with ``method``:
    minmax | percentile | entropy | mse."""
    from graphopt.passes.quantize.calibrate import calibrate as _calibrate
    from graphopt.passes.quantize.observers import METHODS

    if method not in METHODS:
        from graphopt.errors import InputError

        raise InputError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")
    return _calibrate(graph, data, method, progress=progress)
