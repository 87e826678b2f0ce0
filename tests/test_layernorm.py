import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llmcore
from llmcore import ops, reference as ref
from helpers import ROW_SHAPES, assert_close, f64, numerical_grad, randn, rel_err

TOL = 1e-5


@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_layernorm_forward_and_backward(simd, rng, shape):
    x = randn(rng, shape, scale=2.0) + np.float32(0.5)
    w, b = randn(rng, shape[-1:]), randn(rng, shape[-1:])
    y, mean, rstd = ops.layernorm(x, w, b)
    ry, rmean, rrstd = ref.layernorm(*f64(x, w, b))
    assert mean.shape == rstd.shape == shape[:-1]
    assert_close(y, ry, TOL, "y")
    assert_close(mean, rmean, TOL, "mean")
    assert_close(rstd, rrstd, TOL, "rstd")

    dy = randn(rng, shape)
    dx, dw, db = ops.layernorm_backward(dy, x, w, mean, rstd)
    rdx, rdw, rdb = ref.layernorm_backward(*f64(dy, x, w, rmean, rrstd))
    assert_close(dx, rdx, TOL, "dx", float32_ref=ref.layernorm_backward(dy, x, w, mean, rstd)[0])
    assert_close(dw, rdw, TOL, "dweight")
    assert_close(db, rdb, TOL, "dbias")


def test_large_mean_does_not_cancel(rng):
    # E[x^2] - E[x]^2 would lose every digit of the variance here; centring first keeps them.
    x = randn(rng, (4, 300)) + np.float32(1000.0)
    w, b = randn(rng, (300,)), randn(rng, (300,))
    assert_close(ops.layernorm(x, w, b)[0], ref.layernorm(*f64(x, w, b))[0], 1e-4)


def test_gradients_are_deterministic_per_thread_count(rng, threads):
    x, w, dy = randn(rng, (777, 96)), randn(rng, (96,)), randn(rng, (777, 96))
    _, mean, rstd = ops.layernorm(x, w, w)
    for n in (1, 2, 3):
        llmcore.set_num_threads(n)
        first = ops.layernorm_backward(dy, x, w, mean, rstd)
        second = ops.layernorm_backward(dy, x, w, mean, rstd)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)


def test_reference_layernorm_backward_matches_finite_differences(rng):
    x, w, b, dy = rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal((3, 5))
    _, mean, rstd = ref.layernorm(x, w, b)
    dx, dw, db = ref.layernorm_backward(dy, x, w, mean, rstd)
    np.testing.assert_allclose(dx, numerical_grad(lambda t: ref.layernorm(t, w, b)[0], x, dy), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dw, numerical_grad(lambda t: ref.layernorm(x, t, b)[0], w, dy), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(db, numerical_grad(lambda t: ref.layernorm(x, w, t)[0], b, dy), rtol=1e-6, atol=1e-9)


# C >= 3: over one or two channels xhat is +-1 whatever x is, so dx cancels to ~eps/var of its
# terms; the fixed-seed test above checks those shapes against twice float32 NumPy's own error.
@given(rows=st.integers(1, 40), C=st.integers(3, 700), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=30, deadline=None)
def test_layernorm_random_shapes(rows, C, seed):
    rng = np.random.default_rng(seed)
    x, w, b, dy = randn(rng, (rows, C)), randn(rng, (C,)), randn(rng, (C,)), randn(rng, (rows, C))
    y, mean, rstd = ops.layernorm(x, w, b)
    ry, rmean, rrstd = ref.layernorm(*f64(x, w, b))
    assert rel_err(y, ry) <= TOL
    dx, dw, db = ops.layernorm_backward(dy, x, w, mean, rstd)
    rdx, rdw, rdb = ref.layernorm_backward(*f64(dy, x, w, rmean, rrstd))
    assert_close(dx, rdx, TOL, "dx", float32_ref=ref.layernorm_backward(dy, x, w, mean, rstd)[0])
    assert_close(dw, rdw, TOL, "dweight")
    assert_close(db, rdb, TOL, "dbias")


# The gradient around the norm (a skip connection x + f(layernorm(x))) added to dx by the kernel.
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_layernorm_backward_adds_residual(simd, rng, shape):
    x = randn(rng, shape, scale=2.0) + np.float32(0.5)
    w, b, dy = randn(rng, shape[-1:]), randn(rng, shape[-1:]), randn(rng, shape)
    r = randn(rng, shape)
    r0 = r.copy()
    _, mean, rstd = ops.layernorm(x, w, b)
    dx_plain, dw_plain, db_plain = ops.layernorm_backward(dy, x, w, mean, rstd)
    dx, dw, db = ops.layernorm_backward(dy, x, w, mean, rstd, residual=r)
    assert dx.dtype == np.float32 and dx.shape == shape
    # added to each finished dx row: the float32 sum, bit for bit
    np.testing.assert_array_equal(dx, dx_plain + r)
    np.testing.assert_array_equal(dw, dw_plain)  # dweight and dbias do not see it
    np.testing.assert_array_equal(db, db_plain)
    np.testing.assert_array_equal(r, r0)
    _, rmean, rrstd = ref.layernorm(*f64(x, w, b))
    rdx, rdw, rdb = ref.layernorm_backward(*f64(dy, x, w), rmean, rrstd, *f64(r))
    assert_close(dx, rdx, TOL, "dx", float32_ref=ref.layernorm_backward(dy, x, w, mean, rstd, r)[0])
    assert_close(dw, rdw, TOL, "dweight")
    assert_close(db, rdb, TOL, "dbias")


def test_layernorm_backward_residual_view_and_threads(rng, threads):
    # A non-contiguous residual reads as its values; rows split over threads add their own rows.
    x, w, dy = randn(rng, (777, 96)), randn(rng, (96,)), randn(rng, (777, 96))
    r = randn(rng, (777, 192))[:, ::2]
    _, mean, rstd = ops.layernorm(x, w, w)
    for n in (1, 2, 3):
        llmcore.set_num_threads(n)
        dx, _, _ = ops.layernorm_backward(dy, x, w, mean, rstd, residual=r)
        np.testing.assert_array_equal(dx, ops.layernorm_backward(dy, x, w, mean, rstd)[0] + r)


def test_reference_layernorm_backward_residual_matches_finite_differences(rng):
    # d/dx of sum(layernorm(x) * dy) + sum(x * r): the norm's gradient plus the skip's.
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal(5)
    dy, r = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    _, mean, rstd = ref.layernorm(x, w, b)
    dx, _, _ = ref.layernorm_backward(dy, x, w, mean, rstd, r)
    fd = numerical_grad(lambda t: ref.layernorm(t, w, b)[0], x, dy) + numerical_grad(lambda t: t, x, r)
    np.testing.assert_allclose(dx, fd, rtol=1e-6, atol=1e-9)
