"""Sampling from a GPT, with a KV cache: the prompt is run once (prefill), then each new token is one
step of T=1 against the cached keys and values (attention with S > T).

The context window. The model was trained on seq_len positions, so the context it sees is the
tokens from a window start w to the end. When the context would grow past seq_len, w jumps forward
so that the newest seq_len // 2 tokens remain, and (with the cache) those are prefilled again.
Jumping by half a window instead of sliding one token per step keeps the cache useful: one prefill
per seq_len // 2 new tokens. use_cache=False recomputes the same window from scratch every step,
so both paths see the same context and sample the same tokens.

On the "cuda" backend the model and its KV caches live on the GPU; the token ids stay on the host
(a few integers per step) and so does sampling, which needs only the last row of logits.
"""
from __future__ import annotations

import numpy as np


def _check_args(max_new_tokens, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """One token id per row of logits (B, V): greedy at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k most likely tokens and then to the
    smallest set whose probability reaches top_p (nucleus sampling)."""
    logits = np.asarray(logits, dtype=np.float64)  # (B, V); sampling is tiny next to the model
    if temperature == 0 or top_k == 1:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth = np.partition(logits, V - top_k, axis=-1)[:, V - top_k][:, None]  # (B, 1) k-th largest
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)  # (B, V)
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, axis=-1)  # (B, V) most likely first
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the tokens ranked above each
        sorted_p[before >= top_p] = 0  # the most likely token always survives (before == 0)
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_p, axis=-1)
        probs /= probs.sum(axis=-1, keepdims=True)
    # Inverse-CDF draw: one uniform per row.
    u = rng.random((probs.shape[0], 1))
    cdf = np.cumsum(probs, axis=-1)
    return np.minimum((cdf < u * cdf[:, -1:]).sum(axis=-1), V - 1)


def generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, seed=None,
             use_cache=True):
    """Appends max_new_tokens sampled tokens to idx ((B, T) or (T,) ints); returns the same rank."""
    _check_args(max_new_tokens, temperature, top_k, top_p)
    idx = np.asarray(idx, dtype=np.int64)
    squeeze = idx.ndim == 1
    seq = idx[None, :] if squeeze else idx  # (B, T0)
    if seq.ndim != 2 or seq.shape[1] == 0:
        raise ValueError(f"idx: expected a non-empty (T,) or (B, T) array of token ids, got shape {idx.shape}")
    B, T0 = seq.shape
    seq_len = model.config.seq_len
    keep = max(1, seq_len // 2)  # tokens kept when the window jumps
    rng = np.random.default_rng(seed)
    out = np.empty((B, T0 + max_new_tokens), dtype=np.int64)
    out[:, :T0] = seq
    L = T0  # tokens so far
    w = 0 if T0 <= seq_len else T0 - keep  # window start
    caches = model.new_kv_caches(B) if use_cache else None
    cached = 0  # tokens of the current window already in the caches
    for _ in range(max_new_tokens):
        if L - w > seq_len:  # the window is full: jump, and prefill the kept tokens again
            w, cached = L - keep, 0
        if not use_cache:
            logits = model.forward_last(out[:, w:L])
        else:
            # prefill everything not yet cached (the prompt, or the kept tokens after a jump); then
            # exactly one new token per step.
            logits = model.forward_last(out[:, w + cached:L], caches, start=cached)
            cached = L - w
        # Sampling runs on the host: one (B, V) row copied off the device per new token.
        out[:, L] = sample_next(model.be.to_host(logits), rng, temperature, top_k, top_p)
        L += 1
    return out[0] if squeeze else out
