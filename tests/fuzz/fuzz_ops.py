"""Fuzzes every public operation with wrong and odd inputs; run as a script, in a subprocess of
tests/test_bad_input.py, so that a crash (a segfault in a kernel) fails that test instead of
killing the test run.

Each operation gets arguments built from a valid call and then bent by hypothesis: another dtype,
a dimension added, dropped, resized or emptied, a non-contiguous view, a non-array. Every call
must either return the reference's answer or raise TypeError/ValueError naming an argument.
"""
from __future__ import annotations

import sys

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from llmcore import ops, reference as ref

DTYPES = [np.float32, np.float32, np.float32, np.float64, np.float16, np.int32, np.int64, np.bool_, np.complex64]


@st.composite
def bent_array(draw, shape, kind="float"):
    """An array meant to have `shape` (and float32 or int64 dtype), possibly bent out of shape."""
    shape = list(shape)
    change = draw(st.sampled_from(["none", "none", "none", "dtype", "add", "drop", "resize", "empty", "strided", "object"]))
    if change == "add":
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(1, 3)))
    elif change == "drop" and shape:
        shape.pop(draw(st.integers(0, len(shape) - 1)))
    elif change == "resize" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(1, 9))
    elif change == "empty" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = 0
    if change == "object":
        return draw(st.sampled_from([None, 3.0, [1.0, 2.0], "x"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    if kind == "int":
        dtype = np.int64 if change != "dtype" else draw(st.sampled_from([np.float32, np.int32, np.uint8, np.bool_]))
        hi = draw(st.integers(1, 12))
        arr = rng.integers(-1 if draw(st.booleans()) else 0, hi, shape).astype(dtype)
    else:
        dtype = np.float32 if change != "dtype" else draw(st.sampled_from(DTYPES))
        arr = (rng.standard_normal(shape) * 2).astype(dtype)
    if change == "strided" and arr.ndim:
        axis = draw(st.integers(0, arr.ndim - 1))
        arr = np.repeat(arr, 2, axis=axis)[(slice(None),) * axis + (slice(None, None, 2),)]
    return arr


def dims(lo=1, hi=9):
    return st.integers(lo, hi)


def check(call, reference, arg_names):
    """Runs `call`; an error must be TypeError/ValueError naming an argument; a result must
    match `reference` (run on float64 copies of the same inputs)."""
    try:
        out = call()
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        assert any(name in msg for name in arg_names), f"error does not name an argument: {msg!r}"
        return
    expected = reference()
    outs = out if isinstance(out, tuple) else (out,)
    exps = expected if isinstance(expected, tuple) else (expected,)
    for o, e in zip(outs, exps):
        if o is None and e is None:
            continue
        assert o.dtype == np.float32, o.dtype
        assert o.shape == np.shape(e), (o.shape, np.shape(e))
        np.testing.assert_allclose(o, e, rtol=2e-3, atol=2e-3)


def f64(x):
    return x.astype(np.float64) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@FUZZ
@given(st.data(), dims(), dims(), dims(), st.booleans(), st.booleans())
def fuzz_matmul(data, M, N, K, ta, tb):
    a = data.draw(bent_array((K, M) if ta else (M, K)))
    b = data.draw(bent_array((N, K) if tb else (K, N)))
    check(lambda: ops.matmul(a, b, transpose_a=ta, transpose_b=tb),
          lambda: ref.matmul(f64(a), f64(b), transpose_a=ta, transpose_b=tb), ["a", "b"])


@FUZZ
@given(st.data(), dims(), dims(), dims(), st.booleans())
def fuzz_linear(data, rows, n_in, n_out, has_bias):
    x, w = data.draw(bent_array((rows, n_in))), data.draw(bent_array((n_out, n_in)))
    b = data.draw(bent_array((n_out,))) if has_bias else None
    check(lambda: ops.linear(x, w, b), lambda: ref.linear(f64(x), f64(w), f64(b)), ["x", "weight", "bias"])
    dy = data.draw(bent_array((rows, n_out)))
    check(lambda: ops.linear_backward(dy, x, w, has_bias=has_bias),
          lambda: ref.linear_backward(f64(dy), f64(x), f64(w), has_bias=has_bias), ["dy", "x", "weight"])


@FUZZ
@given(st.data(), dims(), dims(), dims(), st.booleans())
def fuzz_linear_accumulate(data, rows, n_in, n_out, has_bias):
    # The gradients added into given arrays: bent accumulators must be refused before anything
    # is written; good ones end up as reference + their old values. (dy, x and weight are valid
    # here: fuzz_linear bends those.)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in [(rows, n_in), (n_out, n_in), (rows, n_out)])
    gw = data.draw(bent_array((n_out, n_in)))
    gb = data.draw(bent_array((n_out,))) if has_bias else None
    before = [g.copy() if isinstance(g, np.ndarray) else g for g in (gw, gb)]
    try:
        ops.linear_backward(dy, x, w, has_bias=has_bias, dweight=gw, dbias=gb)
    except (TypeError, ValueError) as exc:
        assert any(n in str(exc) for n in ("dy", "x", "weight", "dweight", "dbias")), str(exc)
        for g, g0 in zip((gw, gb), before):  # untouched
            if isinstance(g, np.ndarray) and g.size:
                np.testing.assert_array_equal(g, g0)
        return
    if gw is None and gb is None:  # drawn as None: no accumulators, fresh gradients (fuzz_linear's case)
        return
    rgw, rgb = (None if g is None else g.astype(np.float64) for g in before)
    ref.linear_backward(f64(dy), f64(x), f64(w), has_bias=has_bias, dweight=rgw, dbias=rgb)
    np.testing.assert_allclose(gw, rgw, rtol=2e-3, atol=2e-3)
    if has_bias:
        np.testing.assert_allclose(gb, rgb, rtol=2e-3, atol=2e-3)


@FUZZ
@given(st.data(), dims(), dims())
def fuzz_softmax(data, rows, cols):
    x, dy = data.draw(bent_array((rows, cols))), data.draw(bent_array((rows, cols)))
    check(lambda: ops.softmax(x), lambda: ref.softmax(f64(x)), ["x"])
    check(lambda: ops.softmax_backward(dy, x), lambda: ref.softmax_backward(f64(dy), f64(x)), ["dy", "y"])


@FUZZ
@given(st.data(), dims(), dims())
def fuzz_norms(data, rows, C):
    x, w, b = data.draw(bent_array((rows, C))), data.draw(bent_array((C,))), data.draw(bent_array((C,)))
    dy, stat = data.draw(bent_array((rows, C))), data.draw(bent_array((rows,)))
    check(lambda: ops.rmsnorm(x, w), lambda: ref.rmsnorm(f64(x), f64(w)), ["x", "weight"])
    check(lambda: ops.layernorm(x, w, b), lambda: ref.layernorm(f64(x), f64(w), f64(b)), ["x", "weight", "bias"])
    rstd = np.abs(stat) + 0.5 if isinstance(stat, np.ndarray) and stat.dtype.kind == "f" else stat
    check(lambda: ops.rmsnorm_backward(dy, x, w, rstd), lambda: ref.rmsnorm_backward(f64(dy), f64(x), f64(w), f64(rstd)),
          ["dy", "x", "weight", "rstd"])
    check(lambda: ops.layernorm_backward(dy, x, w, stat, rstd),
          lambda: ref.layernorm_backward(f64(dy), f64(x), f64(w), f64(stat), f64(rstd)), ["dy", "x", "weight", "mean", "rstd"])


@FUZZ
@given(st.data(), dims(), dims(), st.sampled_from(["tanh", "none", "erf", None]))
def fuzz_gelu(data, rows, cols, approximate):
    x, dy = data.draw(bent_array((rows, cols))), data.draw(bent_array((rows, cols)))
    check(lambda: ops.gelu(x, approximate), lambda: ref.gelu(f64(x), approximate), ["x", "approximate"])
    check(lambda: ops.gelu_backward(dy, x, approximate), lambda: ref.gelu_backward(f64(dy), f64(x), approximate),
          ["dy", "x", "approximate"])


@FUZZ
@given(st.data(), dims(), dims(1, 12))
def fuzz_cross_entropy(data, N, V):
    logits, targets = data.draw(bent_array((N, V))), data.draw(bent_array((N,), "int"))
    check(lambda: ops.cross_entropy(logits, targets), lambda: ref.cross_entropy(f64(logits), targets), ["logits", "targets"])
    dloss, lse = data.draw(bent_array((N,))), data.draw(bent_array((N,)))
    check(lambda: ops.cross_entropy_backward(dloss, logits, targets, lse),
          lambda: ref.cross_entropy_backward(f64(dloss), f64(logits), targets, f64(lse)), ["dloss", "logits", "targets", "lse"])


@FUZZ
@given(st.data(), dims(1, 12), dims(), dims())
def fuzz_embedding(data, V, C, n):
    weight, ids = data.draw(bent_array((V, C))), data.draw(bent_array((n,), "int"))
    check(lambda: ops.embedding(weight, ids), lambda: ref.embedding(f64(weight), ids), ["weight", "ids"])
    dout = data.draw(bent_array((n, C)))
    check(lambda: ops.embedding_backward(dout, ids, V), lambda: ref.embedding_backward(f64(dout), ids, V), ["dout", "ids", "vocab_size"])


@FUZZ
@given(st.data(), dims(), dims())
def fuzz_adamw(data, rows, cols):
    param, grad = data.draw(bent_array((rows, cols))), data.draw(bent_array((rows, cols)))
    m, v = data.draw(bent_array((rows, cols))), data.draw(bent_array((rows, cols)))
    if isinstance(v, np.ndarray) and v.dtype.kind == "f":
        v = np.abs(v)
    copies = [x.copy() if isinstance(x, np.ndarray) else x for x in (param, grad, m, v)]
    try:
        ops.adamw_step(param, grad, m, v, lr=1e-3, weight_decay=0.1, step=3)
    except (TypeError, ValueError) as exc:
        assert any(n in str(exc) for n in ("param", "grad", "m", "v")), str(exc)
        return
    rp, rg, rm, rv = (x.astype(np.float64) for x in copies)
    ref.adamw_step(rp, rg, rm, rv, lr=1e-3, weight_decay=0.1, step=3)
    np.testing.assert_allclose(param, rp, rtol=1e-4, atol=1e-5)


FUZZERS = [fuzz_matmul, fuzz_linear, fuzz_linear_accumulate, fuzz_softmax, fuzz_norms, fuzz_gelu, fuzz_cross_entropy, fuzz_embedding, fuzz_adamw]

if __name__ == "__main__":
    names = sys.argv[1:]
    for fuzz in FUZZERS:
        if not names or fuzz.__name__ in names:
            fuzz()
            print(f"{fuzz.__name__}: ok", flush=True)
