"""The GPT: the numpy and cpu backends agree on loss and every gradient; the numpy backend's
gradients agree with central finite differences; names, tying, accumulation and positions."""
import numpy as np
import pytest

import llmcore
from helpers import rel_err
from llmcore import nn, positions
from llmcore.model import GPT, GPTConfig
from llmcore.nn import get_backend
from llmcore.optim import AdamW, clip_grad_norm


pytestmark = pytest.mark.usefixtures("one_thread")

# Every pos, norm and act option, MHA / GQA / MQA, tied and untied heads, with and without biases.
CONFIGS = {
    "rope-rms-gelu-gqa": dict(pos="rope", norm="rmsnorm", act="gelu", n_head=4, n_kv_head=2),
    "learned-ln-relu-mha-bias": dict(pos="learned", norm="layernorm", act="relu", n_head=4, n_kv_head=4,
                                     bias=True),
    "sinusoidal-rms-relu-mqa-untied": dict(pos="sinusoidal", norm="rmsnorm", act="relu", n_head=4, n_kv_head=1,
                                           tie_embeddings=False),
    "alibi-ln-gelu-gqa": dict(pos="alibi", norm="layernorm", act="gelu", n_head=4, n_kv_head=2),
    "alibi-rms-gelu-mha-3heads": dict(pos="alibi", norm="rmsnorm", act="gelu", n_head=3, n_kv_head=3, d_model=24),
    "rope-ln-relu-mqa-bias-untied": dict(pos="rope", norm="layernorm", act="relu", n_head=2, n_kv_head=1,
                                         bias=True, tie_embeddings=False),
}


def make_config(**kw):
    base = dict(vocab_size=13, seq_len=12, n_layer=2, d_model=16, n_head=4, n_kv_head=4)
    base.update(kw)
    return GPTConfig(**base)


def perturb(model, rng, scale=1.0):
    """Weights large enough that attention is far from uniform and every gradient is sizeable, and
    norm weights and biases away from their 1/0 initial values."""
    for p in model.parameters().values():
        if p.data.ndim == 2:
            p.data[...] = rng.standard_normal(p.data.shape) * scale / np.sqrt(p.data.shape[1])
        else:
            p.data[...] = 1.0 + 0.3 * rng.standard_normal(p.data.shape)


def batch(rng, cfg, B=2, T=None):
    T = cfg.seq_len if T is None else T
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, 1] = -100  # an ignored position
    return idx, targets


def twin_models(cfg, dtypes_backends, seed=0):
    models = []
    for backend, dtype in dtypes_backends:
        m = GPT(cfg, backend=backend, dtype=dtype, seed=seed)
        perturb(m, np.random.default_rng(seed + 1))
        models.append(m)
    return models


@pytest.mark.parametrize("name", list(CONFIGS))
def test_numpy_and_cpu_backends_agree(name, rng):
    cfg = make_config(**CONFIGS[name])
    ref_model, cpu_model = twin_models(cfg, [("numpy", np.float32), ("cpu", np.float32)])
    idx, targets = batch(rng, cfg)
    losses, grads = [], []
    for m in (ref_model, cpu_model):
        logits, loss = m.forward(idx, targets)
        assert logits.shape == (2, cfg.seq_len, cfg.vocab_size) and logits.dtype == np.float32
        m.zero_grad()
        m.backward()
        losses.append(loss)
        grads.append({k: p.grad.copy() for k, p in m.parameters().items()})
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert np.linalg.norm(grads[0][k]) > 0, f"{k}: zero gradient"
        assert rel_err(grads[1][k], grads[0][k]) < 1e-4, k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_finite_differences(name, rng):
    cfg = make_config(**CONFIGS[name], seq_len=6)
    (model,) = twin_models(cfg, [("numpy", np.float64)])
    idx, targets = batch(rng, cfg)
    model.forward(idx, targets)
    model.zero_grad()
    model.backward()
    h = 1e-5
    for pname, p in model.parameters().items():
        flat, grad = p.data.reshape(-1), p.grad.reshape(-1)
        scale = np.abs(grad).max()
        for j in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            old = flat[j]
            flat[j] = old + h
            plus = model.forward(idx, targets)[1]
            flat[j] = old - h
            minus = model.forward(idx, targets)[1]
            flat[j] = old
            fd = (plus - minus) / (2 * h)
            # relative 1e-5, plus 1e-9 absolute: twenty times the rounding noise of the difference
            # quotient (eps * loss / h ~ 5e-11), for entries whose true gradient is 0 (a key bias)
            assert abs(fd - grad[j]) <= 1e-5 * max(abs(fd), abs(grad[j])) + 1e-9, \
                f"{pname}[{j}]: finite difference {fd:.6e}, backward {grad[j]:.6e} (largest {scale:.2e})"


def test_parameter_names_follow_gpt2():
    cfg = make_config(pos="learned", norm="layernorm", tie_embeddings=True)
    names = list(GPT(cfg, backend="numpy").parameters())
    assert names[:2] == ["wte.weight", "wpe.weight"]
    for name in ["h.0.ln_1.weight", "h.0.ln_1.bias", "h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight",
                 "h.0.ln_2.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight", "h.1.mlp.c_proj.weight",
                 "ln_f.weight", "ln_f.bias"]:
        assert name in names
    assert "lm_head.weight" not in names  # tied: shares wte.weight
    untied = GPT(make_config(tie_embeddings=False), backend="numpy").parameters()
    assert "lm_head.weight" in untied and "wpe.weight" not in untied
    # fused QKV with GQA: (H + 2 Hkv) * D rows
    gqa = GPT(make_config(n_head=4, n_kv_head=1), backend="numpy").parameters()
    assert gqa["h.0.attn.c_attn.weight"].data.shape == ((4 + 2) * 4, 16)


def test_tied_head_gets_both_gradients(rng):
    cfg = make_config()
    tied = GPT(cfg, backend="numpy", dtype=np.float64)
    idx, targets = batch(rng, cfg)
    tied.forward(idx, targets)
    tied.zero_grad()
    tied.backward()
    # The same model untied, with lm_head a copy of wte: the tied gradient is the sum of both.
    untied = GPT(make_config(tie_embeddings=False), backend="numpy", dtype=np.float64)
    for k, p in tied.parameters().items():
        untied.parameters()[k].data[...] = p.data
    untied.parameters()["lm_head.weight"].data[...] = tied.parameters()["wte.weight"].data
    untied.forward(idx, targets)
    untied.zero_grad()
    untied.backward()
    g = untied.parameters()
    assert rel_err(tied.parameters()["wte.weight"].grad, g["wte.weight"].grad + g["lm_head.weight"].grad) < 1e-12


def test_parameter_gradients_accumulate(rng):
    cfg = make_config(n_kv_head=2)
    model = GPT(cfg, backend="cpu")
    a, b = batch(rng, cfg), batch(rng, cfg)
    single = []
    for x, y in (a, b):
        model.forward(x, y)
        model.zero_grad()
        model.backward()
        single.append({k: p.grad.copy() for k, p in model.parameters().items()})
    model.zero_grad()
    for x, y in (a, b):  # two backward passes without zero_grad in between
        model.forward(x, y)
        model.backward()
    for k, p in model.parameters().items():
        assert rel_err(p.grad, single[0][k] + single[1][k]) < 1e-6, k


def test_zero_grad_reads_as_zeros(rng):
    """zero_grad() only marks the gradients; reading one writes its zeros, and a backward pass that
    follows overwrites or adds as if they had been there (the tied wte takes both halves)."""
    cfg = make_config(n_kv_head=2, bias=True)
    model = GPT(cfg, backend="cpu")
    x, y = batch(rng, cfg)
    model.forward(x, y)
    model.backward()
    first = {k: p.grad.copy() for k, p in model.parameters().items()}
    model.zero_grad()
    assert all(p.grad_is_zero for p in model.parameters().values())
    assert all(not p.grad.any() for p in model.parameters().values())
    assert not any(p.grad_is_zero for p in model.parameters().values())
    model.zero_grad()
    model.forward(x, y)
    model.backward()
    for k, p in model.parameters().items():
        assert np.array_equal(p.grad, first[k]), k


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_training_steps_lower_the_loss(rng, backend):
    before = llmcore.ops.get_matmul_precision()
    llmcore.ops.set_matmul_precision("high")  # TF32 on cuda, the training default (no effect on cpu)
    try:
        cfg = make_config(vocab_size=8, seq_len=16, n_layer=1, d_model=32, n_head=2, n_kv_head=1)
        model = GPT(cfg, backend=backend)
        opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        pattern = np.tile(np.arange(8), 8)  # a cycle the model can learn
        losses = []
        for _ in range(60):
            starts = rng.integers(0, 8, 4)
            x = np.stack([pattern[s:s + 16] for s in starts])
            y = np.stack([pattern[s + 1:s + 17] for s in starts])
            losses.append(model.forward(x, y)[1])
            model.zero_grad()
            model.backward()
            assert np.isfinite(clip_grad_norm(model.parameters(), 1.0))
            opt.step()
    finally:
        llmcore.ops.set_matmul_precision(before)
    assert losses[0] > 1.5 and losses[-1] < 0.2, (losses[0], losses[-1])
    assert all(isinstance(p.data, model.be.xp.ndarray) for p in model.parameters().values())  # stayed on the device


def test_bad_configs_and_backends():
    with pytest.raises(ValueError, match="n_kv_head"):
        make_config(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="d_model"):
        make_config(d_model=18, n_head=4)
    with pytest.raises(ValueError, match="pos"):
        make_config(pos="relative")
    if not llmcore.cuda_available():  # (test_cuda_backend_says_what_is_missing checks the message)
        with pytest.raises(RuntimeError, match="cuda"):
            GPT(make_config(), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        get_backend("tpu")
    with pytest.raises(TypeError, match="float32"):
        GPT(make_config(), backend="cpu", dtype=np.float64)
    model = GPT(make_config(), backend="numpy")
    with pytest.raises(ValueError, match="seq_len"):
        model.forward(np.zeros((1, 13), dtype=np.int64))
    with pytest.raises(RuntimeError, match="targets"):
        model.forward(np.zeros((1, 4), dtype=np.int64))
        model.backward()


def test_rope_backward_is_the_transpose_of_forward(rng):
    B, T, H, D = 2, 5, 3, 8
    rot = positions.rope_tables(T, D, dtype=np.float64)
    assert rot.shape == (T, D // 2) and rot.dtype == np.complex128
    assert positions.rope_tables(T, D).dtype == np.complex64
    x, dy = rng.standard_normal((2, B, T, H, D))
    y = positions.rope_forward(x, rot, out=np.empty_like(x))
    dx = positions.rope_backward(dy, rot, out=np.empty_like(x))
    assert np.isclose(np.sum(y * dy), np.sum(x * dx))
    assert np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))  # a rotation
    # pair i at position t is rotated by t * 10000^(-2i/D)
    t, i = 3, 1
    a = t * 10000 ** (-2 * i / D)
    x0, x1 = x[0, t, 0, 2 * i], x[0, t, 0, 2 * i + 1]
    assert np.allclose(y[0, t, 0, 2 * i:2 * i + 2], [x0 * np.cos(a) - x1 * np.sin(a), x0 * np.sin(a) + x1 * np.cos(a)])
    # a strided view (a slice of a fused buffer) in and out, as the attention layer uses it
    buf = rng.standard_normal((B, T, 2 * H, D))
    out = np.zeros((B, T, 2 * H, D))
    positions.rope_forward(buf[:, :, H:], rot, out=out[:, :, :H])
    assert np.array_equal(out[:, :, :H], positions.rope_forward(buf[:, :, H:].copy(), rot, np.empty((B, T, H, D))))
    assert not out[:, :, H:].any()
    # relative: <rope(q, m), rope(k, n)> depends on m - n only
    q, k = rng.standard_normal((2, D))
    rot = positions.rope_tables(12, D, dtype=np.float64)

    def rotate(v, pos):
        return positions.rope_forward(v[None, None, None], rot[pos:pos + 1], out=np.empty((1, 1, 1, D)))[0, 0, 0]
    assert np.isclose(rotate(q, 7) @ rotate(k, 4), rotate(q, 5) @ rotate(k, 2))


def test_sinusoidal_table_and_alibi_slopes():
    table = positions.sinusoidal_table(50, 6, dtype=np.float64)
    assert table.shape == (50, 6)
    assert np.allclose(table[:, 0], np.sin(np.arange(50)))
    assert np.allclose(table[:, 3], np.cos(np.arange(50) / 10000 ** (2 / 6)))
    assert np.allclose(positions.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    # not a power of two: the 4-head slopes, then every other slope of the 8-head set
    assert np.allclose(positions.alibi_slopes(6), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3])


# ----------------------------------------------------------------------------------------------
# Device plumbing. A fake device backend runs everywhere: NumPy and the compiled CPU core underneath,
# but every array that crosses to_device comes back as a DeviceArray, a distinct type, so a
# parameter, gradient, moment or table left on the host (a missed be.to_device) shows up.

class DeviceArray(np.ndarray):
    """An array 'on the fake device' (a NumPy subclass: the CPU kernels still accept it)."""


def _on_device(result):
    """A kernel's outputs, as a device's kernels return them: on the device."""
    if isinstance(result, tuple):
        return tuple(_on_device(r) for r in result)
    if isinstance(result, np.ndarray) and not isinstance(result, DeviceArray):
        return result.view(DeviceArray)
    return result


class _DeviceOps:
    """llmcore.ops whose results are DeviceArrays (fresh gradients become Parameter.grad)."""

    def __getattr__(self, name):
        op = getattr(llmcore.ops, name)
        if not callable(op):
            return op
        return lambda *args, **kwargs: _on_device(op(*args, **kwargs))


def fake_device_backend(calls=None):
    calls = {} if calls is None else calls
    calls.setdefault("to_device", 0)
    calls.setdefault("to_host", 0)

    def to_device(a):
        assert not isinstance(a, DeviceArray), "to_device got an array already on the device"
        calls["to_device"] += 1
        return np.array(a, copy=True).view(DeviceArray)  # a copy, as cupy.asarray makes

    def to_host(a):
        calls["to_host"] += 1
        return np.array(a, copy=True)  # a plain ndarray again, as cupy.asnumpy makes

    return nn.Backend("fake-device", _DeviceOps(), np, to_device=to_device, to_host=to_host)


def assert_on_device(model, opt=None):
    arrays = {}
    for k, p in model.parameters().items():
        arrays[k], arrays[k + ".grad"] = p.data, p.grad
    for i, block in enumerate(model.h):
        for name in ("rope", "alibi_slopes"):
            if getattr(block.attn, name) is not None:
                arrays[f"h.{i}.attn.{name}"] = getattr(block.attn, name)
    if model.pos_table is not None:
        arrays["pos_table"] = model.pos_table
    if opt is not None:
        arrays.update({f"opt.{k}": a for k, a in opt.state_arrays().items()})
    for k, a in arrays.items():
        assert isinstance(a, DeviceArray), f"{k} is a {type(a).__name__}, not on the device"


@pytest.mark.parametrize("pos", ["rope", "alibi", "sinusoidal", "learned"])
def test_fake_device_backend_matches_cpu(pos, rng):
    """Weights start equal (drawn on the host, then moved), and forward, backward, clipping and
    AdamW give the cpu backend's results bit for bit, with every array on the device."""
    cfg = make_config(pos=pos, n_kv_head=2, bias=pos == "learned", tie_embeddings=pos != "sinusoidal")
    calls = {}
    models = [GPT(cfg, backend="cpu", seed=3), GPT(cfg, backend=fake_device_backend(calls), seed=3)]
    opts = [AdamW(m.parameters(), lr=1e-2, backend=m.be) for m in models]
    assert_on_device(models[1], opts[1])
    for m in models:
        perturb(m, np.random.default_rng(4))
    results = []
    for m, opt in zip(models, opts):
        losses = []
        for step in range(2):
            idx, targets = batch(np.random.default_rng(step), cfg)
            losses.append(m.forward(idx, targets)[1])
            m.zero_grad()
            m.backward()
            losses.append(clip_grad_norm(m.parameters(), 1.0))
            opt.step()
        results.append((losses, {k: np.asarray(p.data) for k, p in m.parameters().items()}))
    assert_on_device(models[1], opts[1])
    assert calls["to_device"] > 0 and calls["to_host"] > 0
    assert results[0][0] == results[1][0]
    for k, a in results[0][1].items():
        assert np.array_equal(a, results[1][1][k]), k


def test_cuda_backend_says_what_is_missing(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    with pytest.raises(RuntimeError, match=r'backend .cuda. is not available: CuPy is not installed.*'
                                           r'pip install "llmcore\[cuda\]"'):
        get_backend("cuda")
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))  # CuPy present...
    monkeypatch.setattr(llmcore._backend, "cuda_available", lambda: False)  # ...but no usable GPU
    with pytest.raises(RuntimeError) as exc:
        GPT(make_config(), backend="cuda")
    msg = str(exc.value)
    assert "CuPy" not in msg and ("built without its CUDA core" in msg or "sees no GPU" in msg), msg
    assert "'cpu'" in msg  # and what to use instead


# ----------------------------------------------------------------------------------------------
# The CUDA backend (skipped without a GPU, CuPy and the CUDA core).

@pytest.fixture
def matmul_precision():
    """Sets the GPU matmul precision for one test and restores it afterwards."""
    before = llmcore.ops.get_matmul_precision()
    yield llmcore.ops.set_matmul_precision
    llmcore.ops.set_matmul_precision(before)


CUDA_CONFIGS = {
    "rope-rms-gelu-gqa": dict(pos="rope"),
    "alibi-ln-gelu-gqa": dict(pos="alibi", norm="layernorm"),
    "learned-ln-relu-bias-untied": dict(pos="learned", norm="layernorm", act="relu", bias=True,
                                        tie_embeddings=False),
    "sinusoidal-rms-relu-mqa": dict(pos="sinusoidal", act="relu", n_kv_head=1),
}


def cuda_config(**kw):
    base = dict(vocab_size=65, seq_len=32, n_layer=2, n_head=4, n_kv_head=2, d_model=64)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CUDA_CONFIGS))
def test_cpu_and_cuda_backends_agree(name, rng, cp, matmul_precision):
    matmul_precision("highest")  # fp32 on the GPU: only summation order differs from the CPU
    cfg = cuda_config(**CUDA_CONFIGS[name])
    cpu, gpu = GPT(cfg, backend="cpu", seed=5), GPT(cfg, backend="cuda", seed=5)
    assert gpu.be.xp is cp
    for k, p in cpu.parameters().items():  # the same seed: the same initial weights
        q = gpu.parameters()[k]
        assert isinstance(q.data, cp.ndarray) and isinstance(q.grad, cp.ndarray), k
        assert np.array_equal(cp.asnumpy(q.data), p.data), k
    idx, targets = batch(rng, cfg, B=4)
    losses, grads = [], []
    for m in (cpu, gpu):
        logits, loss = m.forward(idx, targets)
        assert isinstance(loss, float) and logits.shape == (4, cfg.seq_len, cfg.vocab_size)
        m.zero_grad()
        m.backward()
        losses.append(loss)
        grads.append({k: m.be.to_host(p.grad) for k, p in m.parameters().items()})
    assert isinstance(logits, cp.ndarray)
    assert abs(losses[1] - losses[0]) <= 1e-4 * abs(losses[0]), losses
    flat = [np.concatenate([g[k].ravel() for k in sorted(g)]) for g in grads]
    assert rel_err(flat[1], flat[0]) < 1e-3
    for k in grads[0]:  # no parameter hides behind the big ones in the concatenation
        assert rel_err(grads[1][k], grads[0][k]) < 1e-2, k
    # clipping and one AdamW step on the GPU (moments on the GPU too)
    opts = [AdamW(m.parameters(), lr=1e-3) for m in (cpu, gpu)]
    assert opts[1].be.name == "cuda" and isinstance(opts[1].m["wte.weight"], cp.ndarray)
    norms = [clip_grad_norm(m.parameters(), 1.0) for m in (cpu, gpu)]
    assert isinstance(norms[1], float) and abs(norms[1] - norms[0]) <= 1e-4 * norms[0], norms
    for opt in opts:
        opt.step()
    after = [np.concatenate([m.be.to_host(p.data).ravel() for _, p in sorted(m.parameters().items())])
             for m in (cpu, gpu)]
    assert rel_err(after[1], after[0]) < 1e-4
