import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llmcore import ops, reference as ref
from helpers import assert_close, f64, numerical_grad, randn, rel_err

TOL = 1e-5


@pytest.mark.parametrize("N,V", [(1, 1), (1, 2), (3, 17), (7, 65), (33, 129), (5, 1031), (2, 50257)])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_cross_entropy_forward_and_backward(simd, rng, N, V, ignore_index):
    logits = randn(rng, (N, V), scale=3.0)
    targets = rng.integers(0, V, N)
    targets[::3] = ignore_index if ignore_index < 0 else targets[::3]
    loss, lse = ops.cross_entropy(logits, targets, ignore_index=ignore_index)
    rloss, rlse = ref.cross_entropy(*f64(logits), targets, ignore_index=ignore_index)
    assert loss.shape == lse.shape == (N,)
    assert_close(loss, rloss, TOL, "loss")
    assert_close(lse, rlse, TOL, "lse")
    assert (loss[targets == ignore_index] == 0).all()

    dloss = randn(rng, (N,))
    dlogits = ops.cross_entropy_backward(dloss, logits, targets, lse, ignore_index=ignore_index)
    expected = ref.cross_entropy_backward(*f64(dloss, logits), targets, rlse, ignore_index=ignore_index)
    assert_close(dlogits, expected, TOL, "dlogits")
    assert (dlogits[targets == ignore_index] == 0).all()


def test_targets_of_any_integer_dtype(rng):
    logits = randn(rng, (6, 10))
    targets = rng.integers(0, 10, 6)
    expected = ops.cross_entropy(logits, targets)[0]
    for dtype in (np.int32, np.uint8, np.int16):
        np.testing.assert_array_equal(ops.cross_entropy(logits, targets.astype(dtype))[0], expected)


def test_cross_entropy_is_stable_for_extreme_logits():
    logits = np.array([[1e4, 0.0, -1e4], [-np.inf, 0.0, 1.0], [-np.inf, -np.inf, -np.inf]], np.float32)
    loss, lse = ops.cross_entropy(logits, np.array([0, 2, 1]))
    assert loss[0] == 0 and np.isfinite(loss[1])
    assert lse[2] == -np.inf  # every class impossible: lse = log(0), no NaN from inf - inf
    np.testing.assert_allclose(loss[:2], ref.cross_entropy(logits[:2].astype(np.float64), np.array([0, 2]))[0], rtol=1e-6)


def test_reference_cross_entropy_backward_matches_finite_differences(rng):
    logits, targets, dloss = rng.standard_normal((4, 6)), np.array([1, -100, 5, 0]), rng.standard_normal(4)
    _, lse = ref.cross_entropy(logits, targets)
    np.testing.assert_allclose(ref.cross_entropy_backward(dloss, logits, targets, lse),
                               numerical_grad(lambda t: ref.cross_entropy(t, targets)[0], logits, dloss),
                               rtol=1e-6, atol=1e-9)


@given(N=st.integers(1, 64), V=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=30, deadline=None)
def test_cross_entropy_random_shapes(N, V, seed):
    rng = np.random.default_rng(seed)
    logits, targets, dloss = randn(rng, (N, V), scale=5.0), rng.integers(0, V, N), randn(rng, (N,))
    loss, lse = ops.cross_entropy(logits, targets)
    rloss, rlse = ref.cross_entropy(*f64(logits), targets)
    floss, flse = ref.cross_entropy(logits, targets)
    # one row's loss can be a small difference of large terms (lse - logit): the float32 bar
    assert_close(loss, rloss, TOL, "loss", float32_ref=floss)
    assert_close(lse, rlse, TOL, "lse", float32_ref=flse)
    dlogits = ops.cross_entropy_backward(dloss, logits, targets, lse)
    assert_close(dlogits, ref.cross_entropy_backward(*f64(dloss, logits), targets, rlse), TOL, "dlogits",
                 float32_ref=ref.cross_entropy_backward(dloss, logits, targets, flse))
