import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llmcore
from llmcore import ops, reference as ref
from helpers import assert_close, f64, randn


@pytest.mark.parametrize("V,C", [(1, 1), (7, 3), (65, 64), (50, 65), (300, 257)])
@pytest.mark.parametrize("ids_shape", [(), (1,), (5,), (2, 7), (3, 1, 33)])
def test_embedding_forward_and_backward(simd, rng, V, C, ids_shape):
    weight = randn(rng, (V, C))
    ids = rng.integers(0, V, ids_shape)
    out = ops.embedding(weight, ids)
    assert out.shape == ids_shape + (C,)
    np.testing.assert_array_equal(out, ref.embedding(weight, ids))  # a gather is exact

    dout = randn(rng, out.shape)
    dweight = ops.embedding_backward(dout, ids, V)
    assert dweight.shape == (V, C)
    assert_close(dweight, ref.embedding_backward(*f64(dout), ids, V), 1e-6,
                 float32_ref=ref.embedding_backward(dout, ids, V))


def test_repeated_ids_accumulate_deterministically(rng, threads):
    dout = randn(rng, (1000, 48))
    ids = rng.integers(0, 3, 1000)  # every row lands on one of three ids
    expected = ref.embedding_backward(dout.astype(np.float64), ids, 5)
    for n in (1, 2):
        llmcore.set_num_threads(n)
        got = ops.embedding_backward(dout, ids, 5)
        np.testing.assert_array_equal(got, ops.embedding_backward(dout, ids, 5))
        assert_close(got, expected, 1e-6)
        assert (got[3:] == 0).all()


def test_backward_zeroes_every_row_of_a_large_reused_block(rng, threads):
    """A vocabulary table of more than one zeroing piece (2^18 floats) plus a ragged tail, from the
    output pool: the second call gets the first one's block back, with gradient in every row, so
    a row left unzeroed would show."""
    V, C = 1100, 300  # 330,000 floats: one whole piece and part of another
    ids = rng.integers(0, 40, 512)  # the second call's gradient reaches only the first 40 rows
    for n in (1, 2):
        llmcore.set_num_threads(n)
        first = ops.embedding_backward(randn(rng, (V, C)) + 5.0, np.arange(V), V)
        assert (first != 0).all()
        del first  # back to the pool, where the next call finds it
        dout = randn(rng, (512, C))
        got = ops.embedding_backward(dout, ids, V)
        assert (got[40:] == 0).all()
        assert_close(got, ref.embedding_backward(dout.astype(np.float64), ids, V), 1e-6)


@given(V=st.integers(1, 200), C=st.integers(1, 200), n=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=30, deadline=None)
def test_embedding_random_shapes(V, C, n, seed):
    rng = np.random.default_rng(seed)
    weight, ids = randn(rng, (V, C)), rng.integers(0, V, n)
    np.testing.assert_array_equal(ops.embedding(weight, ids), weight[ids])
    dout = randn(rng, (n, C))
    np.testing.assert_allclose(ops.embedding_backward(dout, ids, V),
                               ref.embedding_backward(dout.astype(np.float64), ids, V), rtol=1e-5, atol=1e-5)
