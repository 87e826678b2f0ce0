"""Fused attention (csrc/attention.cpp) against the NumPy reference (llmcore.reference.attention),
and the reference against finite differences.

Every kernel result is compared with the float64 reference as ||a - b|| / ||b||; the bar is 1e-4
and at most 10x what the float32 reference itself gets on the same inputs (plus 1e-6, so that
near-exact cases do not demand exactness).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import llmcore
from llmcore import ops, positions, reference
from helpers import attention_inputs, numerical_grad

attention_ops = importlib.import_module("llmcore.ops.attention")  # the module, not the function

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The subprocess imports the same llmcore as this process (installed or in-tree), never the bare
# source tree, which has no compiled module after a plain `pip install .`.
_PYTHONPATH = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(llmcore.__file__)),
                                          os.environ.get("PYTHONPATH")] if p)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.linalg.norm(a - b)
    return 0.0 if diff == 0 else float(diff / max(np.linalg.norm(b), 1e-30))


def _f64(*xs):
    return [x.astype(np.float64) for x in xs]


def _check_against_reference(q, k, v, dout, *, causal, alibi_slopes=None, scale=None, bar=1e-4):
    """Runs the kernel forward and backward and checks them against the float64 reference."""
    kw = dict(causal=causal, scale=scale, alibi_slopes=alibi_slopes)
    out, lse = ops.attention(q, k, v, **kw)
    assert out.dtype == np.float32 and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    dq, dk, dv = ops.attention_backward(dout, q, k, v, out, lse, **kw)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape

    q64, k64, v64, do64 = _f64(q, k, v, dout)
    ro, rl = reference.attention(q64, k64, v64, **kw)
    rdq, rdk, rdv = reference.attention_backward(do64, q64, k64, v64, ro, rl, **kw)
    # What NumPy float32 gets on the same inputs calibrates the bar.
    o32, l32 = reference.attention(q, k, v, **kw)
    g32 = reference.attention_backward(dout, q, k, v, o32, l32, **kw)
    for name, ours, ref, ref32 in [("out", out, ro, o32), ("lse", lse, rl, l32), ("dq", dq, rdq, g32[0]),
                                   ("dk", dk, rdk, g32[1]), ("dv", dv, rdv, g32[2])]:
        err, err32 = _rel_err(ours, ref), _rel_err(ref32, ref)
        assert err < bar, f"{name}: relative error {err:.2e} >= {bar}"
        assert err <= 10 * err32 + 1e-6, f"{name}: relative error {err:.2e} vs NumPy float32 {err32:.2e}"
    return out, lse, dq, dk, dv


# (B, T, S, H, Hkv, D): 1, primes, sizes around the vector widths (4/8/16) and the 64 x 64 tiles,
# T != S, T = 1 decoding, short T (the per-row path), D not a power of two, MHA/GQA/MQA, batch 1.
SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (2, 1, 37, 8, 2, 64),      # decoding one token, GQA
    (1, 3, 50, 4, 4, 33),      # a few tokens against a cache, odd D
    (1, 7, 7, 2, 1, 16),       # T just under the AVX-512 tile path
    (1, 64, 64, 2, 2, 64),     # exactly one tile
    (1, 65, 65, 4, 4, 64),     # one query and one key past a tile
    (2, 63, 130, 6, 3, 24),    # T != S, GQA
    (1, 33, 129, 4, 1, 128),   # MQA, D = 128
    (1, 17, 200, 2, 2, 80),    # chunked prefill, D = 80
    (1, 100, 100, 3, 3, 96),
    (1, 40, 41, 2, 2, 256),
    (1, 9, 12, 5, 5, 1),
    (2, 129, 129, 2, 1, 7),
    (1, 31, 200, 8, 2, 40),
]


@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-S{}-H{}-Hkv{}-D{}".format(*s))
def test_matches_float64_reference(shape, causal, alibi):
    B, T, S, H, Hkv, D = shape
    rng = np.random.default_rng(abs(hash((shape, causal, alibi))) % 2**32)
    q, k, v, dout, slopes = attention_inputs(rng, B, T, S, H, Hkv, D, alibi)
    _check_against_reference(q, k, v, dout, causal=causal, alibi_slopes=slopes)


@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
def test_more_queries_than_keys_without_mask(alibi):
    rng = np.random.default_rng(11)
    q, k, v, dout, slopes = attention_inputs(rng, 1, 70, 20, 2, 2, 17, alibi)
    _check_against_reference(q, k, v, dout, causal=False, alibi_slopes=slopes)


def test_explicit_scale_and_large_scores():
    """Scores in the hundreds: the online softmax must rescale without overflow."""
    rng = np.random.default_rng(12)
    q, k, v, dout, _ = attention_inputs(rng, 2, 90, 150, 4, 2, 32, False)
    _check_against_reference(q, k, v, dout, causal=True, scale=20.0)
    _check_against_reference(q, k, v, dout, causal=False, scale=-3.0)
    # Three queries take the per-row decoding path, whose dot products add in another order than
    # the backward's tiles: still within 10x of NumPy float32 (4.6x measured on dv).
    _check_against_reference(q[:, :3], k, v, dout[:, :3], causal=True, scale=20.0)


@pytest.mark.parametrize("simd", llmcore._cpu.supported_simd())
def test_every_simd_level(simd):
    rng = np.random.default_rng(13)
    before = llmcore.simd()
    try:
        llmcore.set_simd(simd)
        for B, T, S, H, Hkv, D in [(1, 65, 70, 4, 2, 64), (1, 5, 33, 2, 1, 19), (2, 1, 9, 2, 2, 8),
                                   (1, 100, 100, 2, 2, 100)]:
            q, k, v, dout, slopes = attention_inputs(rng, B, T, S, H, Hkv, D, True)
            _check_against_reference(q, k, v, dout, causal=True, alibi_slopes=slopes)
            _check_against_reference(q, k, v, dout, causal=False)
    finally:
        llmcore.set_simd(before)


def test_thread_counts_and_both_backward_schemes():
    """1 thread runs the one-pass backward (dq inside the kv pass); 4 threads with a single
    (batch, kv head) pair run the two-pass one. Both match the reference and each other, and a
    repeated call is bitwise identical."""
    rng = np.random.default_rng(14)
    before = llmcore.get_num_threads()
    try:
        for shape in [(1, 150, 150, 4, 1, 64), (1, 100, 130, 3, 1, 20), (2, 80, 80, 4, 2, 32)]:
            q, k, v, dout, slopes = attention_inputs(rng, *shape, True)
            results = {}
            for n in (1, 2, 4):
                llmcore.set_num_threads(n)
                results[n] = _check_against_reference(q, k, v, dout, causal=True, alibi_slopes=slopes)
                again = ops.attention_backward(dout, q, k, v, *results[n][:2], alibi_slopes=slopes)
                for a, b in zip(again, results[n][2:]):
                    assert np.array_equal(a, b), "backward is not deterministic for a fixed thread count"
            for n in (2, 4):
                for a, b in zip(results[n], results[1]):
                    assert _rel_err(a, b) < 1e-5
    finally:
        llmcore.set_num_threads(before)


def test_views_into_fused_qkv_buffers():
    rng = np.random.default_rng(15)
    B, T, H, D = 2, 70, 4, 24
    # MHA: one (B, T, 3, H, D) buffer, as a c_attn projection produces it.
    qkv = rng.standard_normal((B, T, 3, H, D)).astype(np.float32)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.flags.c_contiguous and attention_ops._head_view("q", q) is q  # no copy is made
    dout = rng.standard_normal((B, T, H, D)).astype(np.float32)
    got = _check_against_reference(q, k, v, dout, causal=True)
    dense = _check_against_reference(*(np.ascontiguousarray(x) for x in (q, k, v)), dout, causal=True)
    for a, b in zip(got, dense):
        assert np.array_equal(a, b), "a strided view must give exactly the dense result"

    # GQA: (B, T, H + 2 Hkv, D), query heads first, then keys, then values.
    Hq, Hkv = 6, 2
    buf = rng.standard_normal((B, T, Hq + 2 * Hkv, D)).astype(np.float32)
    q, k, v = buf[:, :, :Hq], buf[:, :, Hq:Hq + Hkv], buf[:, :, Hq + Hkv:]
    dout = rng.standard_normal((B, T, Hq, D)).astype(np.float32)
    got = _check_against_reference(q, k, v, dout, causal=True)
    dense = _check_against_reference(*(np.ascontiguousarray(x) for x in (q, k, v)), dout, causal=True)
    for a, b in zip(got, dense):
        assert np.array_equal(a, b)

    # Head-major storage (B, H, T, D) seen as (B, T, H, D), and a reversed sequence axis.
    qh = rng.standard_normal((B, H, T, D)).astype(np.float32)
    kh = rng.standard_normal((B, H, T, D)).astype(np.float32)
    vh = rng.standard_normal((B, T, H, D)).astype(np.float32)
    q, k, v = qh.transpose(0, 2, 1, 3), kh.transpose(0, 2, 1, 3), vh[:, ::-1]
    dout = rng.standard_normal((B, T, H, D)).astype(np.float32)
    got = _check_against_reference(q, k, v, dout, causal=False)
    dense = _check_against_reference(*(np.ascontiguousarray(x) for x in (q, k, v)), dout, causal=False)
    for a, b in zip(got, dense):
        assert np.array_equal(a, b)


def test_decoding_one_token_at_a_time_matches_the_full_pass():
    """Query i of a causal pass over N tokens equals decoding token i against a cache of i + 1
    keys (T = 1, S = i + 1), and a chunk of 5 queries against all N keys equals its last rows."""
    rng = np.random.default_rng(16)
    B, N, H, Hkv, D = 2, 40, 4, 2, 32
    q, k, v, _, slopes = attention_inputs(rng, B, N, N, H, Hkv, D, True)
    out, lse = ops.attention(q, k, v, alibi_slopes=slopes)
    for i in range(N):
        o1, l1 = ops.attention(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], alibi_slopes=slopes)
        assert _rel_err(o1[:, 0], out[:, i]) < 1e-5
        assert _rel_err(l1[:, :, 0], lse[:, :, i]) < 1e-5
    o5, l5 = ops.attention(q[:, -5:], k, v, alibi_slopes=slopes)
    assert _rel_err(o5, out[:, -5:]) < 1e-5 and _rel_err(l5, lse[:, :, -5:]) < 1e-5


def test_nan_stays_in_its_row():
    rng = np.random.default_rng(17)
    q, k, v, dout, _ = attention_inputs(rng, 1, 80, 80, 2, 2, 16, False)
    q[0, 30, 1, 3] = np.nan
    out, lse = ops.attention(q, k, v)
    assert np.isnan(out[0, 30, 1]).all() and np.isnan(lse[0, 1, 30])
    bad = np.zeros(out.shape, bool)
    bad[0, 30, 1] = True
    assert np.isfinite(out[~bad]).all()
    k[0, 50, 0, 0] = np.inf  # key 50 is seen (causal) by queries 50.. of head 0 only
    out, _ = ops.attention(q, k, v)
    assert np.isfinite(out[0, :50, 0]).all() and np.isnan(out[0, 50:, 0]).any()


def test_empty_query_axis():
    rng = np.random.default_rng(18)
    q, k, v, dout, _ = attention_inputs(rng, 2, 0, 5, 2, 1, 8, False)
    out, lse = ops.attention(q, k, v)
    assert out.shape == (2, 0, 2, 8) and lse.shape == (2, 2, 0)
    dq, dk, dv = ops.attention_backward(dout, q, k, v, out, lse)
    assert dq.shape == q.shape and not dk.any() and not dv.any()


# --- the reference on its own -------------------------------------------------------------------

@pytest.mark.parametrize("causal,alibi,Hkv,rope", [(True, False, 3, False), (True, True, 1, False), (False, True, 3, False),
                                                  (False, False, 1, False), (True, True, 1, True), (False, True, 3, True)])
def test_reference_backward_matches_finite_differences(causal, alibi, Hkv, rope):
    """With rope, dq and dk are the gradients for the unrotated q and k: the direction of the
    backward rotation is checked here, against the loss itself."""
    rng = np.random.default_rng(19)
    B, T, S, H, D = 1, 3, 5, 3, 4
    q, k, v, dout, slopes = (x if x is None else x.astype(np.float64)
                             for x in attention_inputs(rng, B, T, S, H, Hkv, D, alibi))
    kw = dict(causal=causal, alibi_slopes=slopes, rope=positions.rope_tables(S, D) if rope else None)
    out, lse = reference.attention(q, k, v, **kw)
    grads = reference.attention_backward(dout, q, k, v, out, lse, **kw)

    def out_of(which):  # out as a function of q, k or v alone, the other two fixed
        return lambda x: reference.attention(*[x if i == which else a for i, a in enumerate((q, k, v))], **kw)[0]

    for which, grad in enumerate(grads):
        fd = numerical_grad(out_of(which), (q, k, v)[which].copy(), dout)
        assert _rel_err(grad, fd) < 1e-7, f"{'qkv'[which]}: reference gradient vs finite differences"


def test_reference_matches_plain_formulas():
    """GQA equals MHA on explicitly repeated heads; lse is log-sum-exp of the masked scores."""
    rng = np.random.default_rng(20)
    B, T, S, H, Hkv, D = 2, 4, 6, 4, 2, 3
    q, k, v, dout, slopes = (x.astype(np.float64) for x in attention_inputs(rng, B, T, S, H, Hkv, D, True))
    out, lse = reference.attention(q, k, v, alibi_slopes=slopes)
    kr, vr = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    out_r, lse_r = reference.attention(q, kr, vr, alibi_slopes=slopes)
    assert np.allclose(out, out_r) and np.allclose(lse, lse_r)
    dq, dk, dv = reference.attention_backward(dout, q, k, v, out, lse, alibi_slopes=slopes)
    dq_r, dk_r, dv_r = reference.attention_backward(dout, q, kr, vr, out_r, lse_r, alibi_slopes=slopes)
    assert np.allclose(dq, dq_r)
    assert np.allclose(dk, dk_r.reshape(B, S, Hkv, 2, D).sum(3))
    assert np.allclose(dv, dv_r.reshape(B, S, Hkv, 2, D).sum(3))
    # One row by hand: batch 1, head 3 (kv head 1), query 2 at key position S - T + 2 = 4.
    b, h, i, pos = 1, 3, 2, 4
    s = np.array([q[b, i, h] @ k[b, j, 1] / np.sqrt(D) - slopes[h] * abs(pos - j) for j in range(pos + 1)])
    assert np.isclose(lse[b, h, i], np.log(np.exp(s).sum()))
    p = np.exp(s - lse[b, h, i])
    assert np.allclose(out[b, i, h], p @ v[b, :pos + 1, 1])
    assert reference.attention(q.astype(np.float32), k, v)[0].dtype == np.float32


# --- bad input ----------------------------------------------------------------------------------

def _good(B=2, T=5, S=7, H=4, Hkv=2, D=8):
    rng = np.random.default_rng(21)
    return attention_inputs(rng, B, T, S, H, Hkv, D, True)


def _bad_forward_cases():
    q, k, v, _, slopes = _good()
    f = ops.attention
    return [
        ("q", TypeError, lambda: f(q.tolist(), k, v)),
        ("q", TypeError, lambda: f(q.astype(np.float64), k, v)),
        ("k", TypeError, lambda: f(q, k.astype(np.int32), v)),
        ("q", ValueError, lambda: f(q[0], k, v)),
        ("v", ValueError, lambda: f(q, k, v[None])),
        ("k", ValueError, lambda: f(q, k[:1], v[:1])),                      # B mismatch
        ("k", ValueError, lambda: f(q, k[..., :4], v[..., :4])),            # D mismatch
        ("v", ValueError, lambda: f(q, k, v[:, :6])),                       # v is not k's shape
        ("k", ValueError, lambda: f(q[:, :, :3], k, v)),                    # H=3, Hkv=2
        ("k", ValueError, lambda: f(q, k[:, :, :0], v[:, :, :0])),          # Hkv = 0
        ("k", ValueError, lambda: f(q, k[:, :4], v[:, :4])),                # causal with S < T
        ("k", ValueError, lambda: f(q, k[:, :0], v[:, :0], causal=False)),  # no keys
        ("q", ValueError, lambda: f(q[..., :0], k[..., :0], v[..., :0])),   # D = 0
        ("q", ValueError, lambda: f(q[..., ::2], k[..., ::2], v[..., ::2])),  # last axis strided
        ("alibi_slopes", ValueError, lambda: f(q, k, v, alibi_slopes=slopes[:3])),
        ("alibi_slopes", ValueError, lambda: f(q, k, v, alibi_slopes=slopes[None])),
        ("alibi_slopes", TypeError, lambda: f(q, k, v, alibi_slopes=slopes.astype(np.float64))),
        ("scale", TypeError, lambda: f(q, k, v, scale="0.1")),
        ("scale", ValueError, lambda: f(q, k, v, scale=float("nan"))),
        ("causal", TypeError, lambda: f(q, k, v, causal="yes")),
    ]


def _bad_backward_cases():
    q, k, v, dout, slopes = _good()
    out, lse = ops.attention(q, k, v)
    f = ops.attention_backward
    return [
        ("lse", ValueError, lambda: f(dout, q, k, v, out, lse.transpose(0, 2, 1))),
        ("lse", ValueError, lambda: f(dout, q, k, v, out, lse[..., None])),
        ("lse", TypeError, lambda: f(dout, q, k, v, out, lse.astype(np.float64))),
        ("dout", ValueError, lambda: f(dout[:, :4], q, k, v, out, lse)),
        ("dout", TypeError, lambda: f(dout.astype(np.float16), q, k, v, out, lse)),
        ("out", ValueError, lambda: f(dout, q, k, v, out[..., :4], lse)),
        ("k", ValueError, lambda: f(dout, q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), out, lse)),
        ("alibi_slopes", ValueError, lambda: f(dout, q, k, v, out, lse, alibi_slopes=slopes[:1])),
    ]


@pytest.mark.parametrize("case", range(len(_bad_forward_cases())))
def test_bad_forward_input_is_named(case):
    name, exc, call = _bad_forward_cases()[case]
    with pytest.raises(exc, match=rf"^{name}:"):
        call()


@pytest.mark.parametrize("case", range(len(_bad_backward_cases())))
def test_bad_backward_input_is_named(case):
    name, exc, call = _bad_backward_cases()[case]
    with pytest.raises(exc, match=rf"^{name}:"):
        call()


def _run_script(script: str, timeout: float):
    env = dict(os.environ, PYTHONPATH=_PYTHONPATH)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_fuzzed_input_raises_or_is_right():
    """Random ranks, shapes, dtypes, strides and empty axes, in a subprocess so that a crash fails
    the test: every call either matches the reference or raises TypeError/ValueError."""
    out = _run_script("""
        import numpy as np
        from hypothesis import given, settings, strategies as st, HealthCheck
        from llmcore import ops, reference

        def close(a, b):  # relative, with an absolute floor for gradients that are exactly 0
            d = np.linalg.norm(np.asarray(a, np.float64) - b)
            return d <= 1e-4 * np.linalg.norm(b) + 1e-6 * np.sqrt(b.size)

        FAULTS = ["dtype", "int", "rank", "d_mismatch", "v_shape", "heads", "no_keys", "causal_short",
                  "strided_d", "alibi_short", "alibi_f64"]
        @settings(max_examples=200, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(B=st.integers(0, 3), T=st.integers(0, 10), extra_keys=st.integers(0, 6),
               Hkv=st.integers(1, 3), G=st.integers(0, 3), D=st.integers(1, 9), causal=st.booleans(),
               alibi=st.booleans(), view=st.sampled_from(["dense", "fused", "transposed"]),
               fault=st.sampled_from([None] * len(FAULTS) + FAULTS), seed=st.integers(0, 99))
        def check(B, T, extra_keys, Hkv, G, D, causal, alibi, view, fault, seed):
            rng = np.random.default_rng(seed)
            S = max(T + extra_keys, 1)
            if fault == "causal_short":
                S, causal = max(T - 1, 0), True
            if fault == "no_keys":
                S = 0
            H = G * Hkv + (1 if fault == "heads" else 0)
            dtype = {"dtype": np.float64, "int": np.int32}.get(fault, np.float32)
            def arr(*shape):
                return rng.standard_normal(shape).astype(dtype)
            if view == "fused":
                buf = arr(B, max(T, S), H + 2 * Hkv, D)
                q, k, v = buf[:, :T, :H], buf[:, :S, H:H + Hkv], buf[:, :S, H + Hkv:]
            else:
                q, k, v = arr(B, T, H, D), arr(B, S, Hkv, D), arr(B, S, Hkv, D)
                if view == "transposed":
                    q = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
            if fault == "rank":
                q = q.reshape(q.shape[0] * q.shape[1], *q.shape[2:])
            elif fault == "d_mismatch":
                k, v = k[..., :-1], v[..., :-1]
            elif fault == "v_shape":
                v = v[:, :-1]
            elif fault == "strided_d":
                k = np.repeat(k, 2, axis=3)[..., ::2]
            slopes = rng.uniform(0, 1, H).astype(np.float32) if alibi else None
            if fault == "alibi_short":
                slopes = np.ones(max(H - 1, 0), np.float32)
            elif fault == "alibi_f64":
                slopes = np.ones(H)
            try:
                out, lse = ops.attention(q, k, v, causal=causal, alibi_slopes=slopes)
                dout = rng.standard_normal(out.shape).astype(np.float32)
                dq, dk, dv = ops.attention_backward(dout, q, k, v, out, lse, causal=causal, alibi_slopes=slopes)
            except (TypeError, ValueError) as exc:
                assert str(exc).split(":")[0] in {"q", "k", "v", "alibi_slopes"}, exc
                return
            f64 = lambda x: np.asarray(x, np.float64)
            ro, rl = reference.attention(f64(q), f64(k), f64(v), causal=causal, alibi_slopes=slopes)
            grads = reference.attention_backward(f64(dout), f64(q), f64(k), f64(v), ro, rl,
                                                 causal=causal, alibi_slopes=slopes)
            for a, b in zip((out, lse, dq, dk, dv), (ro, rl, *grads)):
                assert a.shape == b.shape and close(a, b), (a.shape, b.shape)
            check.ok += 1
            # A fault may be harmless: one query head more still divides by a single kv head, a
            # strided D of width 1 (or an empty view) has no stride to get wrong, and a slope
            # vector one shorter than H = 0 is still (H,). Every other fault must have raised.
            harmless = {"heads": Hkv == 1, "strided_d": D == 1 or k.size == 0, "alibi_short": H == 0}
            assert fault is None or harmless.get(fault, False), fault
        check.ok = 0
        check()
        print("valid calls:", check.ok)
    """, timeout=300)
    valid = int(out.split("valid calls:")[1])
    print(f"fuzz: {valid} of 200 calls were valid")
    assert valid >= 40  # the fuzzer must also reach the kernel


def test_direct_binding_checks_shapes():
    q, k, v, dout, _ = _good()
    with pytest.raises(ValueError):
        llmcore._cpu.attention_forward(q, k[:, :, :1].repeat(3, 2), v, True, 0.3, None)
    out, lse = llmcore._cpu.attention_forward(q, k, v, True, 0.3, None)
    with pytest.raises(ValueError):
        llmcore._cpu.attention_backward(dout, q, k, v, out, lse[:, :1], True, 0.3, None)


# --- memory -------------------------------------------------------------------------------------

def test_long_sequence_never_materialises_scores():
    """B=1, H=8, T=S=8192, D=64, causal: one head's score matrix alone would be 256 MiB (2 GiB for
    all eight); forward and backward must stay within their inputs, outputs and small tiles."""
    t0 = time.perf_counter()
    out = _run_script("""
        import json, resource
        import numpy as np
        from llmcore import ops
        B, T, H, D = 1, 8192, 8, 64
        rng = np.random.default_rng(0)
        q, k, v, dout = (rng.standard_normal((B, T, H, D), dtype=np.float32) for _ in range(4))
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        base = peak()
        o, lse = ops.attention(q, k, v, causal=True)
        fwd = peak()
        dq, dk, dv = ops.attention_backward(dout, q, k, v, o, lse, causal=True)
        print(json.dumps({"base": base, "fwd": fwd, "bwd": peak(), "finite": bool(np.isfinite(o).all())}))
    """, timeout=120)
    r = json.loads(out.strip().splitlines()[-1])
    mib = 2**20
    print(f"peak RSS: inputs {r['base'] / mib:.0f} MiB, after forward {r['fwd'] / mib:.0f} MiB, "
          f"after backward {r['bwd'] / mib:.0f} MiB ({time.perf_counter() - t0:.1f} s)")
    assert r["finite"]
    # Outputs: out 16 MiB + lse; dq, dk, dv 48 MiB. Everything else must be small tiles.
    assert r["fwd"] - r["base"] < 16 * mib + 48 * mib
    assert r["bwd"] - r["base"] < 64 * mib + 48 * mib
    assert r["bwd"] < 1024 * mib


# gradients written into given views (the q, k, v slices of a fused QKV gradient) ---------------

@pytest.mark.parametrize("B,T,H,Hkv,D", [(2, 70, 4, 2, 64), (1, 33, 3, 1, 24), (2, 5, 2, 2, 7)],
                         ids=["gqa-one-pass", "mqa-two-pass", "tiny-odd-D"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_backward_writes_into_fused_gradient_views(B, T, H, Hkv, D, causal):
    """The same bits as fresh gradients, in every slice of (B, T, H + 2 Hkv, D), nothing outside
    them touched. (B=1, Hkv=1 has too few (batch, kv head) pairs for the one-pass scheme.)"""
    rng = np.random.default_rng(11)
    q, k, v, dout, _ = attention_inputs(rng, B, T, T, H, Hkv, D, False)
    out, lse = ops.attention(q, k, v, causal=causal)
    fresh = ops.attention_backward(dout, q, k, v, out, lse, causal=causal)
    fused = np.full((B, T, H + 2 * Hkv + 1, D), 7.0, np.float32)  # one spare head: must stay 7
    views = fused[:, :, :H], fused[:, :, H:H + Hkv], fused[:, :, H + Hkv:H + 2 * Hkv]
    got = ops.attention_backward(dout, q, k, v, out, lse, causal=causal, dq=views[0], dk=views[1], dv=views[2])
    for g, view, f in zip(got, views, fresh):
        assert g is view
        np.testing.assert_array_equal(view, f)
    assert (fused[:, :, -1] == 7.0).all()
    ref = reference.attention_backward(*_f64(dout, q, k, v, out, lse), causal=causal,
                                       dq=np.zeros(q.shape), dk=np.zeros(k.shape), dv=np.zeros(v.shape))
    for g, r in zip(got, ref):
        assert _rel_err(g, r) < 1e-4


def test_backward_gradient_outputs_are_checked():
    rng = np.random.default_rng(12)
    q, k, v, dout, _ = attention_inputs(rng, 1, 8, 8, 2, 1, 16, False)
    out, lse = ops.attention(q, k, v)
    grads = [np.zeros_like(a) for a in (q, k, v)]
    call = lambda dq, dk, dv: ops.attention_backward(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv)
    with pytest.raises(ValueError, match="all three"):
        call(grads[0], grads[1], None)
    with pytest.raises(ValueError, match="dk: expected shape"):
        call(grads[0], grads[0], grads[2])
    with pytest.raises(ValueError, match="dq: must not overlap q"):
        call(q, grads[1], grads[2])
    with pytest.raises(ValueError, match="dv: must not overlap dk"):
        call(grads[0], grads[1], grads[1])
    with pytest.raises(ValueError, match="dq: the last axis"):
        call(np.zeros((1, 8, 2, 32), np.float32)[..., ::2], grads[1], grads[2])
    readonly = np.zeros_like(q)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="dq: written in place"):
        call(readonly, grads[1], grads[2])
    with pytest.raises(TypeError, match="dq"):
        call(grads[0].astype(np.float64), grads[1], grads[2])
    # the compiled entry point checks shapes and the contiguous last axis itself
    with pytest.raises(ValueError, match="dk"):
        llmcore._cpu.attention_backward(dout, q, k, v, out, lse, True, 0.25, None, grads[0], grads[0], grads[2])
    assert all(not g.any() for g in grads)  # nothing was written by a refused call
