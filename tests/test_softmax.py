import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llmcore import ops, reference as ref
from helpers import ROW_SHAPES, assert_close, f64, numerical_grad, randn, rel_err

TOL = 1e-5


@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_softmax_forward_and_backward(simd, rng, shape):
    x = randn(rng, shape, scale=3.0)
    y = ops.softmax(x)
    assert_close(y, ref.softmax(*f64(x)), TOL, "y")
    dy = randn(rng, shape)
    assert_close(ops.softmax_backward(dy, y), ref.softmax_backward(*f64(dy, y)), TOL, "dx")


def test_softmax_is_stable_for_large_inputs(rng):
    x = randn(rng, (4, 100)) + np.float32(80.0)  # exp(x) alone would overflow float32
    x[0, 0] = 1e30
    y = ops.softmax(x)
    assert np.isfinite(y).all()
    assert_close(y, ref.softmax(*f64(x)), TOL)


def test_softmax_propagates_nan_and_handles_inf():
    x = np.array([[0.0, np.nan, 1.0], [0.0, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf]], np.float32)
    y = ops.softmax(x)
    assert np.isnan(y[0]).all()
    np.testing.assert_allclose(y[1], ref.softmax(x[1].astype(np.float64)), rtol=1e-6)
    assert np.isnan(y[2]).all()  # 0/0, as in the reference


def test_reference_softmax_backward_matches_finite_differences(rng):
    x, dy = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    np.testing.assert_allclose(ref.softmax_backward(dy, ref.softmax(x)),
                               numerical_grad(ref.softmax, x, dy), rtol=1e-6, atol=1e-9)


@given(rows=st.integers(1, 40), cols=st.integers(1, 700), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=30, deadline=None)
def test_softmax_random_shapes(rows, cols, seed):
    rng = np.random.default_rng(seed)
    x, dy = randn(rng, (rows, cols), scale=4.0), randn(rng, (rows, cols))
    y = ops.softmax(x)
    assert rel_err(y, ref.softmax(*f64(x))) <= TOL
    # dx = y (dy - <dy, y>) cancels where dy is nearly even across a row (found at 2 columns):
    # the float32 error is bounded by the size of the terms, not of the result.
    dy64, y64 = f64(dy, y)
    terms = y64 * (np.abs(dy64) + np.abs((dy64 * y64).sum(axis=-1, keepdims=True)))
    err = np.linalg.norm(ops.softmax_backward(dy, y) - ref.softmax_backward(dy64, y64))
    assert err <= TOL * np.linalg.norm(terms)
