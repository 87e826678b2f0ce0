"""Fused attention, forward and backward: csrc/attention.cpp.

q, k and v are read through their strides, so views into one fused QKV buffer need no copy, e.g.

    qkv = x @ w_qkv                                    # (B, T, 3 * H * D)
    qkv = qkv.reshape(B, T, 3, H, D)
    out, lse = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])

Only the last axis (D) must be contiguous. dout, out and lse are copied if they are not
C-contiguous (the kernel reads them as dense blocks).

rope= fuses RoPE (positions.rope_tables) into both passes: the CPU kernels rotate q and k as they
read them and rotate dq and dk back as they write them, so a training step needs no rotation
passes of its own and q and k are left as given.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import _checks as chk


def _check_row_layout(name: str, x, hint: str = "") -> None:
    """What the kernels need of a non-empty (B, L, heads, D) view: a contiguous last axis and
    strides in whole float32 elements."""
    if x.shape[3] > 1 and x.strides[3] != x.itemsize:
        raise ValueError(f"{name}: the last axis (D) must be contiguous, got strides {x.strides} for shape "
                         f"{x.shape}{hint}")
    if any(st % x.itemsize for st in x.strides):
        raise ValueError(f"{name}: strides must be whole float32 elements, got {x.strides}")


def _head_view(name: str, x):
    """A float32 (B, L, heads, D) array whose last axis is contiguous, returned as is (no copy)."""
    x = chk.float_array(name, x, 4, contiguous=False)
    if x.size == 0:  # nothing is read (NumPy gives empty arrays zero strides)
        return x
    if any(st < 0 for st in x.strides):  # a reversed view: the kernels walk memory forwards
        x = x.copy()
    _check_row_layout(name, x, f"; pass np.ascontiguousarray({name}) or a view that keeps D contiguous")
    if not chk.is_cupy(x) and not x.flags.aligned:  # a view at an odd byte offset: the kernel reads whole floats
        x = x.copy()
    return x


def _check_qkv(q, k, v, causal, scale, alibi_slopes):
    q = _head_view("q", q)
    k = _head_view("k", k)
    v = _head_view("v", v)
    B, T, H, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k: batch size {k.shape[0]} does not match q's {B} (q {q.shape}, k {k.shape})")
    if k.shape[3] != D:
        raise ValueError(f"k: head dimension {k.shape[3]} does not match q's {D} (q {q.shape}, k {k.shape})")
    S, Hkv = k.shape[1], k.shape[2]
    chk.same_shape("v", v, k.shape, "k's shape (B, S, Hkv, D)")
    if Hkv == 0 or H % Hkv:
        raise ValueError(
            f"k: the number of key/value heads ({Hkv}) must divide the number of query heads "
            f"({H}) (q {q.shape}, k {k.shape})")
    if D == 0:
        raise ValueError(f"q: the head dimension D must be at least 1, got shape {q.shape}")
    if S == 0:
        raise ValueError(f"k: attention needs at least one key (S = 0, shape {k.shape})")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    causal = bool(causal)
    if causal and S < T:
        raise ValueError(
            f"k: causal attention places query i at key position S - T + i, so it needs S >= T "
            f"(S={S}, T={T}); pass causal=False to attend to every key")
    if scale is None:
        scale = 1.0 / float(np.sqrt(D))
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__}")
    elif not np.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    if alibi_slopes is not None:
        alibi_slopes = chk.float_array("alibi_slopes", alibi_slopes, 1)
        chk.same_shape("alibi_slopes", alibi_slopes, (H,), "one slope per query head")
    return q, k, v, causal, float(scale), alibi_slopes


def _check_rope(rope, q, k):
    """rope as the kernels read it: (S, D/2) complex64, C-contiguous, on the device of q and k."""
    if rope is None:
        return None
    xp = chk.array_module(k)
    if not chk.is_array(rope) or chk.array_module(rope) is not xp:
        raise TypeError(f"rope: expected a {xp.__name__} array (positions.rope_tables) on the device of q, "
                        f"k and v, got {type(rope).__qualname__}")
    if rope.dtype != np.complex64:
        raise TypeError(f"rope: expected a complex64 table (positions.rope_tables), got dtype {rope.dtype}")
    T, D, S = q.shape[1], q.shape[3], k.shape[1]
    if D % 2:
        raise ValueError(f"rope: RoPE rotates pairs, so the head dimension D must be even, got D = {D}")
    if rope.shape != (S, D // 2):
        raise ValueError(f"rope: expected shape (S, D/2) = ({S}, {D // 2}): one row per key position, got "
                         f"{rope.shape}")
    if T > S:
        raise ValueError(f"rope: query i sits at position S - T + i, so rotating queries needs T <= S "
                         f"(T={T}, S={S})")
    return xp.ascontiguousarray(rope)


def _rope_qk(q, k, rope, *, back=False, out=None):
    """q and k (queries at positions S - T + i) rotated by rope, or with back=True dq and dk turned
    back by the opposite rotation, into `out` (fresh arrays by default). The CUDA core has no fused
    RoPE, so on CuPy the rotations run around it."""
    from .. import positions

    T, S = q.shape[1], k.shape[1]
    xp = chk.array_module(q)
    out = out or (xp.empty(q.shape, np.float32), xp.empty(k.shape, np.float32))
    rotate = positions.rope_backward if back else positions.rope_forward
    return rotate(q, rope[S - T:], out[0]), rotate(k, rope, out[1])


def attention(q, k, v, *, causal=True, scale=None, alibi_slopes=None, rope=None):
    """(out (B, T, H, D), lse (B, H, T)) of softmax(q k^T scale - slope |pos_i - j|) v.

    q (B, T, H, D); k, v (B, S, Hkv, D) with H a multiple of Hkv (MHA, GQA, MQA). Query i sits at
    key position S - T + i; causal hides keys j > S - T + i. scale defaults to 1/sqrt(D);
    alibi_slopes is (H,) float32 or None. lse is the natural-log log-sum-exp of each query row's
    scores, which attention_backward needs. rope (S, D/2) complex64, if given, rotates q and k by
    their positions first (row p of the table for position p): attention(rope(q), rope(k), v).
    """
    q, k, v, causal, scale, alibi_slopes = _check_qkv(q, k, v, causal, scale, alibi_slopes)
    rope = _check_rope(rope, q, k)
    mod = chk.backend(q, k, v)
    if q.size == 0:  # no queries (B, T or H is 0): nothing to compute
        B, T, H, _ = q.shape
        xp = chk.array_module(q)
        return xp.zeros(q.shape, np.float32), xp.zeros((B, H, T), np.float32)
    if rope is None:
        return mod.attention_forward(q, k, v, causal, scale, alibi_slopes)
    if chk.is_cupy(q):  # the CUDA core reads rotated copies
        return mod.attention_forward(*_rope_qk(q, k, rope), v, causal, scale, alibi_slopes)
    return mod.attention_forward(q, k, v, causal, scale, alibi_slopes, rope)


def _grad_out(name: str, given, shape, inputs):
    """A writeable array of `shape` with a contiguous last axis (any other strides), overlapping
    none of `inputs` (name -> array), for attention_backward to write a gradient into."""
    given = chk.float_array(name, given, 4, contiguous=False)
    chk.same_shape(name, given, shape)
    if given.size:
        if any(st < 0 for st in given.strides):
            raise ValueError(f"{name}: written in place, so its strides must be non-negative, got {given.strides}")
        _check_row_layout(name, given)
    if not chk.is_cupy(given):
        if not given.flags.writeable:
            raise ValueError(f"{name}: written in place, so it must be writeable")
        for other, a in inputs.items():
            if a is not None and np.shares_memory(given, a):
                raise ValueError(f"{name}: must not overlap {other}")
    return given


def attention_backward(dout, q, k, v, out, lse, *, causal=True, scale=None, alibi_slopes=None,
                       dq=None, dk=None, dv=None, rope=None):
    """(dq, dk, dv) for out = attention(q, k, v, ...)[0], given dout and the forward's out, lse.

    GQA/MQA gradients are summed over the query heads that share a key/value head inside the
    kernel; dk and dv have k's and v's shapes. Pass dq, dk and dv (together) to have the gradients
    written into them: views with a contiguous last axis and any other strides, such as the q, k
    and v slices of a fused QKV gradient (B, T, H + 2 Hkv, D), which then needs no copies. They
    are returned as given. With the forward's rope, pass it here too: q and k are the unrotated
    inputs, and dq and dk their gradients.
    """
    q, k, v, causal, scale, alibi_slopes = _check_qkv(q, k, v, causal, scale, alibi_slopes)
    rope = _check_rope(rope, q, k)
    B, T, H, D = q.shape
    dout = chk.float_array("dout", dout, 4)
    chk.same_shape("dout", dout, q.shape, "q's shape (B, T, H, D)")
    out = chk.float_array("out", out, 4)
    chk.same_shape("out", out, q.shape, "q's shape (B, T, H, D)")
    lse = chk.float_array("lse", lse, 3)
    chk.same_shape("lse", lse, (B, H, T), "(B, H, T) from q's shape")
    given = (dq, dk, dv)
    if any(g is not None for g in given):
        if any(g is None for g in given):
            raise ValueError("dq, dk, dv: pass all three gradient outputs or none")
        inputs = dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse)
        dq = _grad_out("dq", dq, q.shape, inputs)
        dk = _grad_out("dk", dk, k.shape, dict(inputs, dq=dq))
        dv = _grad_out("dv", dv, v.shape, dict(inputs, dq=dq, dk=dk))
    mod = chk.backend(*(a for a in (dout, q, k, v, out, lse, dq, dk, dv) if a is not None))
    if q.size == 0 or k.size == 0:  # no queries or no batch: every gradient is an empty sum
        xp = chk.array_module(q)
        fresh = (xp.zeros(q.shape, np.float32), xp.zeros(k.shape, np.float32), xp.zeros(v.shape, np.float32))
        if dq is None:
            return fresh
    elif chk.is_cupy(q):  # the CUDA core writes fresh contiguous gradients: copied below when given
        if rope is None:
            fresh = mod.attention_backward(dout, q, k, v, out, lse, causal, scale, alibi_slopes)
        else:  # on rotated copies of q and k, its dq and dk turned back in place
            fresh = mod.attention_backward(dout, *_rope_qk(q, k, rope), v, out, lse, causal, scale, alibi_slopes)
            _rope_qk(fresh[0], fresh[1], rope, back=True, out=fresh[:2])
        if dq is None:
            return fresh
    else:  # the CPU core writes into dq, dk, dv when given
        return mod.attention_backward(dout, q, k, v, out, lse, causal, scale, alibi_slopes, dq, dk, dv, rope)
    for g, f in zip((dq, dk, dv), fresh):
        g[...] = f
    return dq, dk, dv
