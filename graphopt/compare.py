"""The one output comparison behind every numeric check: tests, ``verify``, the fuzzer, bisect.

``compare(expected, actual, tolerance)`` judges ``actual`` against ``expected`` on a rung of
the tolerance ladder (docs/TOLERANCES.md) in a fixed order, and the first kind of
difference found decides:

1. **structure** — the same nesting of tuples/lists, dicts (same keys) and dataclasses, so
   the same number of outputs. A tuple and a list holding the same things are the same
   structure; a lone tensor and a one-element tuple are not;
2. **shape**, then **dtype** of every tensor (NumPy arrays count as tensors);
3. **NaN/inf placement** — on the ``exact``, ``algebraic`` and ``half`` rungs NaN, +inf and
   -inf must sit exactly where the reference has them; on ``int8`` and ``lossy`` no NaN/inf
   may appear where the reference is finite;
4. **values**, on the finite elements only (the rest were settled in step 3):

   * ``exact``: equal;
   * ``algebraic``/``half``: ``allclose`` with the rung's rtol and an atol scaled by the
     reference's magnitude, ``atol * max(1, max|expected|)``. When that fails and a float64
     ``truth`` is given, it decides: ``actual`` passes if its max distance to the truth is
     at most twice the reference's own distance plus atol — rounding in another order,
     not a bug;
   * ``int8``: SQNR of ``actual`` against ``expected`` of at least :data:`INT8_MIN_SQNR_DB`;
     against a fake-quant reference (``fake_quant=True``: integer kernels against the
     quantized graph run in float) instead within one quantization step of the output,
     ``max|expected| / 127``, on at least :data:`INT8_WITHIN_ONE_STEP` of the elements;
   * ``int4``: SQNR of at least :data:`INT4_MIN_SQNR_DB` (weight-only int4 layers);
   * ``lossy``: nothing more (the numbers change on purpose).

Values are never compared before structure, shapes, dtypes and NaN placement agree: a
max-error computed over a missing output (``zip``) or an all-NaN tensor (``NaN > tol`` is
false) would pass what it cannot see.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from graphopt.passes_base import TOLERANCES

# The ladder's rungs from strictest to loosest: a pipeline sits on its loosest pass's rung.
RUNGS = ("exact", "algebraic", "half", "int8", "int4", "lossy")

# int8 outputs against the float graph they replace (a pass) or the fake-quant graph they
# implement (a build): the noise a useful int8 model stays under. docs/TOLERANCES.md.
INT8_MIN_SQNR_DB = 20.0
# int4 weight-only layers against the float graph: 15 levels per group instead of 255 cost
# about 5 dB on random weights (measured 19.5-20.3 dB); a broken quantizer is near 0 dB.
INT4_MIN_SQNR_DB = 15.0
# Integer kernels against the fake-quant graph they implement: requantization may round the
# other way now and then, which moves an output by about a step; the share that must not move more.
INT8_WITHIN_ONE_STEP = 0.999


@dataclass
class Comparison:
    """The verdict: ``ok``, the worst max-abs difference (inf when the structure, a shape, a
    dtype or a NaN/inf placement differs) and, when not ok, what differs and where."""

    ok: bool
    error: float
    message: str = ""


class _Mismatch(Exception):
    pass


def _tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, np.generic):
        return torch.from_numpy(np.asarray(x))
    return None


def _is_container(x: Any) -> bool:
    return isinstance(x, (tuple, list, dict)) or (dataclasses.is_dataclass(x) and not isinstance(x, type))


def _pairs(expected: Any, actual: Any, where: str) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(where, expected, actual) for every tensor leaf; raises _Mismatch on a structure difference."""
    e_t, a_t = _tensor(expected), _tensor(actual)
    if e_t is not None or a_t is not None:
        if e_t is None or a_t is None:
            raise _Mismatch(f"{where} is {_kind(actual)}, expected {_kind(expected)}")
        yield where, e_t, a_t
        return
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)):
            raise _Mismatch(f"{where} is {_kind(actual)}, expected {_kind(expected)}")
        if len(actual) != len(expected):
            raise _Mismatch(f"{where} has {len(actual)} outputs, expected {len(expected)}")
        for i, (e, a) in enumerate(zip(expected, actual)):
            yield from _pairs(e, a, f"{where}[{i}]")
        return
    if isinstance(expected, dict) or dataclasses.is_dataclass(expected):
        e_items, a_items = _items(expected), _items(actual)
        same_kind = type(actual) is type(expected) or (isinstance(expected, dict) and isinstance(actual, dict))
        if a_items is None or not same_kind:
            raise _Mismatch(f"{where} is {_kind(actual)}, expected {_kind(expected)}")
        if set(a_items) != set(e_items):  # the same keys; their order is no part of the structure
            raise _Mismatch(f"{where} has keys {list(a_items)}, expected {list(e_items)}")
        for k in e_items:
            yield from _pairs(e_items[k], a_items[k], f"{where}[{k!r}]")
        return
    if _is_container(actual) or type(actual) is not type(expected) or actual != expected:
        raise _Mismatch(f"{where} is {actual!r}, expected {expected!r}")


def _items(x: Any) -> dict[str, Any] | None:
    if isinstance(x, dict):
        return dict(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
    return None


def _kind(x: Any) -> str:
    t = _tensor(x)
    if t is not None:
        return f"a tensor {t.dtype}{list(t.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"a {type(x).__name__}"


def leaves(x: Any) -> list[torch.Tensor]:
    """The tensors in ``x`` (a tensor or any nesting of tuples, lists, dicts, dataclasses), in order."""
    t = _tensor(x)
    if t is not None:
        return [t]
    if isinstance(x, (tuple, list)):
        return [leaf for item in x for leaf in leaves(item)]
    items = _items(x)
    return [leaf for item in items.values() for leaf in leaves(item)] if items is not None else []


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the widest dtype of its kind, for differences that cannot overflow or round."""
    return t.to(torch.complex128) if t.is_complex() else t.double()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference; equal values (NaN with NaN, inf with the same inf) differ by 0,
    any other NaN or inf difference is inf."""
    if a.numel() == 0:
        return 0.0
    a, b = _wide(a), _wide(b)
    same = (a == b) | (a.isnan() & b.isnan())
    d = (a - b).abs()
    d = torch.where(same, torch.zeros_like(d), d)
    return float(d.nan_to_num(nan=math.inf).max())


def sqnr_db(reference: Any, test: Any) -> float:
    """Signal-to-quantization-noise ratio in dB of ``test`` against ``reference`` (inf when equal)."""
    r, t = _wide(torch.as_tensor(reference)), _wide(torch.as_tensor(test))
    noise = (r - t).abs().pow(2).mean()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(r.abs().pow(2).mean() / noise))


def cosine(a: Any, b: Any) -> float:
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _placement(e: torch.Tensor, a: torch.Tensor, tolerance: str) -> str | None:
    """What is wrong with where ``a`` holds NaN/inf, or None."""
    if not (e.is_floating_point() or e.is_complex()):
        return None
    if tolerance in ("int8", "int4", "lossy"):
        new = int((~a.isfinite() & e.isfinite()).sum())
        return f"{new} NaN/inf where the reference is finite" if new else None
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        if e.is_complex() and name != "NaN":
            continue
        e_m, a_m = test(e), test(a)
        if not torch.equal(e_m, a_m):
            extra, missing = int((a_m & ~e_m).sum()), int((e_m & ~a_m).sum())
            return f"{name} in other places ({extra} new, {missing} missing of {int(e_m.sum())})"
    return None


def _finite(e: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not (e.is_floating_point() or e.is_complex()):
        return _wide(e), _wide(a)
    keep = e.isfinite() & a.isfinite()
    return _wide(e[keep]), _wide(a[keep])


def compare(expected: Any, actual: Any, tolerance: str,
            truth: "Any | Callable[[], Any] | None" = None, *,
            min_sqnr_db: float = INT8_MIN_SQNR_DB, fake_quant: bool = False) -> Comparison:
    """Is ``actual`` within the ``tolerance`` rung of ``expected``? (see the module docstring)

    ``truth`` is the same computation run in float64 (or a function returning it, called
    only when the float64 fallback is needed), the judge on the algebraic and half rungs.
    ``min_sqnr_db`` is the int8 rung's bar; ``fake_quant=True`` says ``expected`` is the
    quantized graph run in float, and puts the int8 rung's bar at one quantization step.
    """
    if tolerance not in RUNGS:
        raise ValueError(f"unknown tolerance {tolerance!r}: one of {', '.join(RUNGS)}")
    where = "output" if not isinstance(expected, (tuple, list)) else "outputs"
    try:
        pairs = list(_pairs(expected, actual, where))
    except _Mismatch as m:
        return Comparison(False, math.inf, str(m))
    for w, e, a in pairs:
        if tuple(e.shape) != tuple(a.shape):
            return Comparison(False, math.inf, f"{w} has shape {tuple(a.shape)}, expected {tuple(e.shape)}")
    for w, e, a in pairs:
        if e.dtype != a.dtype:
            return Comparison(False, math.inf, f"{w} has dtype {a.dtype}, expected {e.dtype}")
    placement = [f"{w} has {p}" for w, e, a in pairs if (p := _placement(e, a, tolerance))]
    if placement:
        return Comparison(False, math.inf, "; ".join(placement))

    worst = max((max_abs(e, a) for _, e, a in pairs), default=0.0)
    problems = []
    truths: list[torch.Tensor | None] | None = None
    for i, (w, e, a) in enumerate(pairs):
        problem = _values(e, a, tolerance, min_sqnr_db, fake_quant)
        if problem and tolerance in ("algebraic", "half") and truth is not None:
            if truths is None:
                truths = _truth_leaves(truth() if callable(truth) else truth, expected)
            t = truths[i] if truths else None
            if t is not None:
                problem = _fallback(e, a, t, tolerance, problem)
        if problem:
            problems.append(f"{w} {problem}")
    return Comparison(not problems, worst, "; ".join(problems))


def _values(e: torch.Tensor, a: torch.Tensor, tolerance: str, min_sqnr_db: float,
            fake_quant: bool = False) -> str | None:
    ef, af = _finite(e, a)
    if tolerance == "exact":
        if torch.equal(ef, af):
            return None
        return f"is not bit-identical (max abs error {max_abs(ef, af):.3g})"
    if tolerance == "lossy":
        return None
    if tolerance == "int8" and fake_quant:
        return _one_step(ef, af)
    if tolerance in ("int8", "int4"):
        bar = min_sqnr_db if tolerance == "int8" else min(min_sqnr_db, INT4_MIN_SQNR_DB)
        db = sqnr_db(ef, af)
        return None if db >= bar else f"SQNR {db:.1f} dB < {bar:g} dB"
    rtol, atol = TOLERANCES[tolerance]
    atol *= _scale(ef)
    if torch.allclose(af, ef, rtol=rtol, atol=atol):
        return None
    return f"max abs error {max_abs(ef, af):.3g} exceeds rtol={rtol:g}, atol={atol:.3g}"


def _one_step(e: torch.Tensor, a: torch.Tensor) -> str | None:
    if not e.numel():
        return None
    step = float(e.abs().max()) / 127
    steps = (a - e).abs() / step if step else (a != e).double() * math.inf
    # the slack absorbs float32 rounding of values up to 127 steps large (~1e-5 step)
    share = float((steps <= 1 + 1e-4).double().mean())
    if share >= INT8_WITHIN_ONE_STEP:
        return None
    return (f"{100 * share:.2f}% of elements within one quantization step ({step:.3g}), "
            f"expected {100 * INT8_WITHIN_ONE_STEP:g}%; worst {float(steps.max()):.3g} steps")


def _scale(e: torch.Tensor) -> float:
    return max(1.0, float(e.abs().max())) if e.numel() else 1.0


def _fallback(e: torch.Tensor, a: torch.Tensor, t: torch.Tensor, tolerance: str, problem: str) -> str | None:
    """The float64 judge: None when ``a`` is as close to the truth as the reference is."""
    if t.shape != e.shape:
        return problem
    keep = e.isfinite() & a.isfinite() & t.isfinite()
    e, a, t = _wide(e[keep]), _wide(a[keep]), _wide(t[keep])
    ours, reference = max_abs(a, t), max_abs(e, t)
    atol = TOLERANCES[tolerance][1] * _scale(e)
    if ours <= 2 * reference + atol:
        return None
    return f"{problem} (vs float64: ours {ours:.3g}, reference {reference:.3g})"


def _truth_leaves(truth: Any, expected: Any) -> list[torch.Tensor | None] | None:
    """The float64 tensors of ``truth`` matching ``expected``'s leaves (None where a leaf is
    not float64: explicit casts in the model leave no float64 judge), or None."""
    if truth is None:
        return None
    try:
        pairs = list(_pairs(expected, truth, "output"))
    except _Mismatch:
        return None
    return [t if t.dtype == torch.float64 else None for _, _, t in pairs]


def float64_run(fn: Callable[..., Any], inputs: Sequence[Any]) -> Any:
    """``fn`` (a module or a graph's GraphModule) run in float64 on ``inputs`` — the fallback
    judge — or None when it cannot run so (quantized ops reject float64)."""
    try:
        m64 = copy.deepcopy(fn).double()
        with torch.no_grad():
            return m64(*[x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                         for x in inputs])
    except Exception:  # integer-only kernels, float32 casts the model insists on: no judge
        return None
