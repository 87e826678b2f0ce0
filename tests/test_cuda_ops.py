"""Every operation of the CUDA core (cuda/*.cu) against the NumPy reference: CuPy arrays in, CuPy
arrays out. Skipped (with the reason) where there is no GPU; run and committed on an H100.

Each result is compared with the float64 reference as ||ours - ref|| / ||ref||. Bars by precision
(DESIGN.md): float32 math 1e-5 (or twice what float32 NumPy gets, where the result cancels),
TF32 tensor cores 2e-3, bf16 tensor cores 2e-2. Before each call the CuPy memory pool is filled
with NaN-poisoned blocks of the output sizes (poisoned), so an output element a kernel forgets to
write shows up as NaN instead of as a stale correct value.
"""
from __future__ import annotations

import numpy as np
import pytest

from llmcore import ops, reference as ref
from helpers import MATMUL_SHAPES, ROW_SHAPES, f64, rel_err, randn

pytestmark = pytest.mark.cuda

PRECISION_TOL = {"highest": 1e-5, "high": 2e-3, "medium": 2e-2}


def _host(x):
    import cupy

    assert isinstance(x, cupy.ndarray), f"expected a CuPy result, got {type(x)}"
    return cupy.asnumpy(x)


def poisoned(fn, *args, **kwargs):
    """fn(*args) after the memory pool has been seeded with NaN blocks of its outputs' sizes."""
    import cupy

    first = fn(*args, **kwargs)
    outs = first if isinstance(first, tuple) else (first,)
    sizes = [o.nbytes for o in outs if o is not None]
    del first, outs
    cupy.get_default_memory_pool().free_all_blocks()
    blocks = [cupy.full(max(n // 4, 1), np.nan, np.float32) for n in sizes]
    del blocks  # back to the pool: the next allocations of these sizes reuse them
    return fn(*args, **kwargs)


def check(ours, want, tol, what, float32_ref=None):
    ours = _host(ours)
    assert ours.dtype == np.float32, f"{what}: dtype {ours.dtype}"
    assert not np.isnan(ours).any() or np.isnan(want).any(), f"{what}: NaN (an unwritten output?)"
    bar = tol if float32_ref is None else max(tol, 2 * rel_err(float32_ref, want))
    err = rel_err(ours, want)
    assert err <= bar, f"{what}: relative error {err:.3e} > {bar:.1e}"


def unaligned(cp, host):
    """A CuPy copy of `host` whose data starts 4 bytes into an allocation: no 16-byte vector path."""
    buf = cp.empty(host.size + 1, np.float32)
    view = buf[1:].reshape(host.shape)
    view[...] = cp.asarray(host)
    return view


@pytest.fixture(params=["highest", "high", "medium"])
def precision(request):
    before = ops.get_matmul_precision()
    ops.set_matmul_precision(request.param)
    yield request.param
    ops.set_matmul_precision(before)


# ---- matmul -----------------------------------------------------------------------------------

@pytest.mark.parametrize("M,N,K", MATMUL_SHAPES + [(128, 128, 32), (256, 384, 768), (1000, 1030, 515)])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_matmul(cp, rng, precision, M, N, K, ta, tb):
    a = randn(rng, (K, M) if ta else (M, K))
    b = randn(rng, (N, K) if tb else (K, N))
    got = poisoned(ops.matmul, cp.asarray(a), cp.asarray(b), transpose_a=ta, transpose_b=tb)
    want = ref.matmul(*f64(a, b), transpose_a=ta, transpose_b=tb)
    f32 = ref.matmul(a, b, transpose_a=ta, transpose_b=tb)
    check(got, want, PRECISION_TOL[precision], f"matmul {precision}", f32 if precision == "highest" else None)


def test_matmul_exact_on_small_integers(cp, rng):
    a = rng.integers(-8, 9, (67, 45)).astype(np.float32)
    b = rng.integers(-8, 9, (45, 131)).astype(np.float32)
    got = _host(ops.matmul(cp.asarray(a), cp.asarray(b)))
    np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


@pytest.mark.parametrize("shared_b", [True, False])
@pytest.mark.parametrize("ta", [False, True])
def test_matmul_batched(cp, rng, shared_b, ta):
    a = randn(rng, (3, 2, 33, 17) if ta else (3, 2, 17, 33))
    b = randn(rng, (33, 29) if shared_b else (3, 2, 33, 29))
    got = ops.matmul(cp.asarray(a), cp.asarray(b), transpose_a=ta)
    check(got, ref.matmul(*f64(a, b), transpose_a=ta), 1e-5, "batched matmul")


def test_matmul_unaligned_operands(cp, rng):
    a, b = randn(rng, (37, 41)), randn(rng, (41, 53))
    got = ops.matmul(unaligned(cp, a), unaligned(cp, b))
    check(got, ref.matmul(*f64(a, b)), 1e-5, "unaligned matmul")


# (8192, 64, 96) and (4096, 768, 768): weight gradients split over the rows (split-K)
@pytest.mark.parametrize("rows,d_in,d_out", [(1, 1, 1), (7, 33, 65), (129, 768, 257), (300, 64, 3072),
                                             (8192, 64, 96), (4096, 768, 768)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_and_backward(cp, rng, precision, rows, d_in, d_out, bias):
    x, w, dy = randn(rng, (rows, d_in)), randn(rng, (d_out, d_in)), randn(rng, (rows, d_out))
    b = randn(rng, (d_out,)) if bias else None
    tol = PRECISION_TOL[precision]
    y = poisoned(ops.linear, cp.asarray(x), cp.asarray(w), None if b is None else cp.asarray(b))
    check(y, ref.linear(*f64(x, w, b)), tol, "linear")
    dx, dw, db = poisoned(ops.linear_backward, cp.asarray(dy), cp.asarray(x), cp.asarray(w), has_bias=bias)
    rdx, rdw, rdb = ref.linear_backward(*f64(dy, x, w), has_bias=bias)
    check(dx, rdx, tol, "linear dx")
    check(dw, rdw, tol, "linear dweight")
    if bias:
        check(db, rdb, 1e-5, "linear dbias")
        np.testing.assert_array_equal(  # the bias reduction is deterministic
            _host(db), _host(ops.linear_backward(cp.asarray(dy), cp.asarray(x), cp.asarray(w), has_bias=True)[2]))
    else:
        assert db is None


@pytest.mark.parametrize("bias", [False, True])
def test_linear_backward_adds_into_given_gradients(cp, rng, bias):
    # dweight/dbias on the GPU: the gradients are added in place and the same arrays come back.
    x, w, dy = randn(rng, (300, 64)), randn(rng, (96, 64)), randn(rng, (300, 96))
    gw, gb = randn(rng, (96, 64)), randn(rng, (96,))
    dgw, dgb = cp.asarray(gw), cp.asarray(gb) if bias else None
    dx, dw, db = ops.linear_backward(cp.asarray(dy), cp.asarray(x), cp.asarray(w), has_bias=bias,
                                     dweight=dgw, dbias=dgb)
    assert dw is dgw and db is dgb
    rdx, rdw, rdb = ref.linear_backward(*f64(dy, x, w), has_bias=bias)
    check(dx, rdx, 1e-5, "linear dx")
    check(dgw, gw + rdw, 1e-5, "accumulated dweight")
    if bias:
        check(dgb, gb + rdb, 1e-5, "accumulated dbias")



# The CUDA GEMM has no residual epilogue: ops.linear adds the residual after it. (7, 33) -> 65 and
# (129, 520) -> 600: ragged tiles and K over several blocks; (2, 5, 300): a 3-D x.
@pytest.mark.parametrize("x_shape,d_out", [((1, 1), 1), ((7, 33), 65), ((2, 5, 300), 47), ((129, 520), 600)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_with_residual_matches_the_cpu(cp, rng, precision, x_shape, d_out, bias):
    x, w = randn(rng, x_shape), randn(rng, (d_out, x_shape[-1]))
    b = randn(rng, (d_out,)) if bias else None
    r = randn(rng, x_shape[:-1] + (d_out,), scale=float(np.sqrt(x_shape[-1])))  # as large as x @ w.T
    gr = cp.asarray(r)
    tol = PRECISION_TOL[precision]
    y = poisoned(ops.linear, cp.asarray(x), cp.asarray(w), None if b is None else cp.asarray(b), residual=gr)
    assert y.shape == r.shape
    check(y, ref.linear(*f64(x, w, b, r)), tol, "linear + residual")
    check(y, ops.linear(x, w, b, residual=r), tol, "linear + residual against the CPU")
    np.testing.assert_array_equal(_host(gr), r)  # an input: read, never written
    # exactly what the same GEMM gives without it, plus the residual
    plain = ops.linear(cp.asarray(x), cp.asarray(w), None if b is None else cp.asarray(b))
    np.testing.assert_array_equal(_host(y), _host(plain + gr))


def test_linear_residual_exact_on_small_integers(cp, rng):
    x = rng.integers(-4, 5, (67, 600)).astype(np.float32)
    w = rng.integers(-4, 5, (131, 600)).astype(np.float32)
    bias = rng.integers(-64, 65, 131).astype(np.float32)
    r = rng.integers(-1000, 1001, (67, 131)).astype(np.float32)
    got = _host(ops.linear(cp.asarray(x), cp.asarray(w), cp.asarray(bias), residual=cp.asarray(r)))
    exact = x.astype(np.int64) @ w.T.astype(np.int64) + bias.astype(np.int64) + r.astype(np.int64)
    np.testing.assert_array_equal(got, exact.astype(np.float32))
    np.testing.assert_array_equal(got, ops.linear(x, w, bias, residual=r))  # the CPU's result, bit for bit


# ---- row-wise operations ----------------------------------------------------------------------

ROWS = ROW_SHAPES + [(3, 1024), (2, 50257), (1, 8193)]


@pytest.mark.parametrize("shape", ROWS)
def test_softmax(cp, rng, shape):
    x, dy = randn(rng, shape, scale=3.0), randn(rng, shape)
    y = poisoned(ops.softmax, cp.asarray(x))
    check(y, ref.softmax(*f64(x)), 1e-5, "softmax", ref.softmax(x))
    dx = poisoned(ops.softmax_backward, cp.asarray(dy), y)
    yr = ref.softmax(*f64(x))
    check(dx, ref.softmax_backward(*f64(dy), yr), 1e-5, "softmax dx", ref.softmax_backward(dy, ref.softmax(x)))


@pytest.mark.parametrize("shape", ROWS)
def test_rmsnorm(cp, rng, shape):
    x, w, dy = randn(rng, shape), randn(rng, shape[-1:]), randn(rng, shape)
    y, rstd = poisoned(ops.rmsnorm, cp.asarray(x), cp.asarray(w))
    ry, rrstd = ref.rmsnorm(*f64(x, w))
    check(y, ry, 1e-5, "rmsnorm y")
    check(rstd, rrstd, 1e-5, "rmsnorm rstd")
    dx, dw = poisoned(ops.rmsnorm_backward, cp.asarray(dy), cp.asarray(x), cp.asarray(w), rstd)
    rdx, rdw = ref.rmsnorm_backward(*f64(dy, x, w), rrstd)
    fdx, fdw = ref.rmsnorm_backward(dy, x, w, ref.rmsnorm(x, w)[1])
    check(dx, rdx, 1e-5, "rmsnorm dx", fdx)
    check(dw, rdw, 1e-5, "rmsnorm dweight", fdw)


@pytest.mark.parametrize("shape", ROWS)
def test_layernorm(cp, rng, shape):
    x, w, b, dy = randn(rng, shape), randn(rng, shape[-1:]), randn(rng, shape[-1:]), randn(rng, shape)
    y, mean, rstd = poisoned(ops.layernorm, cp.asarray(x), cp.asarray(w), cp.asarray(b))
    ry, rmean, rrstd = ref.layernorm(*f64(x, w, b))
    check(y, ry, 1e-5, "layernorm y", ref.layernorm(x, w, b)[0])
    check(mean, rmean, 1e-5, "layernorm mean", ref.layernorm(x, w, b)[1])
    check(rstd, rrstd, 1e-5, "layernorm rstd")
    dx, dw, db = poisoned(ops.layernorm_backward, cp.asarray(dy), cp.asarray(x), cp.asarray(w), mean, rstd)
    rdx, rdw, rdb = ref.layernorm_backward(*f64(dy, x, w), rmean, rrstd)
    _, fm, fr = ref.layernorm(x, w, b)
    fdx, fdw, fdb = ref.layernorm_backward(dy, x, w, fm, fr)
    check(dx, rdx, 1e-5, "layernorm dx", fdx)
    check(dw, rdw, 1e-5, "layernorm dweight", fdw)
    check(db, rdb, 1e-5, "layernorm dbias", fdb)


def test_norm_weight_gradients_are_deterministic(cp, rng):
    x, w, dy = (cp.asarray(randn(rng, s)) for s in [(4099, 768), (768,), (4099, 768)])
    _, rstd = ops.rmsnorm(x, w)
    first = _host(ops.rmsnorm_backward(dy, x, w, rstd)[1])
    for _ in range(3):
        np.testing.assert_array_equal(_host(ops.rmsnorm_backward(dy, x, w, rstd)[1]), first)



# The norms' backward kernels on the GPU take no residual: ops adds it to dx after them.
@pytest.mark.parametrize("shape", [(1, 1), (5, 17), (4, 3, 127), (3, 1024), (2, 4099)])
def test_rmsnorm_backward_with_residual_matches_the_cpu(cp, rng, shape):
    x, w, dy, r = randn(rng, shape), randn(rng, shape[-1:]), randn(rng, shape), randn(rng, shape)
    gx, gw, gdy, gr = (cp.asarray(a) for a in (x, w, dy, r))
    _, rstd = ops.rmsnorm(gx, gw)
    dx, dw = poisoned(ops.rmsnorm_backward, gdy, gx, gw, rstd, residual=gr)
    plain_dx, plain_dw = ops.rmsnorm_backward(gdy, gx, gw, rstd)
    np.testing.assert_array_equal(_host(dx), _host(plain_dx + gr))
    np.testing.assert_array_equal(_host(dw), _host(plain_dw))  # dweight does not see it
    np.testing.assert_array_equal(_host(gr), r)
    cdx, cdw = ops.rmsnorm_backward(dy, x, w, ops.rmsnorm(x, w)[1], residual=r)
    rdx, rdw = ref.rmsnorm_backward(*f64(dy, x, w), ref.rmsnorm(*f64(x, w))[1], *f64(r))
    fdx = ref.rmsnorm_backward(dy, x, w, ref.rmsnorm(x, w)[1], r)[0]
    check(dx, cdx, 1e-5, "rmsnorm dx + residual against the CPU", fdx)
    check(dx, rdx, 1e-5, "rmsnorm dx + residual", fdx)
    check(dw, cdw, 1e-5, "rmsnorm dweight against the CPU", ref.rmsnorm_backward(dy, x, w, ref.rmsnorm(x, w)[1])[1])


@pytest.mark.parametrize("shape", [(1, 3), (5, 17), (4, 3, 127), (3, 1024), (2, 4099)])
def test_layernorm_backward_with_residual_matches_the_cpu(cp, rng, shape):
    x, w, b, dy, r = (randn(rng, s) for s in (shape, shape[-1:], shape[-1:], shape, shape))
    gx, gw, gb, gdy, gr = (cp.asarray(a) for a in (x, w, b, dy, r))
    _, mean, rstd = ops.layernorm(gx, gw, gb)
    dx, dw, db = poisoned(ops.layernorm_backward, gdy, gx, gw, mean, rstd, residual=gr)
    plain_dx = ops.layernorm_backward(gdy, gx, gw, mean, rstd)[0]
    np.testing.assert_array_equal(_host(dx), _host(plain_dx + gr))
    np.testing.assert_array_equal(_host(gr), r)
    _, cmean, crstd = ops.layernorm(x, w, b)
    cdx, cdw, cdb = ops.layernorm_backward(dy, x, w, cmean, crstd, residual=r)
    _, rmean, rrstd = ref.layernorm(*f64(x, w, b))
    rdx, rdw, rdb = ref.layernorm_backward(*f64(dy, x, w), rmean, rrstd, *f64(r))
    _, fm, fr = ref.layernorm(x, w, b)
    fdx, fdw, fdb = ref.layernorm_backward(dy, x, w, fm, fr, r)
    check(dx, cdx, 1e-5, "layernorm dx + residual against the CPU", fdx)
    check(dx, rdx, 1e-5, "layernorm dx + residual", fdx)
    check(dw, cdw, 1e-5, "layernorm dweight against the CPU", fdw)  # dweight, dbias do not see it
    check(db, cdb, 1e-5, "layernorm dbias against the CPU", fdb)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 17), (4099,), (64, 3072)])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu(cp, rng, shape, approximate):
    x, dy = randn(rng, shape, scale=3.0), randn(rng, shape)
    y = poisoned(ops.gelu, cp.asarray(x), approximate=approximate)
    check(y, ref.gelu(*f64(x), approximate=approximate), 1e-5, "gelu")
    dx = poisoned(ops.gelu_backward, cp.asarray(dy), cp.asarray(x), approximate=approximate)
    check(dx, ref.gelu_backward(*f64(dy, x), approximate=approximate), 1e-5, "gelu dx")


def test_row_ops_on_unaligned_views(cp, rng):
    x, w = randn(rng, (5, 67)), randn(rng, (67,))
    check(ops.softmax(unaligned(cp, x)), ref.softmax(*f64(x)), 1e-5, "softmax unaligned")
    check(ops.rmsnorm(unaligned(cp, x), unaligned(cp, w))[0], ref.rmsnorm(*f64(x, w))[0], 1e-5, "rmsnorm unaligned")
    check(ops.gelu(unaligned(cp, x)), ref.gelu(*f64(x)), 1e-5, "gelu unaligned")


# ---- cross-entropy, embedding, AdamW ----------------------------------------------------------

@pytest.mark.parametrize("N,V", [(1, 1), (7, 65), (33, 1031), (4, 50257), (1031, 5)])
def test_cross_entropy(cp, rng, N, V):
    logits = randn(rng, (N, V), scale=2.0)
    targets = rng.integers(0, V, N).astype(np.int64)
    targets[::3] = -100  # ignored rows
    dloss = randn(rng, (N,))
    loss, lse = poisoned(ops.cross_entropy, cp.asarray(logits), cp.asarray(targets))
    rloss, rlse = ref.cross_entropy(*f64(logits), targets)
    check(loss, rloss, 1e-5, "cross_entropy loss")
    check(lse, rlse, 1e-5, "cross_entropy lse")
    dlogits = poisoned(ops.cross_entropy_backward, cp.asarray(dloss), cp.asarray(logits), cp.asarray(targets), lse)
    check(dlogits, ref.cross_entropy_backward(*f64(dloss, logits), targets, rlse), 1e-5, "cross_entropy dlogits")


@pytest.mark.parametrize("V,C,ids_shape", [(1, 1, (1,)), (65, 64, (16, 128)), (50257, 768, (4, 257)),
                                           (7, 33, (5, 3)), (1000, 3, (2049,))])
def test_embedding(cp, rng, V, C, ids_shape):
    w = randn(rng, (V, C))
    ids = rng.integers(0, V, ids_shape).astype(np.int64)
    ids.reshape(-1)[: ids.size // 2] = ids.reshape(-1)[0]  # many repeats of one id
    dout = randn(rng, ids_shape + (C,))
    out = poisoned(ops.embedding, cp.asarray(w), cp.asarray(ids))
    check(out, ref.embedding(w, ids), 0.0, "embedding")
    dw = poisoned(ops.embedding_backward, cp.asarray(dout), cp.asarray(ids), V)
    check(dw, ref.embedding_backward(*f64(dout), ids, V), 1e-5, "embedding dweight")
    again = ops.embedding_backward(cp.asarray(dout), cp.asarray(ids), V)
    np.testing.assert_array_equal(_host(dw), _host(again))  # deterministic


@pytest.mark.parametrize("shape", [(1,), (7,), (17, 33), (3, 5, 129), (70001,)])
def test_adamw(cp, rng, shape):
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    param = randn(rng, shape)
    gp, gm, gv = cp.asarray(param), cp.zeros(shape, np.float32), cp.zeros(shape, np.float32)
    rp, rm, rv = param.astype(np.float64), np.zeros(shape), np.zeros(shape)
    for step in range(1, 6):
        grad = randn(rng, shape)
        ops.adamw_step(gp, cp.asarray(grad), gm, gv, step=step, **hyper)
        ref.adamw_step(rp, grad.astype(np.float64), rm, rv, step=step, **hyper)
    check(gp, rp, 1e-6, "param")
    check(gm, rm, 1e-6, "m")
    check(gv, rv, 1e-5, "v")


def test_adamw_step_multi_and_global_norm(cp, rng):
    """The CuPy paths (loops over the one-tensor CUDA kernel, the gradient scaled first; one dot
    per array) against the float64 reference."""
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=[0.1, 0.0, 0.1])
    shapes = [(7, 5), (33,), (2, 3, 4)]
    params = [randn(rng, s) for s in shapes]
    gp = [cp.asarray(p) for p in params]
    gm, gv = ([cp.zeros(s, np.float32) for s in shapes] for _ in range(2))
    rp = [p.astype(np.float64) for p in params]
    rm, rv = ([np.zeros(s) for s in shapes] for _ in range(2))
    for step in range(1, 4):
        grads = [randn(rng, s) for s in shapes]
        norm = ops.global_norm([cp.asarray(g) for g in grads])
        assert norm == pytest.approx(ref.global_norm(grads), rel=1e-6)
        scale = 0.5 / norm
        ggrads = [cp.asarray(g) for g in grads]
        ops.adamw_step_multi(gp, ggrads, gm, gv, step=step, grad_scale=scale, **hyper)
        ref.adamw_step_multi(rp, [g.astype(np.float64) for g in grads], rm, rv, step=step, grad_scale=scale, **hyper)
        for g, want in zip(ggrads, grads):
            assert (cp.asnumpy(g) == want).all()  # the gradients are read, not scaled in place
    for g, r in zip(gp, rp):
        check(g, r, 1e-6, "param")


def test_attention_rope_composes_on_cupy(cp, rng):
    """rope= on CuPy arrays: rotated copies into the CUDA kernels, dq and dk rotated back."""
    from llmcore import positions

    B, T, S, H, Hkv, D = 2, 33, 40, 4, 2, 32
    q, k, v = randn(rng, (B, T, H, D)), randn(rng, (B, S, Hkv, D)), randn(rng, (B, S, Hkv, D))
    dout = randn(rng, (B, T, H, D))
    rot = positions.rope_tables(S, D)
    out, lse = ops.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), rope=cp.asarray(rot))
    rout, rlse = ref.attention(*(x.astype(np.float64) for x in (q, k, v)), rope=rot)
    check(out, rout, 1e-5, "out")
    grads = ops.attention_backward(cp.asarray(dout), cp.asarray(q), cp.asarray(k), cp.asarray(v), out, lse,
                                   rope=cp.asarray(rot))
    want = ref.attention_backward(*(x.astype(np.float64) for x in (dout, q, k, v)), rout, rlse, rope=rot)
    for g, w, name in zip(grads, want, ("dq", "dk", "dv")):
        check(g, w, 1e-4, name)


# ---- attention ----------------------------------------------------------------------------------

ATTENTION_CASES = [  # B, T, S, H, Hkv, D, causal, alibi
    (1, 1, 1, 1, 1, 1, True, False),
    (2, 17, 17, 4, 4, 64, True, False),
    (1, 65, 65, 4, 2, 64, True, True),
    (2, 33, 100, 6, 1, 64, True, False),   # S > T: queries at the end (KV-cache prefill)
    (1, 129, 129, 2, 2, 128, True, False),
    (1, 31, 47, 3, 3, 80, False, False),
    (1, 40, 40, 2, 1, 5, True, True),      # D not a power of two
    (1, 20, 20, 2, 2, 256, True, False),
    (2, 1, 2048, 8, 2, 64, True, False),   # decoding against a long cache
    (1, 3, 1500, 4, 4, 128, True, True),
    (2, 256, 256, 4, 4, 32, False, True),
]


@pytest.mark.parametrize("B,T,S,H,Hkv,D,causal,alibi", ATTENTION_CASES)
def test_attention(cp, rng, B, T, S, H, Hkv, D, causal, alibi):
    q, k, v, dout = (randn(rng, s) for s in [(B, T, H, D), (B, S, Hkv, D), (B, S, Hkv, D), (B, T, H, D)])
    slopes = rng.uniform(0.05, 0.6, H).astype(np.float32) if alibi else None
    kw = dict(causal=causal, alibi_slopes=None if slopes is None else cp.asarray(slopes))
    rkw = dict(causal=causal, alibi_slopes=slopes)
    out, lse = poisoned(ops.attention, cp.asarray(q), cp.asarray(k), cp.asarray(v), **kw)
    rout, rlse = ref.attention(*f64(q, k, v), **rkw)
    check(out, rout, 1e-5, "attention out", ref.attention(q, k, v, **rkw)[0])
    check(lse, rlse, 1e-5, "attention lse")
    grads = poisoned(ops.attention_backward, cp.asarray(dout), cp.asarray(q), cp.asarray(k), cp.asarray(v),
                     out, lse, **kw)
    rgrads = ref.attention_backward(*f64(dout, q, k, v), rout, rlse, **rkw)
    f32 = ref.attention_backward(dout, q, k, v, *ref.attention(q, k, v, **rkw), **rkw)
    for name, g, r, f in zip(("dq", "dk", "dv"), grads, rgrads, f32):
        check(g, r, 1e-4, f"attention {name}", f)


def test_attention_reads_fused_qkv_views(cp, rng):
    B, T, H, Hkv, D = 2, 70, 6, 2, 64
    qkv = randn(rng, (B, T, H + 2 * Hkv, D))
    g = cp.asarray(qkv)
    q, k, v = g[:, :, :H], g[:, :, H:H + Hkv], g[:, :, H + Hkv:]  # strided views, no copies
    out, lse = ops.attention(q, k, v)
    hq, hk, hv = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
    check(out, ref.attention(*f64(hq, hk, hv))[0], 1e-5, "fused-view attention")
    dout = randn(rng, (B, T, H, D))
    dq, dk, dv = ops.attention_backward(cp.asarray(dout), q, k, v, out, lse)
    rdq, rdk, rdv = ref.attention_backward(*f64(dout, hq, hk, hv), *ref.attention(*f64(hq, hk, hv)))
    for name, a, b in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        check(a, b, 1e-4, f"fused-view {name}")
    # written into the views of a fused gradient buffer: the same values, the spare head untouched
    dqkv = cp.full((B, T, H + 2 * Hkv + 1, D), 7.0, dtype=np.float32)
    views = dqkv[:, :, :H], dqkv[:, :, H:H + Hkv], dqkv[:, :, H + Hkv:H + 2 * Hkv]
    got = ops.attention_backward(cp.asarray(dout), q, k, v, out, lse, dq=views[0], dk=views[1], dv=views[2])
    for name, g, view, fresh in zip(("dq", "dk", "dv"), got, views, (dq, dk, dv)):
        assert g is view
        assert bool((view == fresh).all()), f"fused-gradient {name}"
    assert bool((dqkv[:, :, -1] == 7.0).all())


# ---- errors -------------------------------------------------------------------------------------

def test_mixed_devices_and_bad_ids_raise(cp, rng):
    x = randn(rng, (4, 8))
    with pytest.raises(TypeError, match="mix"):
        ops.matmul(cp.asarray(x), x.T.copy())
    w = cp.asarray(randn(rng, (10, 4)))
    with pytest.raises(ValueError, match="ids"):
        ops.embedding(w, cp.asarray(np.array([1, 10])))
    with pytest.raises(ValueError, match="targets"):
        ops.cross_entropy(cp.asarray(randn(rng, (2, 5))), cp.asarray(np.array([0, 7])))
    with pytest.raises(TypeError, match="float32"):
        ops.softmax(cp.asarray(x.astype(np.float64)))



def test_residual_on_another_device_or_of_wrong_shape_raises(cp, rng):
    x, w, r = cp.asarray(randn(rng, (4, 8))), cp.asarray(randn(rng, (3, 8))), randn(rng, (4, 3))
    with pytest.raises(TypeError, match="mix"):
        ops.linear(x, w, residual=r)  # a NumPy residual next to CuPy operands
    with pytest.raises(ValueError, match="residual"):
        ops.linear(x, w, residual=cp.asarray(r[:, :2]))
    with pytest.raises(TypeError, match="residual"):
        ops.linear(x, w, residual=cp.asarray(r, dtype=np.float64))
    gw = cp.asarray(randn(rng, (8,)))
    _, rstd = ops.rmsnorm(x, gw)
    with pytest.raises(TypeError, match="mix"):
        ops.rmsnorm_backward(x, x, gw, rstd, residual=randn(rng, (4, 8)))
    with pytest.raises(ValueError, match="residual"):
        ops.rmsnorm_backward(x, x, gw, rstd, residual=cp.asarray(randn(rng, (8,))))
    _, mean, rstd = ops.layernorm(x, gw, gw)
    with pytest.raises(TypeError, match="mix"):
        ops.layernorm_backward(x, x, gw, mean, rstd, residual=randn(rng, (4, 8)))
    with pytest.raises(ValueError, match="residual"):
        ops.layernorm_backward(x, x, gw, mean, rstd, residual=cp.asarray(randn(rng, (4, 7))))

def test_results_follow_the_current_stream(cp, rng):
    x = randn(rng, (512, 1024))
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        y = ops.softmax(cp.asarray(x))
    s.synchronize()
    check(y, ref.softmax(*f64(x)), 1e-5, "softmax on a side stream")
