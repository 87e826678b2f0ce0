"""Scaled-dot-product attention in NumPy, forward and backward: the specification of
csrc/attention.cpp. Scores are materialised (B, H, T, S): fine for a reference, never in a kernel.

Shapes: q (B, T, H, D); k, v (B, S, Hkv, D) with H a multiple of Hkv. Query head h reads key/value
head h // (H // Hkv): Hkv == H is multi-head attention, Hkv == 1 multi-query, anything between
grouped-query attention. Query i sits at key position pos_i = S - T + i (with S > T the queries
are the last T tokens, as when decoding against a KV cache).

Forward, per batch and query head, with G = H // Hkv and scale defaulting to 1 / sqrt(D):

    s[i, j]  = scale * q_i . k_j  -  slope_h * |pos_i - j|        (ALiBi: the second term)
    s[i, j]  = -inf  where causal and j > pos_i                     (the key is in the future)
    lse[i]   = log sum_j exp(s[i, j])                               (natural log, saved)
    p[i, j]  = exp(s[i, j] - lse[i])                                (softmax over keys)
    out[i]   = sum_j p[i, j] v_j

Backward, given dout = dL/dout and the forward's out and lse:

    dv_j     = sum_i p[i, j] dout_i                                 (summed over the group's heads)
    dp[i, j] = dout_i . v_j
    ds[i, j] = p[i, j] (dp[i, j] - delta_i),  delta_i = sum_j p[i, j] dp[i, j] = dout_i . out_i
    dq_i     = scale * sum_j ds[i, j] k_j
    dk_j     = scale * sum_i ds[i, j] q_i                           (summed over the group's heads)

The softmax Jacobian is diag(p) - p p^T, which is where ds comes from; delta_i is its p p^T part,
computed from out instead of from p (the form a kernel that never stores p can use).

With rope, an (S, D/2) complex table whose row p rotates position p (RoPE), q_i and k_j above are
rope(q)_i = q_i * rope[pos_i] and rope(k)_j = k_j * rope[j], each pair (x[2m], x[2m+1]) read as a
complex number; the backward turns the gradients of the rotated q and k back by the conjugate
rotation (a rotation's transpose), giving dq and dk for the unrotated inputs.
Inputs may be float32 or float64; everything is computed and returned in q's dtype.
"""
from __future__ import annotations

import numpy as np


def _check(q, k, v, causal):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v: expected 4 dimensions each, got shapes {q.shape}, {k.shape}, {v.shape}")
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape != (B, S, Hkv, D) or v.shape != k.shape or Hkv == 0 or H % Hkv:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q (B, T, H, D) and "
                         "k, v (B, S, Hkv, D) with H a multiple of Hkv")
    if S == 0:
        raise ValueError("k: softmax over zero keys is undefined (S = 0)")
    if causal and S < T:
        raise ValueError(f"k: causal attention needs S >= T (S={S}, T={T})")
    return B, T, H, D, S, Hkv


def _rotate(x, rot, conjugate=False):
    """x (B, L, heads, D) with each pair of its last axis multiplied by rot (L, D/2) as complex
    numbers (conjugated when asked), in x's float dtype."""
    rot = np.asarray(rot)
    if rot.shape != (x.shape[1], x.shape[3] // 2) or x.shape[3] % 2:
        raise ValueError(f"rope: expected an (S, D/2) = ({x.shape[1]}, {x.shape[3] // 2}) table for "
                         f"an even D, got {rot.shape} with D = {x.shape[3]}")
    dt = np.asarray(x).dtype
    cx = np.ascontiguousarray(x).view(np.complex128 if dt == np.float64 else np.complex64)
    r = rot.astype(cx.dtype)
    return (cx * (r.conj() if conjugate else r)[None, :, None, :]).view(dt)


def rotate_qk(q, k, rope, conjugate=False):
    """q and k rotated by rope (S, D/2): the queries by the rows of their positions S - T + i
    (rotated back, the backward of that, with conjugate)."""
    if rope is None:
        return q, k
    T, S = q.shape[1], k.shape[1]
    rope = np.asarray(rope)
    if not np.iscomplexobj(rope):
        raise TypeError(f"rope: expected a complex table (positions.rope_tables), got dtype {rope.dtype}")
    if rope.ndim != 2 or rope.shape[0] != S:
        raise ValueError(f"rope: expected {S} rows (one per key position), got shape {rope.shape}")
    if T > S:
        raise ValueError(f"rope: query i sits at position S - T + i, so it needs T <= S (T={T}, S={S})")
    return _rotate(q, rope[S - T:], conjugate), _rotate(k, rope, conjugate)


def _heads(x, H, dt):
    """(B, L, Hkv, D) -> (B, H, L, D) in dtype dt: key/value head h // G repeated for head h."""
    return np.repeat(x, H // x.shape[2], axis=2).transpose(0, 2, 1, 3).astype(dt)


def _scores(q, k, causal, scale, alibi_slopes):
    """s (B, H, T, S): scaled, biased and masked scores, in q's dtype."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    dt = q.dtype
    qh = q.transpose(0, 2, 1, 3)                                  # (B, H, T, D)
    kh = _heads(k, H, dt)                                         # (B, H, S, D)
    s = (qh @ kh.transpose(0, 1, 3, 2)) * dt.type(scale)          # (B, H, T, S)
    rel = (np.arange(T) + (S - T))[:, None] - np.arange(S)[None, :]  # (T, S): pos_i - j
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes, dtype=dt)
        s = s - slopes[None, :, None, None] * np.abs(rel).astype(dt)
    if causal:
        s = np.where(rel >= 0, s, dt.type(-np.inf))
    return s


def attention(q, k, v, *, causal=True, scale=None, alibi_slopes=None, rope=None):
    """(out (B, T, H, D), lse (B, H, T)) of softmax(q k^T scale + alibi, masked) v, q and k first
    rotated by rope when given."""
    B, T, H, D, S, Hkv = _check(q, k, v, causal)
    q, k = rotate_qk(q, k, rope)
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    s = _scores(q, k, causal, scale, alibi_slopes)                # (B, H, T, S)
    m = s.max(axis=-1, keepdims=True)                             # (B, H, T, 1)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)                             # (B, H, T, 1)
    lse = (m + np.log(l))[..., 0]                                 # (B, H, T)
    p = e / l                                                     # (B, H, T, S)
    out = (p @ _heads(v, H, q.dtype)).transpose(0, 2, 1, 3)       # (B, T, H, D)
    return out, lse.astype(q.dtype)


def attention_backward(dout, q, k, v, out, lse, *, causal=True, scale=None, alibi_slopes=None,
                       dq=None, dk=None, dv=None, rope=None):
    """(dq, dk, dv) for out = attention(q, k, v, ...)[0], given dout, out and lse; written into
    the given dq, dk, dv (all three) and returned as given when passed."""
    if dq is not None:
        for given, grad in zip((dq, dk, dv), attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale,
                                                                alibi_slopes=alibi_slopes, rope=rope)):
            given[...] = grad
        return dq, dk, dv
    B, T, H, D, S, Hkv = _check(q, k, v, causal)
    if rope is not None:
        dq, dk, dv = attention_backward(dout, *rotate_qk(q, k, rope), v, out, lse, causal=causal,
                                        scale=scale, alibi_slopes=alibi_slopes)
        return (*rotate_qk(dq, dk, rope, conjugate=True), dv)
    G = H // Hkv
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    dt = q.dtype
    s = _scores(q, k, causal, scale, alibi_slopes)                # (B, H, T, S)
    p = np.exp(s - np.asarray(lse, dtype=dt)[..., None])          # (B, H, T, S)
    kh, vh = _heads(k, H, dt), _heads(v, H, dt)                   # (B, H, S, D)
    qh = q.transpose(0, 2, 1, 3)                                  # (B, H, T, D)
    doh = np.asarray(dout, dtype=dt).transpose(0, 2, 1, 3)        # (B, H, T, D)
    dv = p.transpose(0, 1, 3, 2) @ doh                            # (B, H, S, D)
    dp = doh @ vh.transpose(0, 1, 3, 2)                           # (B, H, T, S)
    delta = (doh * np.asarray(out, dtype=dt).transpose(0, 2, 1, 3)).sum(axis=-1)  # (B, H, T)
    ds = p * (dp - delta[..., None])                              # (B, H, T, S)
    dq = (ds @ kh).transpose(0, 2, 1, 3) * dt.type(scale)         # (B, T, H, D)
    dk = (ds.transpose(0, 1, 3, 2) @ qh) * dt.type(scale)         # (B, H, S, D)
    dk, dv = dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)   # (B, S, H, D)
    # Heads h = hk * G + g share key/value head hk: sum their gradients back onto it.
    dk = dk.reshape(B, S, Hkv, G, D).sum(axis=3)                  # (B, S, Hkv, D)
    dv = dv.reshape(B, S, Hkv, G, D).sum(axis=3)
    return dq, dk, dv
