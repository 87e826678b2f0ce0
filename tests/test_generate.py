"""Sampling with and without the KV cache, and the sampling rules."""
import numpy as np
import pytest

import llmcore
from llmcore import nn
from llmcore.checkpoint import load_model_arrays
from llmcore.generate import sample_next
from llmcore.model import GPT, GPTConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(pos, n_kv_head=2, seq_len=16, backend="cpu", seed=0):
    cfg = GPTConfig(vocab_size=17, seq_len=seq_len, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32, pos=pos)
    model = GPT(cfg, backend=backend, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in model.parameters().values():  # sharp, position-dependent predictions
        if p.data.ndim == 2:
            p.data[...] = rng.standard_normal(p.data.shape) * 1.5 / np.sqrt(p.data.shape[1])
    return model


@pytest.mark.parametrize("pos,n_kv_head", [("rope", 2), ("learned", 4), ("sinusoidal", 1), ("alibi", 2)])
def test_cache_gives_the_tokens_of_recomputation(pos, n_kv_head):
    model = random_model(pos, n_kv_head)
    prompt = np.random.default_rng(3).integers(0, 17, (3, 5))
    # 45 new tokens on a 16-token window: the window jumps (and the cache is refilled) 4 times
    greedy_cached = model.generate(prompt, 45, temperature=0, use_cache=True)
    greedy_full = model.generate(prompt, 45, temperature=0, use_cache=False)
    assert greedy_cached.shape == (3, 50)
    assert (greedy_cached[:, :5] == prompt).all()
    assert (greedy_cached == greedy_full).all()
    kw = dict(temperature=0.9, top_k=8, top_p=0.95, seed=11)
    sampled = model.generate(prompt, 45, use_cache=True, **kw)
    assert len(np.unique(sampled[:, 5:])) > 3  # not a degenerate constant stream
    assert (sampled == model.generate(prompt, 45, use_cache=False, **kw)).all()
    # a prompt longer than the window: both paths keep its last seq_len // 2 tokens
    long_prompt = np.random.default_rng(4).integers(0, 17, (2, 21))
    a = model.generate(long_prompt, 12, temperature=0, use_cache=True)
    assert (a == model.generate(long_prompt, 12, temperature=0, use_cache=False)).all()
    assert (a[:, 21:] == model.generate(long_prompt[:, -8:], 12, temperature=0)[:, 8:]).all()


def test_cache_logits_match_full_forward():
    model = random_model("rope", 1, seq_len=24)
    idx = np.random.default_rng(0).integers(0, 17, (2, 20))
    full, _ = model.forward(idx)  # (B, T, V)
    caches = model.new_kv_caches(2)
    assert caches[0].k.shape == (2, 24, 1, 8)  # MQA: one K/V head in the cache
    got = [model.forward_last(idx[:, :8], caches, start=0)]  # prefill 8
    for t in range(8, 20):
        got.append(model.forward_last(idx[:, t:t + 1], caches, start=t))
    want = full[:, 7:]
    assert np.abs(np.stack(got, axis=1) - want).max() < 1e-4 * np.abs(want).max()


def test_cached_generation_runs_one_token_per_step(monkeypatch):
    model = random_model("rope", 2, seq_len=64)
    seen = []
    trunk = model._trunk

    def counting(idx, caches=None, start=0):
        seen.append(idx.shape[1])
        return trunk(idx, caches, start)

    monkeypatch.setattr(model, "_trunk", counting)
    prompt = np.arange(10) % 17
    model.generate(prompt, 20, temperature=0, use_cache=True)
    assert seen == [10] + [1] * 19  # prefill, then one token per step against the cache
    seen.clear()
    model.generate(prompt, 20, temperature=0, use_cache=False)
    assert seen == list(range(10, 30))  # the whole context every step


def test_numpy_backend_samples_the_same_tokens():
    prompt = np.arange(4)
    a = random_model("alibi", 2, backend="cpu").generate(prompt, 12, temperature=0)
    b = random_model("alibi", 2, backend="numpy").generate(prompt, 12, temperature=0)
    assert a.ndim == 1 and (a == b).all()


def test_sampling_rules():
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]] * 20000))
    rng = np.random.default_rng(0)
    freq = np.bincount(sample_next(logits, rng), minlength=4) / 20000
    assert np.allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.015)
    freq = np.bincount(sample_next(logits, rng, top_k=2), minlength=4) / 20000
    assert freq[:2].sum() == 0 and np.allclose(freq[2:], [3 / 7, 4 / 7], atol=0.015)
    # top_p 0.65: the smallest set reaching 0.65 is {0.4, 0.3}
    freq = np.bincount(sample_next(logits, rng, top_p=0.65), minlength=4) / 20000
    assert freq[:2].sum() == 0 and np.allclose(freq[2:], [3 / 7, 4 / 7], atol=0.015)
    # low temperature sharpens towards the argmax; temperature 0, top_k=1 and a tiny top_p are greedy
    freq = np.bincount(sample_next(logits, rng, temperature=0.25), minlength=4) / 20000
    assert freq[3] > 0.6
    for kw in (dict(temperature=0), dict(top_k=1), dict(top_p=1e-6)):
        assert (sample_next(logits[:5], rng, **kw) == 3).all()
    # seeds make samples reproducible
    model = random_model("rope")
    a = model.generate([1, 2, 3], 10, seed=5)
    assert (a == model.generate([1, 2, 3], 10, seed=5)).all()
    assert not (a == model.generate([1, 2, 3], 10, seed=6)).all()


def test_bad_generate_arguments():
    model = random_model("rope")
    for kw in (dict(temperature=-1), dict(top_k=0), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            model.generate([1, 2], 3, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([1, 2], -1)
    with pytest.raises(ValueError, match="idx"):
        model.generate(np.zeros((1, 0), dtype=np.int64), 3)
    assert isinstance(nn.KVCache(1, 4, 2, 8, np.float32).k, np.ndarray)


def test_generation_on_a_device_backend_matches_cpu():
    """KV caches on the (fake) device, the last logits row copied to the host for sampling: the same
    tokens as the cpu backend, with and without the cache."""
    from test_model import fake_device_backend

    calls = {}
    cpu, dev = random_model("rope", 2), random_model("rope", 2, backend=fake_device_backend(calls))
    prompt = np.random.default_rng(3).integers(0, 17, (2, 5))
    for kw in (dict(temperature=0), dict(temperature=0.9, top_k=8, seed=2)):
        want = cpu.generate(prompt, 24, **kw)
        before = calls["to_host"]
        got = dev.generate(prompt, 24, **kw)
        assert type(got) is np.ndarray and (got == want).all()
        assert calls["to_host"] - before >= 24  # (the ids and) one logits row per new token
        assert (dev.generate(prompt, 24, use_cache=False, **kw) == want).all()


@pytest.mark.cuda
@pytest.mark.parametrize("pos,n_kv_head", [("rope", 2), ("alibi", 1), ("learned", 4)])
def test_cuda_cache_gives_the_tokens_of_recomputation(pos, n_kv_head, cp):
    before = llmcore.ops.get_matmul_precision()
    llmcore.ops.set_matmul_precision("highest")
    try:
        cpu = random_model(pos, n_kv_head, backend="cpu")
        model = GPT(cpu.config, backend="cuda")
        # (CuPy takes host arrays only through be.to_device, as load_model_arrays does)
        load_model_arrays(model, {k: p.data for k, p in cpu.parameters().items()})
        caches = model.new_kv_caches(3)
        assert isinstance(caches[0].k, cp.ndarray)
        prompt = np.random.default_rng(3).integers(0, 17, (3, 5))
        # 45 new tokens on a 16-token window: the window jumps (and the cache is refilled) 4 times
        cached = model.generate(prompt, 45, temperature=0, use_cache=True)
        assert isinstance(cached, np.ndarray) and cached.shape == (3, 50)
        assert (cached == model.generate(prompt, 45, temperature=0, use_cache=False)).all()
        kw = dict(temperature=0.9, top_k=8, top_p=0.95, seed=11)
        assert (model.generate(prompt, 20, **kw) == model.generate(prompt, 20, use_cache=False, **kw)).all()
        # the cached logits themselves: prefill then one token at a time, against the cpu model's
        idx = np.random.default_rng(0).integers(0, 17, (2, 16))
        want = cpu.forward(idx)[0][:, 7:]  # (B, 9, V)
        caches = model.new_kv_caches(2)
        got = [model.forward_last(idx[:, :8], caches, start=0)]
        for t in range(8, 16):
            got.append(model.forward_last(idx[:, t:t + 1], caches, start=t))
        got = cp.asnumpy(cp.stack(got, axis=1))
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    finally:
        llmcore.ops.set_matmul_precision(before)
