"""``graphopt.calibrate(graph, data)``: record activation ranges for static int8 quantization.

A thin public front for passes/quantize/calibration.py: runs ``graph`` eagerly on each batch
of ``data`` (with a progress bar), stores ``node.meta["qrange"] = (lo, hi)`` on every
activation feeding a conv/linear/matmul (shown in the IR dump as ``# range [lo, hi]``) and
returns ``{node name: (lo, hi)}``. A later ``quantize{mode=int8,calib=<same method>}``
uses these ranges instead of calibrating again.

Before anything runs, every item of ``data`` is checked against the graph's inputs
(:func:`graphopt.data.check_calibration_data`): one tensor per input, same rank, same dtype, same sizes
in every dimension but the batch. Ranges recorded from the wrong tensors would quantize
the model silently wrong, so a mismatch is a :class:`CalibrationError` naming the item.
The one tolerated extra is a class label: ``(x, label)`` pairs straight from a DataLoader
for a single-input graph, the label being an integer tensor or a Python number.
"""

from __future__ import annotations

from typing import Any, Iterable

from graphopt.data import check_calibration_data  # noqa: F401 - part of this module's interface
from graphopt.graph import Graph


def calibrate(graph: Graph, data: Iterable[Any], method: str = "minmax",
              progress: bool = True) -> dict[str, tuple[float, float]]:
    """Calibrate ``graph`` in place on ``data`` (batches of inputs) with ``method``:
    minmax | percentile | entropy | mse."""
    from graphopt.passes.quantize.calibration import calibrate as _calibrate
    from graphopt.passes.quantize.observers import METHODS

    if method not in METHODS:
        from graphopt.errors import InputError

        raise InputError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")
    return _calibrate(graph, data, method, progress=progress)  # checks data: check_calibration_data
