import math

import numpy as np
import pytest

import llmcore
from llmcore import ops, optim, reference as ref
from helpers import assert_close, randn

HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("shape", [(1,), (7,), (17, 33), (3, 5, 129), (70001,)])
def test_adamw_matches_reference_over_steps(simd, rng, shape):
    param, m, v = randn(rng, shape), np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    rparam, rm, rv = param.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    for step in range(1, 6):
        grad = randn(rng, shape)
        ops.adamw_step(param, grad, m, v, step=step, **HYPER)
        ref.adamw_step(rparam, grad.astype(np.float64), rm, rv, step=step, **HYPER)
    assert_close(param, rparam, 1e-6, "param")
    assert_close(m, rm, 1e-6, "m")
    assert_close(v, rv, 1e-5, "v")


def test_adamw_matches_torch_semantics_by_hand():
    # One step from m = v = 0 moves each weight by lr * sign(grad) (bias-corrected Adam), after
    # decoupled decay param * (1 - lr * wd).
    param = np.array([1.0, -2.0, 0.5], np.float32)
    grad = np.array([0.3, -0.001, 2.0], np.float32)
    m, v = np.zeros(3, np.float32), np.zeros(3, np.float32)
    ops.adamw_step(param, grad, m, v, lr=0.1, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.5, step=1)
    expected = np.array([1.0, -2.0, 0.5]) * (1 - 0.05) - 0.1 * np.sign(grad)
    np.testing.assert_allclose(param, expected, rtol=1e-6)
    np.testing.assert_allclose(m, 0.1 * grad, rtol=1e-6)
    one_minus_beta2 = np.float64(np.float32(1) - np.float32(0.999))  # as float32 arithmetic rounds it
    np.testing.assert_allclose(v, one_minus_beta2 * grad.astype(np.float64) ** 2, rtol=1e-6)


def test_adamw_refuses_arrays_it_cannot_update_in_place(rng):
    param = randn(rng, (8, 8))
    m, v, grad = np.zeros_like(param), np.zeros_like(param), randn(rng, (8, 8))
    with pytest.raises(ValueError, match="param"):
        ops.adamw_step(param.T, grad, m, v, step=1, **HYPER)
    frozen = param.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="param"):
        ops.adamw_step(frozen, grad, m, v, step=1, **HYPER)
    with pytest.raises(ValueError, match="step"):
        ops.adamw_step(param, grad, m, v, step=0, **HYPER)
    with pytest.raises(ValueError, match="beta1"):
        ops.adamw_step(param, grad, m, v, step=1, **{**HYPER, "beta1": 1.0})


# ---------------------------------------------------------------------------------------------
# adamw_step_multi, global_norm, and the optimizer's clipping through grad_scale

MULTI_SHAPES = [(0,), (1,), (15,), (16385,), (40000,), (3, 7), (129, 130), (0, 5), (2, 3, 4)]
MULTI_DECAYS = [0.1, 0.0, 0.05, 0.0, 0.2, 0.1, 0.0, 0.3, 0.01]
MULTI_HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8)


def _multi_state(rng, shapes=MULTI_SHAPES):
    """Random params and nonzero moments (as after earlier steps), one per shape."""
    params = [randn(rng, s) for s in shapes]
    ms = [randn(rng, s, scale=0.1) for s in shapes]
    vs = [np.abs(randn(rng, s, scale=0.01)) for s in shapes]
    return params, ms, vs


def _copies(arrays):
    return [a.copy() for a in arrays]


def _assert_bitwise(ours, theirs, what):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"{what}[{i}]: shape {a.shape} != {b.shape}"
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"{what}[{i}] differs (shape {a.shape})"


@pytest.mark.parametrize("per_tensor", [True, False], ids=["decay_list", "decay_number"])
def test_adamw_step_multi_is_bitwise_adamw_step_per_tensor(simd, rng, per_tensor):
    params, ms, vs = _multi_state(rng)
    p1, m1, v1 = _copies(params), _copies(ms), _copies(vs)
    decays = MULTI_DECAYS if per_tensor else 0.1
    for step in (1, 2, 3):
        grads = [randn(rng, s) for s in MULTI_SHAPES]
        grads_before = _copies(grads)
        ops.adamw_step_multi(params, grads, ms, vs, weight_decay=decays, step=step, **MULTI_HYPER)
        for i in range(len(MULTI_SHAPES)):
            wd = decays[i] if per_tensor else decays
            ops.adamw_step(p1[i], grads[i], m1[i], v1[i], weight_decay=wd, step=step, **MULTI_HYPER)
        _assert_bitwise(grads, grads_before, "grad")  # read only
        _assert_bitwise(params, p1, f"param (step {step})")
        _assert_bitwise(ms, m1, f"m (step {step})")
        _assert_bitwise(vs, v1, f"v (step {step})")
    # and the update really happened (not a no-op on copies)
    assert not np.array_equal(params[4], _multi_state(np.random.default_rng(0))[0][4])


def test_adamw_step_multi_updates_the_callers_arrays_in_place(rng):
    params, ms, vs = _multi_state(rng, [(5,), (2, 3)])
    ids = [id(a) for a in params + ms + vs]
    before = _copies(params + ms + vs)
    grads = [randn(rng, (5,)), randn(rng, (2, 3))]
    ops.adamw_step_multi(params, grads, ms, vs, weight_decay=0.1, step=1, **MULTI_HYPER)
    assert [id(a) for a in params + ms + vs] == ids
    for a, b in zip(params + ms + vs, before):
        assert not np.array_equal(a, b)


@pytest.mark.parametrize("scale", [0.37, 1e-3, 0.0, 2.5])
def test_adamw_step_multi_grad_scale_matches_prescaled_gradients(rng, scale):
    params, ms, vs = _multi_state(rng)
    p1, m1, v1 = _copies(params), _copies(ms), _copies(vs)
    for step in (1, 2):
        grads = [randn(rng, s) for s in MULTI_SHAPES]
        grads_before = _copies(grads)
        ops.adamw_step_multi(params, grads, ms, vs, weight_decay=MULTI_DECAYS, step=step, grad_scale=scale,
                             **MULTI_HYPER)
        _assert_bitwise(grads, grads_before, "grad")  # the scale is applied as read, not stored
        for i in range(len(MULTI_SHAPES)):
            scaled = grads[i] * np.float32(scale)
            assert scaled.dtype == np.float32
            ops.adamw_step(p1[i], scaled, m1[i], v1[i], weight_decay=MULTI_DECAYS[i], step=step, **MULTI_HYPER)
        for what, ours, theirs in (("param", params, p1), ("m", ms, m1), ("v", vs, v1)):
            for i, (a, b) in enumerate(zip(ours, theirs)):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12, err_msg=f"{what}[{i}] step {step}")


def test_adamw_step_multi_grad_scale_zero_is_a_step_with_zero_gradients(rng):
    # scale 0: m and v only decay, param only decays (weight decay) and moves by the old momentum.
    params, ms, vs = _multi_state(rng, [(7,), (3, 4)])
    p1, m1, v1 = _copies(params), _copies(ms), _copies(vs)
    grads = [randn(rng, (7,)), randn(rng, (3, 4))]
    ops.adamw_step_multi(params, grads, ms, vs, weight_decay=0.1, step=2, grad_scale=0.0, **MULTI_HYPER)
    for i in range(2):
        ops.adamw_step(p1[i], np.zeros_like(grads[i]), m1[i], v1[i], weight_decay=0.1, step=2, **MULTI_HYPER)
    _assert_bitwise(params, p1, "param")
    _assert_bitwise(ms, m1, "m")
    _assert_bitwise(vs, v1, "v")


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_adamw_step_multi_matches_reference(rng, scale):
    shapes = [(0,), (1,), (15,), (16385,), (3, 7), (33, 40)]
    decays = [0.1, 0.0, 0.2, 0.05, 0.0, 0.1]
    params, ms, vs = _multi_state(rng, shapes)
    rp, rm, rv = ([a.astype(np.float64) for a in xs] for xs in (params, ms, vs))
    for step in (1, 2, 3):
        grads = [randn(rng, s) for s in shapes]
        ops.adamw_step_multi(params, grads, ms, vs, weight_decay=decays, step=step, grad_scale=scale, **MULTI_HYPER)
        ref.adamw_step_multi(rp, [g.astype(np.float64) for g in grads], rm, rv, weight_decay=decays, step=step,
                             grad_scale=scale, **MULTI_HYPER)
    for i in range(len(shapes)):
        if params[i].size == 0:
            assert params[i].shape == rp[i].shape
            continue
        assert_close(params[i], rp[i], 1e-6, f"param[{i}]")
        assert_close(ms[i], rm[i], 1e-5, f"m[{i}]")
        assert_close(vs[i], rv[i], 1e-5, f"v[{i}]")


def test_reference_adamw_step_multi_is_its_adamw_step_per_tensor(rng):
    shapes = [(4,), (2, 3)]
    params, ms, vs = (([a.astype(np.float64) for a in xs]) for xs in _multi_state(rng, shapes))
    p1, m1, v1 = _copies(params), _copies(ms), _copies(vs)
    grads = [randn(rng, s, np.float64) for s in shapes]
    ref.adamw_step_multi(params, grads, ms, vs, weight_decay=[0.1, 0.0], step=2, grad_scale=0.5, **MULTI_HYPER)
    for i in range(2):
        ref.adamw_step(p1[i], grads[i] * 0.5, m1[i], v1[i], weight_decay=[0.1, 0.0][i], step=2, **MULTI_HYPER)
        assert np.array_equal(params[i], p1[i]) and np.array_equal(ms[i], m1[i]) and np.array_equal(vs[i], v1[i])


def test_adamw_step_multi_and_global_norm_do_not_depend_on_thread_count(rng, threads):
    params, ms, vs = _multi_state(rng)
    grads = [randn(rng, s) for s in MULTI_SHAPES]
    results, norms = [], []
    for n in (1, 2):
        llmcore.set_num_threads(n)
        p, m, v = _copies(params), _copies(ms), _copies(vs)
        for step in (1, 2):
            ops.adamw_step_multi(p, grads, m, v, weight_decay=MULTI_DECAYS, step=step, grad_scale=0.3,
                                 **MULTI_HYPER)
        results.append((p, m, v))
        norms.append(ops.global_norm(grads + p))
    for what, a, b in zip(("param", "m", "v"), results[0], results[1]):
        _assert_bitwise(a, b, what)
    assert norms[0] == norms[1]  # bitwise, float == float
    # and the single-tensor step too (it is the same kernel)
    outs = []
    for n in (1, 2):
        llmcore.set_num_threads(n)
        p, m, v = params[4].copy(), ms[4].copy(), vs[4].copy()
        ops.adamw_step(p, grads[4], m, v, weight_decay=0.1, step=1, **MULTI_HYPER)
        outs.append((p, m, v))
    _assert_bitwise(outs[0], outs[1], "adamw_step")


def _norm64(arrays):
    return math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays))


def test_global_norm_matches_float64(rng):
    arrays = [randn(rng, s) for s in MULTI_SHAPES] + [randn(rng, (n,), scale=10.0 ** (n % 7 - 3)) for n in range(1, 60)]
    assert ops.global_norm(arrays) == pytest.approx(_norm64(arrays), rel=1e-12)
    assert ref.global_norm(arrays) == pytest.approx(_norm64(arrays), rel=1e-12)
    one = randn(rng, (16384 * 3 + 1,))  # several pieces of one tensor
    assert ops.global_norm([one]) == pytest.approx(_norm64([one]), rel=1e-12)
    assert isinstance(ops.global_norm([one]), float)
    # 0-d, and a non-contiguous view (copied, not rejected: the norm only reads)
    m = randn(rng, (9, 11))
    assert ops.global_norm([np.full((), 3.0, np.float32), m.T, m[:, ::2]]) == pytest.approx(
        _norm64([np.array(3.0), m.T, m[:, ::2]]), rel=1e-12)


def test_global_norm_accumulates_in_float64():
    # Squares of float32 values near the float32 maximum overflow float32, not float64.
    big = np.full(4, 3e38, np.float32)
    expected = _norm64([big])
    assert math.isfinite(expected)
    assert ops.global_norm([big]) == pytest.approx(expected, rel=1e-12)
    # Tiny values whose squares underflow float32 still count.
    tiny = np.full(100, 1e-30, np.float32)
    assert ops.global_norm([tiny]) == pytest.approx(_norm64([tiny]), rel=1e-12)
    assert ops.global_norm([tiny]) > 0


def test_global_norm_empty_inputs():
    assert ops.global_norm([]) == 0.0
    assert ref.global_norm([]) == 0.0
    empty = [np.zeros(0, np.float32), np.zeros((0, 3), np.float32)]
    assert ops.global_norm(empty) == 0.0
    assert ops.global_norm(empty + [np.array([3.0, 4.0], np.float32)]) == 5.0
    assert ops.global_norm(x for x in [np.array([3.0, 4.0], np.float32)]) == 5.0  # any iterable


@pytest.mark.parametrize("bad, expect_nan", [(np.inf, False), (-np.inf, False), (np.nan, True)])
def test_global_norm_propagates_non_finite(rng, bad, expect_nan):
    for where in (0, 16384, 40000 - 1):  # first piece, a later piece, the last element
        arrays = [randn(rng, (15,)), randn(rng, (40000,)), randn(rng, (3, 7))]
        arrays[1][where] = bad
        norm = ops.global_norm(arrays)
        if expect_nan:
            assert math.isnan(norm), (where, norm)
        else:
            assert norm == math.inf, (where, norm)
    both = [np.array([np.inf], np.float32), np.array([np.nan], np.float32)]
    assert math.isnan(ops.global_norm(both))


def test_global_norm_bad_inputs():
    with pytest.raises(TypeError, match=r"arrays\[1\]"):
        ops.global_norm([np.ones(3, np.float32), np.ones(3)])
    with pytest.raises(TypeError, match=r"arrays\[0\]"):
        ops.global_norm([[1.0, 2.0]])


def _bad_multi_call(rng, **changes):
    """Three valid tensors, then `changes` applied: returns (kwargs, the arrays before)."""
    shapes = [(4,), (2, 3), (5,)]
    params, ms, vs = _multi_state(rng, shapes)
    grads = [randn(rng, s) for s in shapes]
    kw = dict(params=params, grads=grads, ms=ms, vs=vs, weight_decay=0.1, step=1, **MULTI_HYPER)
    kw.update(changes)
    return kw


def _frozen(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("case, exc, pattern", [
    ("short_grads", ValueError, "one length"),
    ("short_vs", ValueError, "one length"),
    ("decays", ValueError, "weight_decay"),
    ("negative_decay", ValueError, r"weight_decay\[2\]"),
    ("param_transposed", ValueError, r"param\[1\].*contiguous"),
    ("param_frozen", ValueError, r"param\[1\].*writeable"),
    ("m_frozen", ValueError, r"m\[2\].*writeable"),
    ("v_shape", ValueError, r"v\[1\]"),
    ("param_f64", TypeError, r"param\[2\].*float32"),
    ("grad_f64", TypeError, r"grad\[1\].*float32"),
    ("m_f64", TypeError, r"m\[0\].*float32"),
    ("grad_shape", ValueError, r"grad\[1\]"),
    ("grad_not_array", TypeError, r"grad\[0\]"),
    ("step0", ValueError, "step"),
    ("step_float", TypeError, "step"),
    ("negative_scale", ValueError, "grad_scale"),
    ("nan_scale", ValueError, "grad_scale"),
    ("inf_scale", ValueError, "grad_scale"),
    ("beta2", ValueError, "beta2"),
    ("lr", ValueError, "lr"),
])
def test_adamw_step_multi_bad_inputs(rng, case, exc, pattern):
    kw = _bad_multi_call(rng)
    p, g, m, v = kw["params"], kw["grads"], kw["ms"], kw["vs"]
    if case == "short_grads":
        kw["grads"] = g[:2]
    elif case == "short_vs":
        kw["vs"] = v + [v[0].copy()]
    elif case == "decays":
        kw["weight_decay"] = [0.1, 0.0]
    elif case == "negative_decay":
        kw["weight_decay"] = [0.1, 0.0, -0.1]
    elif case == "param_transposed":
        p[1] = np.ascontiguousarray(p[1].reshape(3, 2)).T  # shape (2, 3), Fortran order
    elif case == "param_frozen":
        p[1] = _frozen(p[1])
    elif case == "m_frozen":
        m[2] = _frozen(m[2])
    elif case == "v_shape":
        v[1] = np.zeros((3, 2), np.float32)
    elif case == "param_f64":
        p[2] = p[2].astype(np.float64)
    elif case == "grad_f64":
        g[1] = g[1].astype(np.float64)
    elif case == "m_f64":
        m[0] = m[0].astype(np.float64)
    elif case == "grad_shape":
        g[1] = np.zeros((3, 2), np.float32)
    elif case == "grad_not_array":
        g[0] = [1.0, 2.0, 3.0, 4.0]
    elif case == "step0":
        kw["step"] = 0
    elif case == "step_float":
        kw["step"] = 1.0
    elif case == "negative_scale":
        kw["grad_scale"] = -0.5
    elif case == "nan_scale":
        kw["grad_scale"] = float("nan")
    elif case == "inf_scale":
        kw["grad_scale"] = float("inf")
    elif case == "beta2":
        kw["beta2"] = 1.0
    elif case == "lr":
        kw["lr"] = -1.0
    before = [a.copy() for a in kw["params"] + kw["ms"] + kw["vs"] if isinstance(a, np.ndarray)]
    with pytest.raises(exc, match=pattern):
        ops.adamw_step_multi(**kw)
    after = [a for a in kw["params"] + kw["ms"] + kw["vs"] if isinstance(a, np.ndarray)]
    for a, b in zip(after, before):  # checked before anything is written: no tensor half-updated
        assert np.array_equal(a, b)


def test_adamw_step_multi_empty_lists_and_python_numbers():
    ops.adamw_step_multi([], [], [], [], lr=1e-3, step=1)  # nothing to do
    ops.adamw_step_multi([], [], [], [], lr=1e-3, step=1, weight_decay=[])
    with pytest.raises(ValueError, match="weight_decay"):
        ops.adamw_step_multi([], [], [], [], lr=1e-3, step=1, weight_decay=[0.1])
    # numpy scalars are numbers too
    p, g = np.ones(3, np.float32), np.ones(3, np.float32)
    m, v = np.zeros(3, np.float32), np.zeros(3, np.float32)
    ops.adamw_step_multi([p], [g], [m], [v], lr=np.float32(0.1), step=np.int64(1), weight_decay=np.float64(0.5),
                         grad_scale=np.float32(1.0), eps=0.0)
    np.testing.assert_allclose(p, 1.0 * (1 - 0.05) - 0.1, rtol=1e-6)


def test_compiled_adamw_step_multi_checks_its_inputs():
    # The compiled entry point checks again: never out of bounds when called directly.
    cpu = llmcore._cpu
    a = np.ones(4, np.float32)
    args = lambda **c: dict(dict(params=[a.copy()], grads=[a], m=[a.copy()], v=[a.copy()], lr=1e-3, beta1=0.9,  # noqa: E731
                                 beta2=0.999, eps=1e-8, weight_decays=[0.0], step=1, grad_scale=1.0), **c)
    cpu.adamw_step_multi(*args().values())
    with pytest.raises(ValueError, match="one length"):
        cpu.adamw_step_multi(*args(grads=[]).values())
    with pytest.raises(ValueError, match="one length"):
        cpu.adamw_step_multi(*args(weight_decays=[0.0, 0.0]).values())
    with pytest.raises(ValueError, match=r"grad\[0\]"):
        cpu.adamw_step_multi(*args(grads=[np.ones(5, np.float32)]).values())
    with pytest.raises(ValueError, match=r"param\[0\].*writeable"):
        cpu.adamw_step_multi(*args(params=[_frozen(a)]).values())
    with pytest.raises(ValueError, match="step"):
        cpu.adamw_step_multi(*args(step=0).values())
    with pytest.raises(TypeError, match=r"m\[0\]"):
        cpu.adamw_step_multi(*args(m=[np.ones(4)]).values())


# -- the optimizer: clipping as a factor AdamW applies as it reads each gradient

def _tiny_gpt_with_grads(seed=3):
    from llmcore.model import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=13, seq_len=16, n_layer=1, n_head=2, n_kv_head=2, d_model=16)
    model = GPT(cfg, seed=seed)
    rng = np.random.default_rng(11)
    x = rng.integers(0, 13, (2, 16))
    y = rng.integers(0, 13, (2, 16))
    _, loss = model.forward(x, y)
    assert math.isfinite(loss)
    model.zero_grad()
    model.backward()
    return model, x, y


@pytest.mark.usefixtures("one_thread")
def test_adamw_step_grad_scale_equals_clip_grad_norm_then_step():
    a, x, y = _tiny_gpt_with_grads()
    b, _, _ = _tiny_gpt_with_grads()
    pa, pb = a.parameters(), b.parameters()
    assert list(pa) == list(pb)
    for k in pa:
        assert np.array_equal(pa[k].data, pb[k].data) and np.array_equal(pa[k].grad, pb[k].grad)
    opt_a = optim.AdamW(pa, lr=1e-2, weight_decay=0.1)
    opt_b = optim.AdamW(pb, lr=1e-2, weight_decay=0.1)
    max_norm = 0.01
    for step in range(2):
        grads_a = {k: p.grad.copy() for k, p in pa.items()}
        norm = optim.grad_norm(pa)
        scale = optim.clip_scale(norm, max_norm)
        assert 0 < scale < 1, (norm, scale)  # clipping really happens
        opt_a.step(lr=5e-3, grad_scale=scale)
        for k, p in pa.items():  # path A leaves the gradients alone
            assert np.array_equal(p.grad, grads_a[k]), k
        norm_b = optim.clip_grad_norm(pb, max_norm)
        assert norm_b == norm
        opt_b.step(lr=5e-3)
        for k in pa:
            np.testing.assert_allclose(pa[k].data, pb[k].data, rtol=1e-6, atol=1e-9, err_msg=k)
            np.testing.assert_allclose(opt_a.m[k], opt_b.m[k], rtol=1e-6, atol=1e-12, err_msg=k)
            np.testing.assert_allclose(opt_a.v[k], opt_b.v[k], rtol=1e-6, atol=1e-15, err_msg=k)
        assert opt_a.step_count == opt_b.step_count == step + 1
        if step == 0:  # new gradients on the updated weights
            for model, params in ((a, pa), (b, pb)):
                model.forward(x, y)
                model.zero_grad()
                model.backward()
    # the update moved the weights
    c, _, _ = _tiny_gpt_with_grads()
    assert any(not np.array_equal(pa[k].data, c.parameters()[k].data) for k in pa)


@pytest.mark.usefixtures("one_thread")
def test_adamw_step_is_one_multi_call_matching_per_tensor_steps():
    # AdamW.step == ops.adamw_step per parameter with the decay only on matrices.
    a, _, _ = _tiny_gpt_with_grads()
    params = a.parameters()
    copies = {k: (p.data.copy(), p.grad.copy(), np.zeros_like(p.data), np.zeros_like(p.data)) for k, p in params.items()}
    opt = optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt.step(grad_scale=0.5)
    for k, (w, g, m, v) in copies.items():
        ops.adamw_step(w, g * np.float32(0.5), m, v, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                       weight_decay=0.1 if w.ndim >= 2 else 0.0, step=1)
        assert np.array_equal(params[k].data, w), k
        assert np.array_equal(opt.m[k], m) and np.array_equal(opt.v[k], v), k


def test_grad_norm_matches_float64_and_the_reference_for_float64_grads(rng):
    from llmcore.nn import Parameter

    params = {k: Parameter(np.zeros(s, np.float32)) for k, s in (("a", (3, 4)), ("b", (5,)), ("c", (0,)))}
    for p in params.values():
        p.grad[...] = rng.standard_normal(p.grad.shape)
    assert optim.grad_norm(params) == pytest.approx(_norm64([p.grad for p in params.values()]), rel=1e-12)
    p64 = {k: Parameter(np.zeros(s, np.float64)) for k, s in (("a", (3, 4)), ("b", (5,)))}
    for p in p64.values():
        p.grad[...] = rng.standard_normal(p.grad.shape)
    assert optim.grad_norm(p64) == pytest.approx(_norm64([p.grad for p in p64.values()]), rel=1e-12)
    params["b"].grad[2] = np.inf
    assert optim.grad_norm(params) == math.inf


def test_clip_scale_edge_cases():
    assert optim.clip_scale(5.0, None) == 1.0
    assert optim.clip_scale(5.0, 0) == 1.0
    assert optim.clip_scale(5.0, 0.0) == 1.0
    assert optim.clip_scale(0.5, 1.0) == 1.0  # below the limit
    assert optim.clip_scale(1.0, 1.0) == 1.0  # at it
    assert optim.clip_scale(0.0, 1.0) == 1.0
    assert optim.clip_scale(math.inf, 1.0) == 1.0
    assert optim.clip_scale(float("nan"), 1.0) == 1.0
    s = optim.clip_scale(4.0, 1.0)
    assert 0 < s < 1 and s == pytest.approx(0.25, rel=1e-6)
    assert 4.0 * s <= 1.0  # never scales past the limit
    assert optim.clip_scale(1e6, 1e-3) == pytest.approx(1e-9, rel=1e-6)


@pytest.mark.parametrize("dtype, backend", [(np.float32, "cpu"), (np.float64, "numpy")])
def test_adamw_and_grad_norm_pick_the_same_backend(rng, dtype, backend):
    """With no backend named, the optimizer and the gradient norm run where the parameters' dtype
    says: the compiled core for float32, the reference for float64 (which the core rejects)."""
    params = {name: llmcore.nn.Parameter(randn(rng, shape, dtype)) for name, shape in
              (("w", (3, 4)), ("b", (4,)))}
    for p in params.values():
        p.grad[...] = randn(rng, p.data.shape, dtype)
    assert optim.backend_for([p.data for p in params.values()]) == backend
    assert optim.AdamW(params).be.name == backend
    want = math.sqrt(sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for p in params.values()))
    assert optim.grad_norm(params) == pytest.approx(want, rel=1e-12 if dtype == np.float64 else 1e-6)
    if dtype == np.float64:  # why the rule exists: the compiled core refuses float64
        with pytest.raises(TypeError, match="float32"):
            optim.grad_norm(params, "cpu")
