"""The one comparison (graphopt.compare): structure, shapes, dtypes and NaN/inf placement are
checked before values, so no wrong result hides behind a max-error that cannot see it."""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn

from graphopt.compare import INT8_MIN_SQNR_DB, compare
from graphopt.testing import assert_close, assert_matches_eager

X = torch.tensor([[1.0, -2.0, 3.0, 0.5]])


class TwoOutputs(nn.Module):
    def forward(self, x):
        return x * 2, x + 1


class Affine(nn.Module):
    def forward(self, x):
        return x * 3 - 1


# ------------------------------------------------------------------------ what must fail
BAD = {
    "all NaN": (X, torch.full_like(X, math.nan)),
    "NaN in a new place": (X, X.clone().index_fill_(1, torch.tensor([2]), math.nan)),
    "NaN moved": (X.clone().index_fill_(1, torch.tensor([0]), math.nan),
                  X.clone().index_fill_(1, torch.tensor([1]), math.nan)),
    "inf where eager is finite": (X, X.clone().index_fill_(1, torch.tensor([1]), math.inf)),
    "-inf for +inf": (X.clone().index_fill_(1, torch.tensor([1]), math.inf),
                      X.clone().index_fill_(1, torch.tensor([1]), -math.inf)),
    "missing second output": ((X, X + 1), (X,)),
    "extra output": ((X,), (X, X + 1)),
    "float64 for float32": (X, X.double()),
    "int64 for float32": (X, X.long()),
    "shape (4,) for (1, 4)": (X, X.reshape(4)),
    "bare tensor for a one-tuple": ((X,), X),
    "dict with a wrong key": ({"logits": X, "hidden": X}, {"logits": X, "hiden": X}),
    "dict with a missing key": ({"logits": X, "hidden": X}, {"logits": X}),
    "nested tuple of another structure": ((X, (X, X)), ((X, X), X)),
    "tuple for a dict": ({"logits": X}, (X,)),
    "None for a tensor": ((X, X), (X, None)),
    "wrong value": (X, X + 1e-2),
}


@pytest.mark.parametrize("rung", ["exact", "algebraic", "half"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_every_kind_of_difference_fails_on_every_float_rung(case, rung):
    expected, actual = BAD[case]
    if case == "wrong value" and rung == "half":
        actual = X + 1e-1  # 1e-2 is within the half rung
    result = compare(expected, actual, rung)
    assert not result.ok and result.message, case
    with pytest.raises(AssertionError):
        assert_close(actual, expected, rung)


@pytest.mark.parametrize("case", sorted(set(BAD) - {"wrong value", "NaN moved", "-inf for +inf"}))
def test_structure_and_new_nan_fail_on_the_int8_and_lossy_rungs_too(case):
    expected, actual = BAD[case]
    assert not compare(expected, actual, "int8").ok
    assert not compare(expected, actual, "lossy").ok


def test_structure_is_checked_before_values_and_named():
    result = compare((X, X), (X + 5, X.double()), "algebraic")
    assert result.message == "outputs[1] has dtype torch.float64, expected torch.float32"
    assert result.error == math.inf
    assert "outputs[1] has 1 outputs, expected 2" in compare((X, (X, X)), (X, (X,)), "exact").message
    assert "keys ['a', 'c'], expected ['a', 'b']" in compare({"a": X, "b": X}, {"a": X, "c": X}, "exact").message


def test_the_float64_fallback_does_not_forgive_structure():
    # a max error over zip(...) cannot see a missing output, and NaN > tol is false
    truth = (X.double() * 2, X.double() + 1)
    assert not compare((X * 2, X + 1), (X * 2,), "algebraic", truth).ok
    assert not compare((X * 2, X + 1), (X * 2, torch.full_like(X, math.nan)), "algebraic", truth).ok
    with pytest.raises(AssertionError, match="1 outputs, expected 2"):
        assert_matches_eager((X * 2,), TwoOutputs(), (X,))
    with pytest.raises(AssertionError, match="NaN"):
        assert_matches_eager((X * 2, torch.full_like(X, math.nan)), TwoOutputs(), (X,))
    with pytest.raises(AssertionError, match="dtype torch.float64"):
        assert_matches_eager(Affine()(X).double(), Affine(), (X,))
    with pytest.raises(AssertionError, match=r"shape \(4,\)"):
        assert_matches_eager(Affine()(X).reshape(4), Affine(), (X,))


# ------------------------------------------------------------------------ what must pass
def test_fp32_reordering_noise_passes_the_algebraic_rung():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=g), torch.randn(256, 32, generator=g)
    blocked = sum(a[:, i:i + 16] @ b[i:i + 16] for i in range(0, 256, 16))  # another summation order
    assert not torch.equal(blocked, a @ b)
    assert compare(a @ b, blocked, "algebraic").ok
    assert not compare(a @ b, blocked, "exact").ok


def test_nan_and_inf_in_the_same_places_pass():
    e = torch.tensor([1.0, math.nan, math.inf, -math.inf, 2.0])
    a = e.clone()
    a[4] += 1e-6
    assert compare(e, e.clone(), "exact").ok
    assert compare(e, a, "algebraic").ok
    assert compare((e, {"k": [e]}), (e.clone(), {"k": [a]}), "algebraic").ok


def test_an_ill_conditioned_result_is_rescued_by_float64():
    # eager fp32 is 1e-3 off the truth here; a result as close to the truth passes
    eager, truth = torch.tensor([1e-3]), torch.tensor([0.0], dtype=torch.float64)
    ours = torch.tensor([-1e-3])
    assert not compare(eager, ours, "algebraic").ok
    assert compare(eager, ours, "algebraic", truth=truth).ok
    assert compare(eager, ours, "algebraic", truth=lambda: truth).ok  # computed only when needed
    assert not compare(eager, torch.tensor([2.1e-3 + 1e-3]), "algebraic", truth=truth).ok


def test_a_layer_norm_of_nearly_constant_values_computed_more_accurately_matches_eager():
    # LayerNorm over nearly constant values amplifies fp32 rounding, in eager too
    class NearlyConstantNorm(nn.Module):
        def forward(self, x):
            return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-12)

    x = 1000.0 + 1e-4 * torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    model = NearlyConstantNorm()
    truth = model(x.double())
    ours = truth.float()  # a result computed more accurately than eager fp32
    assert not compare(model(x), ours, "algebraic").ok
    assert_matches_eager(ours, model, (x,))


def test_tuples_lists_numpy_and_dataclasses():
    @dataclass
    class Out:
        logits: torch.Tensor
        extra: tuple

    assert compare((X, X), [X, X.clone()], "exact").ok  # a tuple and a list hold the same outputs
    assert compare(X, X.numpy().copy(), "exact").ok
    assert not compare(X, X.numpy().astype(np.float64), "exact").ok
    assert compare(Out(X, (X, 1)), Out(X.clone(), (X, 1)), "exact").ok
    assert not compare(Out(X, (X, 1)), Out(X, (X, 2)), "exact").ok


def test_a_graph_one_tuple_matches_a_bare_model_output():
    assert_close((Affine()(X),), Affine()(X))  # Graph.__call__ always returns a tuple


# ------------------------------------------------------------------------ int8 and lossy
def test_int8_rung_is_sqnr_against_the_reference():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1000, generator=g)
    noise = torch.randn(1000, generator=g)
    just_inside = ref + noise * ref.norm() / noise.norm() * 10 ** (-(INT8_MIN_SQNR_DB + 1) / 20)
    just_outside = ref + noise * ref.norm() / noise.norm() * 10 ** (-(INT8_MIN_SQNR_DB - 1) / 20)
    assert compare(ref, just_inside, "int8").ok
    bad = compare(ref, just_outside, "int8")
    assert not bad.ok and "SQNR 19.0 dB" in bad.message


def test_lossy_rung_checks_only_structure_and_new_nan():
    assert compare(X, torch.zeros_like(X), "lossy").ok
    assert compare(torch.full_like(X, math.nan), torch.zeros_like(X), "lossy").ok  # NaN may go away
    assert not compare(X, torch.full_like(X, math.inf), "lossy").ok


def test_an_unknown_rung_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown tolerance 'close'"):
        compare(X, X, "close")


def test_int8_kernels_against_a_fake_quant_reference_stay_within_one_step():
    ref = torch.linspace(-127.0, 127.0, 2001)  # one quantization step is 1.0
    assert compare(ref, ref + 1.0, "int8", fake_quant=True).ok
    assert not compare(ref, ref + 1.1, "int8", fake_quant=True).ok
    moved = ref.clone()
    moved[::1000] += 3.0  # 3 of 2001 elements three steps off: 99.85% within one step
    bad = compare(ref, moved, "int8", fake_quant=True)
    assert not bad.ok and "99.85% of elements within one quantization step" in bad.message
    assert compare(ref, moved, "int8").ok  # the same noise is far above 20 dB SQNR
    moved[1000] -= 3.0  # 2 of 2001 off: 99.9% within one step is allowed
    assert compare(ref, moved, "int8", fake_quant=True).ok
