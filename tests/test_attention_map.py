"""`llmcore attention-map`: the recomputed attention weights, and the command end to end."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from llmcore import checkpoint as ckpt
from llmcore import reference
from llmcore.attention_map import attention_weights
from llmcore.model import GPT, GPTConfig
from llmcore.tokenizer import CharTokenizer

HAS_PLOT = importlib.util.find_spec("matplotlib") is not None


def _sharpen(model, factor=30.0):
    """Scales the QKV projections up so that attention is far from uniform (a random model's is
    nearly flat, which would let a wrong mask or scale pass)."""
    for block in model.h:
        block.attn.c_attn.weight.data *= factor


@pytest.mark.parametrize("pos, n_head, n_kv_head", [("rope", 4, 4), ("alibi", 4, 2), ("learned", 4, 1),
                                                     ("sinusoidal", 2, 2)])
def test_weights_are_causal_distributions_that_reproduce_attention(rng, pos, n_head, n_kv_head):
    cfg = GPTConfig(vocab_size=13, seq_len=16, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, d_model=32, pos=pos)
    model = GPT(cfg, seed=3)
    _sharpen(model)
    model.forward(rng.integers(0, 13, (2, 11)))
    w = attention_weights(model)  # (n_layer, B, H, T, T)
    assert w.shape == (2, 2, n_head, 11, 11)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-12)
    assert (w[..., np.triu_indices(11, k=1)[0], np.triu_indices(11, k=1)[1]] == 0).all()  # no future keys
    assert w.max() > 0.9  # sharpened: some head attends almost entirely to one key
    for layer, block in enumerate(model.h):
        q, k, v, out, _ = (np.asarray(a, dtype=np.float64) for a in block.attn.saved[:5])
        rope = block.attn.saved[5]  # the RoPE table the kernel rotated q and k by (None: not fused)
        assert (rope is not None) == (pos == "rope")
        slopes = None if block.attn.alibi_slopes is None else np.asarray(block.attn.alibi_slopes, np.float64)
        ref, _ = reference.attention(q, k, v, causal=True, alibi_slopes=slopes, rope=rope)  # (B, T, H, D)
        v_heads = np.repeat(v, n_head // n_kv_head, axis=2).transpose(0, 2, 1, 3)  # (B, H, T, D)
        mine = (w[layer] @ v_heads).transpose(0, 2, 1, 3)  # (B, T, H, D)
        np.testing.assert_allclose(mine, ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(mine, out, rtol=1e-3, atol=1e-5)  # the float32 kernel's output


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llmcore.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, LLMCORE_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A checkpoint of an untrained 2-layer, 2-head model over a small character vocabulary."""
    tok = CharTokenizer.train("abcdefgh ROMEO.\n")
    cfg = GPTConfig(vocab_size=tok.vocab_size, seq_len=24, n_layer=2, n_head=2, n_kv_head=2, d_model=16)
    model = GPT(cfg, seed=0)
    out = tmp_path_factory.mktemp("ckpt")
    ckpt.save(out, {k: p.data for k, p in model.parameters().items()}, {},
              {"step": 0, "config": cfg.to_dict(), "tokenizer": tok.to_dict()})
    return out


def test_cli_writes_the_grid_and_the_weights(tmp_path, checkpoint_dir):
    png = tmp_path / "maps" / "attn.png"
    r = _cli("attention-map", "--ckpt", checkpoint_dir, "--prompt", "ROMEO. abc", "--out", png)
    assert r.returncode == 0, r.stderr
    saved = np.load(tmp_path / "maps" / "attn.npz")
    assert saved["weights"].shape == (2, 2, 10, 10) and saved["tokens"].shape == (10,)
    np.testing.assert_allclose(saved["weights"].sum(axis=-1), 1.0, atol=1e-5)
    assert png.exists() == HAS_PLOT
    assert ("attention map:" in r.stdout) == HAS_PLOT


@pytest.mark.parametrize("prompt, message", [("a" * 25, "shorten it"), ("xyz", "outside"), ("", "no tokens")])
def test_cli_explains_a_bad_prompt(tmp_path, checkpoint_dir, prompt, message):
    r = _cli("attention-map", "--ckpt", checkpoint_dir, "--prompt", prompt, "--out", tmp_path / "a.png")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
