"""Shared test helpers: awkward shapes, random inputs, error measures, finite differences."""
from __future__ import annotations

import numpy as np

# Sizes around the kernels' vector widths (4/8/16 floats), matmul tiles (MR=6/12, NR=8/16/32,
# KC=256, MC=144/288) and row grains: 1, primes, and just under/over powers of two.
AWKWARD = [1, 2, 3, 5, 7, 15, 16, 17, 31, 33, 63, 65, 127, 129, 145, 193, 257, 1031]

# Row-wise operations: (rows..., C) with batch 1, 3-D inputs and one large row.
ROW_SHAPES = [(1, 1), (1, 7), (3, 16), (5, 17), (2, 31), (7, 33), (1, 65), (4, 3, 127),
              (2, 1, 129), (13, 257), (3, 1031), (2, 4099)]

# matmul (M, N, K): edges of every block size, and K = 0 (a sum over nothing).
MATMUL_SHAPES = [(1, 1, 1), (5, 7, 3), (6, 32, 192), (7, 33, 193), (12, 32, 256), (13, 1, 300),
                 (1, 100, 511), (145, 17, 257), (31, 65, 129), (289, 47, 385), (577, 40, 513), (64, 64, 0)]


def randn(rng, shape, dtype=np.float32, scale=1.0):
    """Standard normal entries (never all zeros), in `dtype`."""
    return np.asarray(rng.standard_normal(shape) * scale, dtype=dtype)


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| in float64 (0 when both are empty or zero)."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference shape {ref.shape}"
    denom = np.linalg.norm(ref)
    num = np.linalg.norm(ours - ref)
    if denom == 0:
        return float(num)
    return float(num / denom)


def assert_close(ours, ref, tol, what="result", *, float32_ref=None):
    """Relative error against the float64 reference at most `tol`, or, where the float32
    reference itself does worse (a result that cancels, like a norm's dx over one channel),
    at most twice what float32 NumPy gets: the bar FlashAttention's tests use."""
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32, f"{what}: expected float32, got {type(ours)} {getattr(ours, 'dtype', '')}"
    bar = tol if float32_ref is None else max(tol, 2 * rel_err(float32_ref, ref))
    err = rel_err(ours, ref)
    assert err <= bar, f"{what}: relative error {err:.3e} > {bar:.1e}"


def f64(*arrays):
    return tuple(None if a is None else np.asarray(a, dtype=np.float64) for a in arrays)


def numerical_grad(fn, x: np.ndarray, dout: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of sum(fn(x) * dout) with respect to every entry of x (float64)."""
    grad = np.zeros_like(x)
    flat = x.reshape(-1)
    g = grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = np.sum(fn(x) * dout)
        flat[i] = old - h
        minus = np.sum(fn(x) * dout)
        flat[i] = old
        g[i] = (plus - minus) / (2 * h)
    return grad


def attention_inputs(rng, B, T, S, H, Hkv, D, alibi=False):
    """float32 q (B, T, H, D), k and v (B, S, Hkv, D), dout like q, and ALiBi slopes (H,) or None."""
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k = rng.standard_normal((B, S, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, S, Hkv, D)).astype(np.float32)
    dout = rng.standard_normal((B, T, H, D)).astype(np.float32)
    slopes = rng.uniform(0.05, 0.6, H).astype(np.float32) if alibi else None
    return q, k, v, dout, slopes
