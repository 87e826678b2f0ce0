import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llmcore
from llmcore import ops, reference as ref
from helpers import ROW_SHAPES, assert_close, f64, numerical_grad, randn, rel_err

TOL = 1e-5


@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_rmsnorm_forward_and_backward(simd, rng, shape):
    x = randn(rng, shape, scale=2.0)
    w = randn(rng, shape[-1:])
    y, rstd = ops.rmsnorm(x, w)
    ry, rrstd = ref.rmsnorm(*f64(x, w))
    assert rstd.shape == shape[:-1]
    assert_close(y, ry, TOL, "y")
    assert_close(rstd, rrstd, TOL, "rstd")

    dy = randn(rng, shape)
    dx, dw = ops.rmsnorm_backward(dy, x, w, rstd)
    rdx, rdw = ref.rmsnorm_backward(*f64(dy, x, w, rrstd))
    assert_close(dx, rdx, TOL, "dx", float32_ref=ref.rmsnorm_backward(dy, x, w, rstd)[0])
    assert_close(dw, rdw, TOL, "dweight")


def test_eps_is_used(rng):
    x = randn(rng, (3, 8), scale=1e-3)
    w = randn(rng, (8,))
    for eps in (0.0, 1e-5, 1.0):
        assert_close(ops.rmsnorm(x, w, eps)[0], ref.rmsnorm(*f64(x, w), eps)[0], TOL)


def test_weight_gradient_is_deterministic_per_thread_count(rng, threads):
    x, w, dy = randn(rng, (1001, 64)), randn(rng, (64,)), randn(rng, (1001, 64))
    _, rstd = ops.rmsnorm(x, w)
    for n in (1, 2, 3):
        llmcore.set_num_threads(n)
        first = ops.rmsnorm_backward(dy, x, w, rstd)[1]
        np.testing.assert_array_equal(first, ops.rmsnorm_backward(dy, x, w, rstd)[1])
        assert_close(first, ref.rmsnorm_backward(*f64(dy, x, w, rstd))[1], TOL)


def test_reference_rmsnorm_backward_matches_finite_differences(rng):
    x, w, dy = rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal((3, 5))
    _, rstd = ref.rmsnorm(x, w)
    dx, dw = ref.rmsnorm_backward(dy, x, w, rstd)
    np.testing.assert_allclose(dx, numerical_grad(lambda t: ref.rmsnorm(t, w)[0], x, dy), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dw, numerical_grad(lambda t: ref.rmsnorm(x, t)[0], w, dy), rtol=1e-6, atol=1e-9)


# C >= 2: over one channel dx cancels to ~eps/x^2 of its terms, which only the fixed-seed
# test above checks (against twice the float32 reference's own error).
@given(rows=st.integers(1, 40), C=st.integers(2, 700), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=30, deadline=None)
def test_rmsnorm_random_shapes(rows, C, seed):
    rng = np.random.default_rng(seed)
    x, w, dy = randn(rng, (rows, C)), randn(rng, (C,)), randn(rng, (rows, C))
    y, rstd = ops.rmsnorm(x, w)
    ry, rrstd = ref.rmsnorm(*f64(x, w))
    assert rel_err(y, ry) <= TOL
    dx, dw = ops.rmsnorm_backward(dy, x, w, rstd)
    rdx, rdw = ref.rmsnorm_backward(*f64(dy, x, w, rrstd))
    assert_close(dx, rdx, TOL, "dx", float32_ref=ref.rmsnorm_backward(dy, x, w, rstd)[0])
    assert_close(dw, rdw, TOL, "dweight")


# The gradient around the norm (a skip connection x + f(rmsnorm(x))) added to dx by the kernel.
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_rmsnorm_backward_adds_residual(simd, rng, shape):
    x, w, dy = randn(rng, shape, scale=2.0), randn(rng, shape[-1:]), randn(rng, shape)
    r = randn(rng, shape)
    r0 = r.copy()
    _, rstd = ops.rmsnorm(x, w)
    dx_plain, dw_plain = ops.rmsnorm_backward(dy, x, w, rstd)
    dx, dw = ops.rmsnorm_backward(dy, x, w, rstd, residual=r)
    assert dx.dtype == np.float32 and dx.shape == shape
    # added to each finished dx row: the float32 sum, bit for bit
    np.testing.assert_array_equal(dx, dx_plain + r)
    np.testing.assert_array_equal(dw, dw_plain)  # dweight does not see it
    np.testing.assert_array_equal(r, r0)
    rdx, rdw = ref.rmsnorm_backward(*f64(dy, x, w), ref.rmsnorm(*f64(x, w))[1], *f64(r))
    assert_close(dx, rdx, TOL, "dx", float32_ref=ref.rmsnorm_backward(dy, x, w, rstd, r)[0])
    assert_close(dw, rdw, TOL, "dweight")


def test_rmsnorm_backward_residual_view_and_threads(rng, threads):
    # A non-contiguous residual reads as its values; rows split over threads add their own rows.
    x, w, dy = randn(rng, (1001, 64)), randn(rng, (64,)), randn(rng, (1001, 64))
    r = randn(rng, (64, 1001)).T
    _, rstd = ops.rmsnorm(x, w)
    for n in (1, 2, 3):
        llmcore.set_num_threads(n)
        dx, _ = ops.rmsnorm_backward(dy, x, w, rstd, residual=r)
        np.testing.assert_array_equal(dx, ops.rmsnorm_backward(dy, x, w, rstd)[0] + r)


def test_reference_rmsnorm_backward_residual_matches_finite_differences(rng):
    # d/dx of sum(rmsnorm(x) * dy) + sum(x * r): the norm's gradient plus the skip's.
    x, w, dy, r = (rng.standard_normal(s) for s in [(3, 5), (5,), (3, 5), (3, 5)])
    _, rstd = ref.rmsnorm(x, w)
    dx, _ = ref.rmsnorm_backward(dy, x, w, rstd, r)
    fd = numerical_grad(lambda t: ref.rmsnorm(t, w)[0], x, dy) + numerical_grad(lambda t: t, x, r)
    np.testing.assert_allclose(dx, fd, rtol=1e-6, atol=1e-9)
