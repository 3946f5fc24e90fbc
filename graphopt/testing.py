"""Numerical comparison helpers for tests and benchmarks (the tolerance ladder in code).

``assert_matches_eager`` compares an optimized or compiled model's outputs with eager
PyTorch at the fp32 rung (rtol 1e-4, atol 1e-5). When that fails it falls back to a
float64 run of the model: a result is accepted if it is no further from the float64
truth than eager fp32 itself is (twice, plus atol), since then the difference is fp32
rounding in a different order, not a bug.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch


def _tuple(x: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(x, (tuple, list)):
        return tuple(torch.as_tensor(t) for t in x)
    return (torch.as_tensor(x),)


def assert_close(actual: Any, expected: Any, rtol: float = 1e-4, atol: float = 1e-5, what: str = "output") -> None:
    a_all, e_all = _tuple(actual), _tuple(expected)
    if len(a_all) != len(e_all):
        raise AssertionError(f"{what}: {len(a_all)} outputs, expected {len(e_all)}")
    for i, (a, e) in enumerate(zip(a_all, e_all)):
        if a.shape != e.shape:
            raise AssertionError(f"{what} {i}: shape {tuple(a.shape)} != {tuple(e.shape)}")
        if a.dtype != e.dtype:
            raise AssertionError(f"{what} {i}: dtype {a.dtype} != {e.dtype}")
        if not torch.allclose(a.double(), e.double(), rtol=rtol, atol=atol, equal_nan=True):
            err = (a.double() - e.double()).abs().max().item()
            raise AssertionError(f"{what} {i}: max abs error {err:.3g} exceeds rtol={rtol:g}, atol={atol:g}")


def assert_matches_eager(actual: Any, model: torch.nn.Module, inputs: Sequence[torch.Tensor],
                         rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Assert ``actual`` equals ``model(*inputs)`` at the fp32 rung, with the float64 fallback."""
    with torch.no_grad():
        expected = _tuple(model(*inputs))
    try:
        assert_close(actual, expected, rtol, atol)
        return
    except AssertionError as first:
        m64 = copy.deepcopy(model).double()
        with torch.no_grad():
            truth = _tuple(m64(*[x.double() if x.is_floating_point() else x for x in inputs]))
        for a, e, t in zip(_tuple(actual), expected, truth):
            ours = (a.double() - t).abs().max().item()
            eager = (e.double() - t).abs().max().item()
            if ours > 2 * eager + atol:
                raise AssertionError(f"{first}; vs float64: ours {ours:.3g}, eager fp32 {eager:.3g}") from None


def cosine(a: Any, b: Any) -> float:
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def sqnr_db(reference: Any, test: Any) -> float:
    """Signal-to-quantization-noise ratio in dB of ``test`` against ``reference``."""
    r, t = torch.as_tensor(reference).double(), torch.as_tensor(test).double()
    noise = (r - t).pow(2).mean()
    return float("inf") if noise == 0 else float(10 * torch.log10(r.pow(2).mean() / noise))
