"""RoPE fused into the attention kernels: ops.attention(..., rope=rot) and its backward against the
unfused composition (rotate q and k with llmcore.positions, attend, rotate the gradients back), in
float32 through the kernels and in float64 through the NumPy reference.

Positions: key j sits at position j (row j of the table), query i at S - T + i (rows S - T..S - 1),
so with S > T the queries are the last T tokens of a KV cache. q and k are never modified, and dq,
dk are gradients with respect to the unrotated q and k.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import llmcore
from llmcore import ops, positions, reference
from helpers import attention_inputs, rel_err

# The subprocess imports the same llmcore as this process (installed or in-tree).
_PYTHONPATH = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(llmcore.__file__)),
                                          os.environ.get("PYTHONPATH")] if p)

# float32 kernel against the float64 composition; fused against the unfused float32 kernels.
TOL64 = 1e-4
TOL_UNFUSED = 2e-5


def _table(S, D):
    """(S, D/2) complex64, C-contiguous: the first S rows of a longer table, as a model slices it."""
    rot = positions.rope_tables(S + 11, D)[:S]
    assert rot.dtype == np.complex64 and rot.flags.c_contiguous
    return rot


def _rot32(x, rot, conjugate=False):
    """x (B, L, heads, D) float32 rotated by rot (L, D/2) with the CPU core's rope (a fresh array)."""
    fn = positions.rope_backward if conjugate else positions.rope_forward
    return fn(x, np.ascontiguousarray(rot), np.empty(x.shape, np.float32))


def _rot64(x, rot, conjugate=False):
    """The same rotation in float64: one complex multiply by the (complex64) table's exact values."""
    x = np.array(x, dtype=np.float64)  # a C-contiguous copy
    r = np.asarray(rot).astype(np.complex128)
    if conjugate:
        r = r.conj()
    return (x.view(np.complex128) * r[None, :, None, :]).view(np.float64)


def _unfused32(q, k, v, dout, rot, **kw):
    """out, lse, dq, dk, dv of the unfused composition, every step in the float32 CPU kernels."""
    T, S = q.shape[1], k.shape[1]
    rq, rk = rot[S - T:], rot
    qr, kr = _rot32(q, rq), _rot32(k, rk)
    out, lse = ops.attention(qr, kr, v, **kw)
    dqr, dkr, dv = ops.attention_backward(dout, qr, kr, v, out, lse, **kw)
    return out, lse, _rot32(dqr, rq, True), _rot32(dkr, rk, True), dv


def _composition64(q, k, v, dout, rot, **kw):
    """The same composition in float64 through the NumPy reference (no rope= argument used)."""
    T, S = q.shape[1], k.shape[1]
    rq, rk = rot[S - T:], rot
    qr, kr = _rot64(q, rq), _rot64(k, rk)
    v64, do64 = np.asarray(v, np.float64), np.asarray(dout, np.float64)
    out, lse = reference.attention(qr, kr, v64, **kw)
    dqr, dkr, dv = reference.attention_backward(do64, qr, kr, v64, out, lse, **kw)
    return out, lse, _rot64(dqr, rq, True), _rot64(dkr, rk, True), dv


NAMES = ("out", "lse", "dq", "dk", "dv")


def _fused(q, k, v, dout, rot, **kw):
    out, lse = ops.attention(q, k, v, rope=rot, **kw)
    assert out.dtype == np.float32 and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    dq, dk, dv = ops.attention_backward(dout, q, k, v, out, lse, rope=rot, **kw)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    return out, lse, dq, dk, dv


def _check(q, k, v, dout, rot, *, causal, alibi_slopes=None, scale=None):
    """Fused forward + backward against the float32 and float64 compositions; q, k, v, dout, rot
    untouched. Returns the fused results."""
    kw = dict(causal=causal, scale=scale, alibi_slopes=alibi_slopes)
    before = [x.copy() for x in (q, k, v, dout, rot)]
    got = _fused(q, k, v, dout, rot, **kw)
    for name, x, x0 in zip(("q", "k", "v", "dout", "rope"), (q, k, v, dout, rot), before):
        assert np.array_equal(x, x0), f"{name} was modified by the fused attention"
    unfused = _unfused32(q, k, v, dout, rot, **kw)
    exact = _composition64(q, k, v, dout, rot, **kw)
    for name, ours, u, r in zip(NAMES, got, unfused, exact):
        err_u, err64, err_unfused64 = rel_err(ours, u), rel_err(ours, r), rel_err(u, r)
        assert err_u < TOL_UNFUSED, f"{name}: fused vs unfused kernels, relative error {err_u:.2e}"
        assert err64 < TOL64, f"{name}: fused vs float64 composition, relative error {err64:.2e}"
        # no worse than the unfused kernels by more than a small factor
        assert err64 <= 4 * err_unfused64 + 2e-6, \
            f"{name}: fused error {err64:.2e} vs unfused kernels' {err_unfused64:.2e}"
    return got


# (B, T, S, H, Hkv, D): MHA, GQA (4/2), MQA; S > T (KV cache); T < 8 (the per-row decoding path);
# several 64-row blocks; D = 16, 64 and 18, 40 (even, not multiples of 16).
SHAPES = [
    (2, 16, 16, 3, 3, 16),     # MHA
    (1, 33, 33, 4, 2, 64),     # GQA
    (2, 20, 45, 4, 1, 16),     # MQA, S > T
    (1, 5, 37, 4, 2, 16),      # KV cache, short chunk
    (1, 70, 150, 2, 1, 64),    # KV cache, several key and two query blocks
    (2, 1, 50, 4, 2, 64),      # decoding one token
    (1, 3, 50, 2, 2, 18),      # decoding a few tokens, D = 18
    (1, 7, 9, 2, 1, 40),       # just under the AVX-512 tile path, D = 40
    (1, 130, 130, 2, 1, 40),   # three 64-blocks each way, D = 40
    (1, 64, 64, 4, 4, 18),     # exactly one tile, D = 18
]


@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-S{}-H{}-Hkv{}-D{}".format(*s))
def test_fused_rope_matches_composition(rng, shape, causal, alibi):
    B, T, S, H, Hkv, D = shape
    q, k, v, dout, slopes = attention_inputs(rng, B, T, S, H, Hkv, D, alibi)
    _check(q, k, v, dout, _table(S, D), causal=causal, alibi_slopes=slopes)


def test_rope_changes_the_result(rng):
    """Guards the comparisons above: with rope the result is not attention on the unrotated q, k."""
    q, k, v, dout, _ = attention_inputs(rng, 1, 20, 30, 2, 1, 16)
    rot = _table(30, 16)
    out, lse = ops.attention(q, k, v, rope=rot)
    plain, plain_lse = ops.attention(q, k, v)
    assert rel_err(out, plain) > 1e-2 and rel_err(lse, plain_lse) > 1e-3
    # and the query rows are at S - T.., not 0..: rotating q with rows 0..T-1 gives another answer
    wrong, _ = ops.attention(_rot32(q, rot[:20]), _rot32(k, rot), v)
    assert rel_err(out, wrong) > 1e-2


def test_explicit_scale(rng):
    q, k, v, dout, slopes = attention_inputs(rng, 2, 40, 60, 4, 2, 16, True)
    _check(q, k, v, dout, _table(60, 16), causal=True, alibi_slopes=slopes, scale=0.7)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_views_into_fused_qkv_buffer(rng, causal):
    """q, k, v as strided views of one (B, T, H + 2 Hkv, D) buffer: the buffer is left as it was
    (the rotation is not done in place), and the result is bitwise the dense inputs' result."""
    B, T, H, Hkv, D = 2, 70, 4, 2, 40
    buf = rng.standard_normal((B, T, H + 2 * Hkv, D)).astype(np.float32)
    saved = buf.copy()
    q, k, v = buf[:, :, :H], buf[:, :, H:H + Hkv], buf[:, :, H + Hkv:]
    assert not q.flags.c_contiguous and not k.flags.c_contiguous
    dout = rng.standard_normal((B, T, H, D)).astype(np.float32)
    rot = _table(T, D)
    got = _check(q, k, v, dout, rot, causal=causal)
    assert np.array_equal(buf, saved), "the fused QKV buffer was modified"
    dense = _fused(*(np.ascontiguousarray(x) for x in (q, k, v)), dout, rot, causal=causal)
    for name, a, b in zip(NAMES, got, dense):
        assert np.array_equal(a, b), f"{name}: a strided view must give exactly the dense result"


def test_views_into_kv_cache(rng):
    """A chunk of T=5 new queries (a view of a fused buffer) against S=37 cached keys/values read
    as views of a (B, Smax, 2 Hkv, D) cache."""
    B, T, S, Smax, H, Hkv, D = 2, 5, 37, 64, 4, 2, 64
    cache = rng.standard_normal((B, Smax, 2 * Hkv, D)).astype(np.float32)
    qbuf = rng.standard_normal((B, T, H + 2 * Hkv, D)).astype(np.float32)
    saved = cache.copy(), qbuf.copy()
    q, k, v = qbuf[:, :, :H], cache[:, :S, :Hkv], cache[:, :S, Hkv:]
    dout = rng.standard_normal((B, T, H, D)).astype(np.float32)
    _check(q, k, v, dout, _table(S, D), causal=True)
    assert np.array_equal(cache, saved[0]) and np.array_equal(qbuf, saved[1])


def test_decoding_token_by_token_matches_full_pass(rng):
    """Query i of a causal rope pass over N tokens equals decoding token i alone (T=1) against the
    first i + 1 keys with the first i + 1 table rows; a chunk of the last 5 queries equals its rows."""
    B, N, H, Hkv, D = 2, 40, 4, 2, 32
    q, k, v, _, slopes = attention_inputs(rng, B, N, N, H, Hkv, D, True)
    rot = _table(N, D)
    out, lse = ops.attention(q, k, v, alibi_slopes=slopes, rope=rot)
    for i in range(N):
        o1, l1 = ops.attention(q[:, i:i + 1], k[:, :i + 1], v[:, :i + 1], alibi_slopes=slopes,
                               rope=np.ascontiguousarray(rot[:i + 1]))
        assert rel_err(o1[:, 0], out[:, i]) < 1e-5, f"token {i}"
        assert rel_err(l1[:, :, 0], lse[:, :, i]) < 1e-5, f"token {i}"
    o5, l5 = ops.attention(q[:, -5:], k, v, alibi_slopes=slopes, rope=rot)
    assert rel_err(o5, out[:, -5:]) < 1e-5 and rel_err(l5, lse[:, :, -5:]) < 1e-5


# The backward picks its scheme from the (batch, kv head) pairs and the thread count
# (csrc/attention.cpp): one pass when 5 * ceil(pairs / threads) * threads <= 7 * pairs, which always
# holds at 1 thread and holds at 2 threads for pairs >= 2; B = 1, Hkv = 1 at 2 threads is two-pass.
@pytest.mark.parametrize("shape", [(1, 100, 130, 4, 1, 40), (1, 150, 150, 2, 1, 64), (2, 80, 80, 4, 2, 64),
                                   (1, 3, 50, 2, 1, 18)],
                         ids=["B1-Hkv1-S130", "B1-Hkv1-T150", "B2-Hkv2", "B1-Hkv1-decode"])
def test_backward_schemes_and_thread_counts(rng, threads, shape):
    """At 1 thread (one pass) and 2 threads (two passes for B=1, Hkv=1, one pass for B=2, Hkv=2):
    each matches the composition, the thread counts agree, and a repeated call is bitwise equal."""
    B, T, S, H, Hkv, D = shape
    q, k, v, dout, slopes = attention_inputs(rng, B, T, S, H, Hkv, D, True)
    rot = _table(S, D)
    results = {}
    for n in (1, 2):
        llmcore.set_num_threads(n)
        assert llmcore.get_num_threads() == n
        results[n] = _check(q, k, v, dout, rot, causal=True, alibi_slopes=slopes)
        again = ops.attention_backward(dout, q, k, v, *results[n][:2], alibi_slopes=slopes, rope=rot)
        for name, a, b in zip(NAMES[2:], again, results[n][2:]):
            assert np.array_equal(a, b), f"{name}: backward not deterministic at {n} threads"
    for name, a, b in zip(NAMES, results[2], results[1]):
        assert rel_err(a, b) < 1e-5, f"{name}: 2 threads vs 1"


def test_every_simd_level(simd, rng):
    for B, T, S, H, Hkv, D in [(1, 3, 33, 4, 2, 64), (1, 70, 70, 2, 1, 40), (2, 1, 9, 2, 2, 16),
                               (1, 20, 20, 2, 2, 18)]:
        q, k, v, dout, slopes = attention_inputs(rng, B, T, S, H, Hkv, D, True)
        rot = _table(S, D)
        _check(q, k, v, dout, rot, causal=True, alibi_slopes=slopes)
        _check(q, k, v, dout, rot, causal=False)


# --- gradients written into given views --------------------------------------------------------

@pytest.mark.parametrize("B,T,H,Hkv,D", [(2, 70, 4, 2, 64), (1, 33, 3, 1, 24), (2, 5, 2, 2, 18)],
                         ids=["gqa-one-pass", "mqa-two-pass", "short-T-D18"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_backward_into_fused_gradient_views(rng, threads, B, T, H, Hkv, D, causal):
    """dq, dk, dv slices of a (B, T, H + 2 Hkv + 1, D) gradient buffer, with q, k, v slices of a
    fused QKV buffer: the same bits as fresh gradients, returned as given, the spare head intact."""
    llmcore.set_num_threads(2)  # B=1, Hkv=1 runs the two-pass scheme, B=2, Hkv=2 the one-pass one
    buf = rng.standard_normal((B, T, H + 2 * Hkv, D)).astype(np.float32)
    q, k, v = buf[:, :, :H], buf[:, :, H:H + Hkv], buf[:, :, H + Hkv:]
    dout = rng.standard_normal((B, T, H, D)).astype(np.float32)
    rot = _table(T, D)
    out, lse = ops.attention(q, k, v, causal=causal, rope=rot)
    fresh = ops.attention_backward(dout, q, k, v, out, lse, causal=causal, rope=rot)
    grads = np.full((B, T, H + 2 * Hkv + 1, D), 7.0, np.float32)  # one spare head: must stay 7
    views = grads[:, :, :H], grads[:, :, H:H + Hkv], grads[:, :, H + Hkv:H + 2 * Hkv]
    got = ops.attention_backward(dout, q, k, v, out, lse, causal=causal, rope=rot,
                                 dq=views[0], dk=views[1], dv=views[2])
    for name, g, view, f in zip(NAMES[2:], got, views, fresh):
        assert g is view, f"{name}: the given view must be returned"
        assert np.array_equal(view, f), f"{name}: written into a view differs from fresh ({rel_err(view, f):.2e})"
    assert (grads[:, :, -1] == 7.0).all(), "the spare head was written"
    exact = _composition64(q, k, v, dout, rot, causal=causal)
    for name, g, r in zip(NAMES[2:], got, exact[2:]):
        assert rel_err(g, r) < TOL64, f"{name}: {rel_err(g, r):.2e} vs float64 composition"


# --- the NumPy reference with rope= --------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 7, 19, 4, 2, 16), (1, 1, 12, 2, 1, 18), (1, 30, 30, 3, 3, 40)],
                         ids=["gqa-S>T", "decode", "mha"])
@pytest.mark.parametrize("causal,alibi", [(True, False), (False, True)], ids=["causal", "full-alibi"])
def test_reference_matches_composition_and_ops(rng, shape, causal, alibi):
    B, T, S, H, Hkv, D = shape
    q, k, v, dout, slopes = attention_inputs(rng, B, T, S, H, Hkv, D, alibi)
    rot = _table(S, D)
    kw = dict(causal=causal, alibi_slopes=slopes)
    exact = _composition64(q, k, v, dout, rot, **kw)

    # float64 inputs: the composition up to float64 rounding
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    saved = q64.copy(), k64.copy()
    out, lse = reference.attention(q64, k64, v64, rope=rot, **kw)
    grads = reference.attention_backward(do64, q64, k64, v64, out, lse, rope=rot, **kw)
    assert np.array_equal(q64, saved[0]) and np.array_equal(k64, saved[1]), "reference modified q or k"
    for name, a, b in zip(NAMES, (out, lse, *grads), exact):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 1e-10, f"{name}: float64 reference {rel_err(a, b):.2e} vs composition"

    # float32 inputs: close to the kernels and to the composition
    out32, lse32 = reference.attention(q, k, v, rope=rot, **kw)
    g32 = reference.attention_backward(dout, q, k, v, out32, lse32, rope=rot, **kw)
    ours = _fused(q, k, v, dout, rot, **kw)
    for name, r32, o, e in zip(NAMES, (out32, lse32, *g32), ours, exact):
        assert rel_err(r32, o) < TOL64, f"{name}: float32 reference vs ops {rel_err(r32, o):.2e}"
        assert rel_err(r32, e) < TOL64, f"{name}: float32 reference vs composition {rel_err(r32, e):.2e}"

    # gradients written into given arrays
    given = tuple(np.zeros(x.shape) for x in (q64, k64, v64))
    got = reference.attention_backward(do64, q64, k64, v64, out, lse, rope=rot, dq=given[0], dk=given[1],
                                       dv=given[2], **kw)
    for name, g, a, b in zip(NAMES[2:], got, given, grads):
        assert g is a and np.array_equal(a, b), name


# --- bad input ----------------------------------------------------------------------------------

def _bad_rope_cases():
    rng = np.random.default_rng(21)
    B, T, S, H, Hkv, D = 2, 5, 7, 4, 2, 8
    q, k, v, dout, _ = attention_inputs(rng, B, T, S, H, Hkv, D)
    rot = _table(S, D)
    q7, k7, v7, dout7, _ = attention_inputs(rng, B, T, S, H, Hkv, 7)
    return q, k, v, dout, {
        "rows-short": (q, k, v, dout, np.ascontiguousarray(rot[:S - 1])),
        "rows-T": (q, k, v, dout, np.ascontiguousarray(rot[:T])),          # one row per query is not enough
        "rows-long": (q, k, v, dout, _table(S + 1, D)),
        "columns-short": (q, k, v, dout, np.ascontiguousarray(rot[:, :D // 2 - 1])),
        "columns-long": (q, k, v, dout, _table(S, D + 2)),
        "float32": (q, k, v, dout, np.ascontiguousarray(rot.real)),
        "complex128": (q, k, v, dout, rot.astype(np.complex128)),
        "1-d": (q, k, v, dout, rot.reshape(-1)),
        "odd-D": (q7, k7, v7, dout7, np.ascontiguousarray(_table(S, 8)[:, :3])),  # (S, D // 2) for D = 7
    }


BAD = list(_bad_rope_cases()[4])


@pytest.mark.parametrize("case", BAD)
def test_bad_rope_table_is_refused(case):
    q, k, v, dout, rot = _bad_rope_cases()[4][case]
    # a wrong dtype is a TypeError, as for every llmcore.ops argument; a wrong shape a ValueError
    error = TypeError if case in ("float32", "complex128") else ValueError
    with pytest.raises(error, match="rope"):
        ops.attention(q, k, v, rope=rot)
    # the backward checks too (out, lse from a plain forward of the same shapes)
    out, lse = ops.attention(q, k, v)
    grads = [np.zeros(x.shape, np.float32) for x in (q, k, v)]
    with pytest.raises(error, match="rope"):
        ops.attention_backward(dout, q, k, v, out, lse, rope=rot)
    with pytest.raises(error, match="rope"):
        ops.attention_backward(dout, q, k, v, out, lse, rope=rot, dq=grads[0], dk=grads[1], dv=grads[2])
    assert all(not g.any() for g in grads), "a refused call wrote gradients"


def test_noncontiguous_table_is_right_or_refused(rng):
    """A (S, D/2) complex64 view that is not C-contiguous (every other column of a wider table)
    must either be refused with a ValueError naming rope or read through correctly."""
    B, T, S, H, Hkv, D = 1, 9, 20, 2, 1, 16
    q, k, v, dout, _ = attention_inputs(rng, B, T, S, H, Hkv, D)
    wide = rng.standard_normal((S, D)) + 1j * rng.standard_normal((S, D))
    wide = (wide / np.abs(wide)).astype(np.complex64)  # unit rotations
    view = wide[:, ::2]
    assert view.shape == (S, D // 2) and not view.flags.c_contiguous
    try:
        got = _fused(q, k, v, dout, view, causal=True)
    except ValueError as exc:
        assert "rope" in str(exc)
        return
    exact = _composition64(q, k, v, dout, np.ascontiguousarray(view), causal=True)
    for name, a, b in zip(NAMES, got, exact):
        assert rel_err(a, b) < TOL64, f"{name}: a strided table was misread ({rel_err(a, b):.2e})"


def test_more_queries_than_keys_is_refused():
    """Non-causal with T > S puts queries 0..T-S-1 at negative positions, which the (S, D/2) table
    has no rows for: refused with a ValueError naming rope (never read before the table). Run in a
    subprocess so that an out-of-bounds read that crashes fails this test only."""
    script = textwrap.dedent("""
        import numpy as np
        from llmcore import ops, positions, reference
        rng = np.random.default_rng(0)
        B, T, S, H, D = 1, 70, 20, 2, 16
        q = rng.standard_normal((B, T, H, D)).astype(np.float32)
        k, v = (rng.standard_normal((B, S, H, D)).astype(np.float32) for _ in range(2))
        rot = positions.rope_tables(S, D)
        out, lse = ops.attention(q, k, v, causal=False)
        calls = {
            "ops.attention": lambda: ops.attention(q, k, v, causal=False, rope=rot),
            "ops.attention_backward": lambda: ops.attention_backward(q, q, k, v, out, lse, causal=False, rope=rot),
            "reference.attention": lambda: reference.attention(q, k, v, causal=False, rope=rot),
        }
        for name, call in calls.items():
            try:
                res = call()
            except ValueError as exc:
                assert "rope" in str(exc), (name, str(exc))
                continue
            finite = all(np.isfinite(r).all() for r in res)
            raise SystemExit(f"{name}: T={T} > S={S} with rope was not refused (results finite: {finite})")
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=_PYTHONPATH)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, \
        f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def test_empty_inputs_with_rope(rng):
    q, k, v, dout, _ = attention_inputs(rng, 2, 0, 5, 2, 1, 8)
    rot = _table(5, 8)
    out, lse = ops.attention(q, k, v, rope=rot)
    assert out.shape == (2, 0, 2, 8) and lse.shape == (2, 2, 0)
    dq, dk, dv = ops.attention_backward(dout, q, k, v, out, lse, rope=rot)
    assert dq.shape == q.shape and not dk.any() and not dv.any()
