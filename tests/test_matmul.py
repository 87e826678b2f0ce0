import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llmcore
from llmcore import ops, reference as ref
from helpers import MATMUL_SHAPES, assert_close, f64, numerical_grad, randn, rel_err

TOL = 1e-4


@pytest.mark.parametrize("M,N,K", MATMUL_SHAPES)
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_matches_reference(simd, rng, M, N, K, transpose_a, transpose_b):
    a = randn(rng, (K, M) if transpose_a else (M, K))
    b = randn(rng, (N, K) if transpose_b else (K, N))
    out = ops.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    expected = ref.matmul(*f64(a, b), transpose_a=transpose_a, transpose_b=transpose_b)
    assert out.shape == (M, N)
    assert_close(out, expected, TOL)


def test_matmul_is_exact_on_small_integers(simd, rng):
    # Every partial sum is an integer below 2^24, so float32 must reproduce it exactly.
    for M, N, K in [(37, 41, 300), (6, 33, 1000), (145, 7, 257)]:
        a = rng.integers(-8, 9, (M, K)).astype(np.float32)
        b = rng.integers(-8, 9, (K, N)).astype(np.float32)
        np.testing.assert_array_equal(ops.matmul(a, b), (a.astype(np.int64) @ b.astype(np.int64)).astype(np.float32))


def test_wide_panels_take_long_k_in_chunks(simd, rng):
    # A packed B panel holds at most 2^21 floats: with N = 4100 (a 4096-wide panel and a ragged
    # one) a K of 1100 goes through in chunks of 512 rows, the last one ragged. The bias belongs
    # to the first chunk only, and an accumulating weight gradient adds every chunk. Small
    # integers keep every partial sum exact, so any misplaced or repeated block shows.
    M, K, N = 13, 1100, 4100
    a = rng.integers(-2, 3, (M, K)).astype(np.float32)
    w = rng.integers(-2, 3, (N, K)).astype(np.float32)
    bias = rng.integers(-4, 5, N).astype(np.float32)
    exact = a.astype(np.int64) @ w.T.astype(np.int64)
    np.testing.assert_array_equal(ops.matmul(a, w, transpose_b=True), exact.astype(np.float32))
    np.testing.assert_array_equal(ops.linear(a, w, bias), (exact + bias.astype(np.int64)).astype(np.float32))
    x = rng.integers(-2, 3, (600, N)).astype(np.float32)  # dweight (5, 4100) sums K = 600 rows
    dy = rng.integers(-2, 3, (600, 5)).astype(np.float32)
    grad = np.ones((5, N), np.float32)
    ops.linear_backward(dy, x, rng.standard_normal((5, N)).astype(np.float32), dweight=grad)
    np.testing.assert_array_equal(grad, (1 + dy.T.astype(np.int64) @ x.astype(np.int64)).astype(np.float32))


def test_weight_gradients_split_k_into_pieces(simd, rng, threads):
    # dW = dy^T @ x with a small dW and K >= 2048 runs as pieces of 1024 rows of K, each its own
    # GEMM, piece 0 into dW (with bias and accumulation), the others into partials added after.
    # K = 2500 gives pieces 1024, 1024, 452; (37, 50) is ragged in rows and columns. Exact small
    # integers show a piece lost, repeated or added to the wrong place; a float run must give the
    # same bits on one thread as on two (the pieces are fixed by the shape, not the threads).
    M, N, K = 37, 50, 2500
    dy = rng.integers(-2, 3, (K, M)).astype(np.float32)
    x = rng.integers(-2, 3, (K, N)).astype(np.float32)
    exact = dy.T.astype(np.int64) @ x.astype(np.int64)
    np.testing.assert_array_equal(ops.matmul(dy, x, transpose_a=True), exact.astype(np.float32))
    grad = np.full((M, N), 3, np.float32)
    ops.linear_backward(dy, x, randn(rng, (M, N)), dweight=grad)
    np.testing.assert_array_equal(grad, (3 + exact).astype(np.float32))
    dy, x = randn(rng, (K, M)), randn(rng, (K, N))
    assert_close(ops.matmul(dy, x, transpose_a=True), ref.matmul(*f64(dy, x), transpose_a=True), TOL)
    llmcore.set_num_threads(1)
    one = ops.matmul(dy, x, transpose_a=True)
    llmcore.set_num_threads(2)
    np.testing.assert_array_equal(one, ops.matmul(dy, x, transpose_a=True))


@pytest.mark.parametrize("batch", [(1,), (3,), (2, 5)])
@pytest.mark.parametrize("shared_b", [True, False])
@pytest.mark.parametrize("transpose_a", [False, True])
def test_batched_matmul(rng, batch, shared_b, transpose_a):
    M, N, K = 9, 17, 33
    a = randn(rng, batch + ((K, M) if transpose_a else (M, K)))
    b = randn(rng, (K, N) if shared_b else batch + (K, N))
    out = ops.matmul(a, b, transpose_a=transpose_a)
    assert out.shape == batch + (M, N)
    assert_close(out, ref.matmul(*f64(a, b), transpose_a=transpose_a), TOL)


def test_transposed_views_need_no_flag(rng):
    a = randn(rng, (40, 30))
    b = randn(rng, (50, 40))
    assert_close(ops.matmul(a.T, b.T), f64(a)[0].T @ f64(b)[0].T, TOL)
    c = randn(rng, (45, 20))[::3]  # (15, 20), every third row
    assert_close(ops.matmul(a[:, ::2], c), f64(a[:, ::2])[0] @ f64(c)[0], TOL)


def test_empty_dimensions(rng):
    assert ops.matmul(np.zeros((0, 5), np.float32), randn(rng, (5, 3))).shape == (0, 3)
    assert ops.matmul(randn(rng, (4, 5)), np.zeros((5, 0), np.float32)).shape == (4, 0)
    np.testing.assert_array_equal(ops.matmul(np.zeros((4, 0), np.float32), np.zeros((0, 3), np.float32)), np.zeros((4, 3)))


def test_result_does_not_depend_on_thread_count(rng, threads):
    a, b = randn(rng, (300, 200)), randn(rng, (200, 170))
    llmcore.set_num_threads(1)
    one = ops.matmul(a, b)
    llmcore.set_num_threads(2)
    np.testing.assert_array_equal(one, ops.matmul(a, b))


@given(M=st.integers(1, 80), N=st.integers(1, 80), K=st.integers(1, 300),
       ta=st.booleans(), tb=st.booleans(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_matmul_random_shapes(M, N, K, ta, tb, seed):
    rng = np.random.default_rng(seed)
    a = randn(rng, (K, M) if ta else (M, K))
    b = randn(rng, (N, K) if tb else (K, N))
    out = ops.matmul(a, b, transpose_a=ta, transpose_b=tb)
    # A 1x1 result of a long dot product can cancel: judged against what float32 NumPy gets
    # (hypothesis found M=N=1, K=247 at 1.6e-4 with NumPy's own float32 error near it).
    assert_close(out, ref.matmul(*f64(a, b), transpose_a=ta, transpose_b=tb), TOL,
                 float32_ref=ref.matmul(a, b, transpose_a=ta, transpose_b=tb))


# linear ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape,out_features", [((1, 1), 1), ((7, 33), 17), ((2, 5, 64), 129), ((145, 31), 65), ((3,), 5)])
@pytest.mark.parametrize("has_bias", [False, True])
def test_linear_forward_and_backward(simd, rng, x_shape, out_features, has_bias):
    x = randn(rng, x_shape)
    w = randn(rng, (out_features, x_shape[-1]))
    b = randn(rng, (out_features,)) if has_bias else None
    y = ops.linear(x, w, b)
    assert_close(y, ref.linear(*f64(x, w, b)), TOL, "y")

    dy = randn(rng, y.shape)
    dx, dw, db = ops.linear_backward(dy, x, w, has_bias=has_bias)
    rdx, rdw, rdb = ref.linear_backward(*f64(dy, x, w), has_bias=has_bias)
    assert_close(dx, rdx, TOL, "dx")
    assert_close(dw, rdw, TOL, "dweight")
    if has_bias:
        assert_close(db, rdb, 1e-5, "dbias")
    else:
        assert db is None


@pytest.mark.parametrize("x_shape,out_features", [((7, 33), 17), ((300, 40), 600), ((0, 5), 3)])
@pytest.mark.parametrize("has_bias", [False, True])
def test_linear_backward_adds_into_given_gradients(simd, rng, x_shape, out_features, has_bias):
    # A training step accumulates: dweight/dbias passed in are added into, in place, and returned
    # (x (300, 40) -> 600 runs the GEMM with several K blocks and the bias over several strips).
    x, w = randn(rng, x_shape), randn(rng, (out_features, x_shape[-1]))
    dy = randn(rng, x_shape[:-1] + (out_features,))
    gw, gb = randn(rng, w.shape), randn(rng, (out_features,)) if has_bias else None
    gw0, gb0 = gw.copy(), None if gb is None else gb.copy()
    dx, dw, db = ops.linear_backward(dy, x, w, has_bias=has_bias, dweight=gw, dbias=gb)
    rdx, rdw, rdb = ref.linear_backward(*f64(dy, x, w), has_bias=has_bias)
    assert dw is gw and db is gb
    assert_close(dx, rdx, TOL, "dx")
    assert_close(gw, gw0 + rdw, TOL, "dweight")
    if has_bias:
        assert_close(gb, gb0 + rdb, 1e-5, "dbias")
    # the reference accumulates the same way
    rgw = gw0.astype(np.float64)
    rgb = None if gb0 is None else gb0.astype(np.float64)
    ref.linear_backward(*f64(dy, x, w), has_bias=has_bias, dweight=rgw, dbias=rgb)
    assert_close(gw, rgw, TOL, "reference dweight")


@pytest.mark.parametrize("bad", ["dbias_without_bias", "bias_without_dbias", "dbias_only", "shape", "dtype",
                                 "readonly", "strided"])
def test_linear_backward_rejects_bad_accumulators(rng, bad):
    x, w, dy = randn(rng, (4, 3)), randn(rng, (2, 3)), randn(rng, (4, 2))
    gw, gb = np.zeros((2, 3), np.float32), np.zeros(2, np.float32)
    has_bias, kw = True, dict(dweight=gw, dbias=gb)
    if bad == "dbias_without_bias":
        has_bias = False
    elif bad == "bias_without_dbias":
        kw = dict(dweight=gw)
    elif bad == "dbias_only":
        kw = dict(dbias=gb)
    elif bad == "shape":
        kw["dweight"] = np.zeros((3, 2), np.float32)
    elif bad == "dtype":
        kw["dweight"] = np.zeros((2, 3))
    elif bad == "readonly":
        gw.flags.writeable = False
    elif bad == "strided":
        kw["dweight"] = np.zeros((2, 6), np.float32)[:, ::2]
    with pytest.raises((ValueError, TypeError)):
        ops.linear_backward(dy, x, w, has_bias=has_bias, **kw)
    assert not gb.any()  # nothing was added before the error


def test_reference_linear_backward_matches_finite_differences(rng):
    x, w, b = (rng.standard_normal(s) for s in [(2, 3, 4), (5, 4), (5,)])
    dy = rng.standard_normal((2, 3, 5))
    dx, dw, db = ref.linear_backward(dy, x, w, has_bias=True)
    np.testing.assert_allclose(dx, numerical_grad(lambda t: ref.linear(t, w, b), x, dy), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, numerical_grad(lambda t: ref.linear(x, t, b), w, dy), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, numerical_grad(lambda t: ref.linear(x, w, t), b, dy), rtol=1e-6, atol=1e-8)


# linear with a residual (a skip connection the GEMM adds in its epilogue) -----------------------

# (x shape, out_features) against MR = 6/12-row micro-tiles, NR = 8/16/32-column panels and KC =
# 256: whole tiles over three K blocks (24 x 64, K 520), ragged rows and columns over two
# (13 x 33, K 300), a 3-D x, more rows than one 288-row block, columns past 512 (A packed, not
# read in place), a 1-D x, and K = 0 (the output is bias + residual alone).
RESIDUAL_SHAPES = [((1, 1), 1), ((24, 520), 64), ((13, 300), 33), ((2, 7, 300), 47), ((3, 5, 520), 96),
                   ((301, 40), 17), ((29, 520), 600), ((145, 257), 65), ((3,), 5), ((4, 0), 6), ((0, 5), 3)]


@pytest.mark.parametrize("x_shape,out_features", RESIDUAL_SHAPES)
@pytest.mark.parametrize("has_bias", [False, True])
def test_linear_with_residual_matches_reference(simd, rng, x_shape, out_features, has_bias):
    x = randn(rng, x_shape)
    w = randn(rng, (out_features, x_shape[-1]))
    b = randn(rng, (out_features,)) if has_bias else None
    # As large as x @ w.T itself, so a residual missing from any tile (or added twice) shows.
    r = randn(rng, x_shape[:-1] + (out_features,), scale=max(1.0, np.sqrt(x_shape[-1])))
    r0 = r.copy()
    y = ops.linear(x, w, b, residual=r)
    assert y.shape == r.shape
    assert_close(y, ref.linear(*f64(x, w, b, r)), TOL, "y")
    np.testing.assert_array_equal(r, r0)  # an input: read, never written
    # the reference adds it last, to what linear gives without it
    np.testing.assert_array_equal(ref.linear(*f64(x, w, b), residual=f64(r)[0]), ref.linear(*f64(x, w, b)) + f64(r)[0])


def test_linear_residual_is_added_once_exactly(simd, rng):
    # Small integers keep every partial sum exact (below 2^24), so the residual added once and
    # only once, on the first of several K blocks, with and without bias, on whole and ragged
    # tiles, shows bit for bit. 13 x 4100 x 1100 takes K in chunks of 512 rows in a 4096-wide
    # panel and a 4-wide one: the residual belongs to the first chunk only.
    for M, N, K in [(37, 41, 300), (24, 64, 1000), (145, 7, 257), (30, 600, 520), (2, 3, 5), (13, 4100, 1100)]:
        x = rng.integers(-4, 5, (M, K)).astype(np.float32)
        w = rng.integers(-4, 5, (N, K)).astype(np.float32)
        bias = rng.integers(-64, 65, N).astype(np.float32)
        r = rng.integers(-1000, 1001, (M, N)).astype(np.float32)
        exact = x.astype(np.int64) @ w.T.astype(np.int64) + r.astype(np.int64)
        np.testing.assert_array_equal(ops.linear(x, w, residual=r), exact.astype(np.float32), f"{M}x{N}x{K}")
        with_bias = (exact + bias.astype(np.int64)).astype(np.float32)
        np.testing.assert_array_equal(ops.linear(x, w, bias, residual=r), with_bias, f"{M}x{N}x{K} with bias")


def test_linear_residual_views_are_read_as_their_values(rng):
    # A residual that is not C-contiguous (a transposed or strided view) gives the same result as
    # its contiguous copy.
    x, w = randn(rng, (9, 40)), randn(rng, (33, 40))
    rt = randn(rng, (33, 9)).T  # (9, 33), Fortran order
    rs = randn(rng, (9, 66))[:, ::2]  # (9, 33), every other column
    for r in (rt, rs):
        assert not r.flags.c_contiguous
        np.testing.assert_array_equal(ops.linear(x, w, residual=r), ops.linear(x, w, residual=np.ascontiguousarray(r)))
        assert_close(ops.linear(x, w, residual=r), ref.linear(*f64(x, w), residual=f64(r)[0]), TOL)


def test_linear_residual_does_not_depend_on_thread_count(rng, threads):
    x, w, r = randn(rng, (300, 520)), randn(rng, (70, 520)), randn(rng, (300, 70))
    llmcore.set_num_threads(1)
    one = ops.linear(x, w, residual=r)
    llmcore.set_num_threads(2)
    np.testing.assert_array_equal(one, ops.linear(x, w, residual=r))


def test_reference_linear_residual_matches_finite_differences(rng):
    x, w, b, r = (rng.standard_normal(s) for s in [(2, 3, 4), (5, 4), (5,), (2, 3, 5)])
    dy = rng.standard_normal((2, 3, 5))
    # the residual's gradient is dy itself; x's and weight's are those of linear without it
    np.testing.assert_allclose(numerical_grad(lambda t: ref.linear(x, w, b, t), r, dy), dy, rtol=1e-6, atol=1e-8)
    dx, dw, _ = ref.linear_backward(dy, x, w, has_bias=True)
    np.testing.assert_allclose(dx, numerical_grad(lambda t: ref.linear(t, w, b, r), x, dy), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, numerical_grad(lambda t: ref.linear(x, t, b, r), w, dy), rtol=1e-6, atol=1e-8)
