"""Assertions for tests and benchmarks: outputs against eager PyTorch on a rung of the
tolerance ladder (docs/TOLERANCES.md).

Both assertions are thin wrappers over :func:`graphopt.compare.compare`, the one comparison
the whole project uses: structure, shapes, dtypes and NaN/inf placement first, then values
(with the float64 fallback on the ``algebraic`` and ``half`` rungs).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from graphopt.compare import (INT8_MIN_SQNR_DB, INT8_WITHIN_ONE_STEP, RUNGS, Comparison, compare, cosine,
                              float64_run, leaves, max_abs, sqnr_db)

__all__ = ["INT8_MIN_SQNR_DB", "INT8_WITHIN_ONE_STEP", "RUNGS", "Comparison", "assert_close",
           "assert_matches_eager", "compare", "cosine", "float64_run", "leaves", "max_abs", "sqnr_db"]


def _as_graph_returns(actual: Any, expected: Any) -> Any:
    # A Graph returns a tuple even for one output (graphopt.Graph.__call__); a model returning
    # one bare tensor means the same thing. The other way round (the model returns a tuple and
    # ``actual`` is bare) is a lost structure, and is not unwrapped.
    if isinstance(actual, tuple) and len(actual) == 1 and isinstance(expected, torch.Tensor):
        return actual[0]
    return actual


def assert_close(actual: Any, expected: Any, tolerance: str = "algebraic", truth: Any = None,
                 what: str = "", **options: Any) -> None:
    """Assert ``actual`` is within the ``tolerance`` rung of ``expected`` (optionally with a
    float64 ``truth``, or a function returning it, as the fallback judge; ``options`` as
    :func:`graphopt.compare.compare` takes them)."""
    result = compare(expected, _as_graph_returns(actual, expected), tolerance, truth, **options)
    if not result.ok:
        raise AssertionError(f"{what}: {result.message}" if what else result.message)


def assert_matches_eager(actual: Any, model: torch.nn.Module, inputs: Sequence[Any],
                         tolerance: str = "algebraic") -> None:
    """Assert ``actual`` equals ``model(*inputs)`` on the ``tolerance`` rung (compiled fp32
    builds: ``algebraic``), judged by the model run in float64 when fp32 rounding differs."""
    with torch.no_grad():
        expected = model(*inputs)
    assert_close(actual, expected, tolerance, truth=lambda: float64_run(model, inputs))
