"""Positional encodings that are not kernels: RoPE, sinusoidal tables and ALiBi slopes.

They are cheap elementwise work next to the matmuls, so they live here in vectorised NumPy,
forward beside backward. Learned positions are an ordinary embedding table (model.py), and ALiBi
is a bias the attention kernel adds itself; only its per-head slopes are computed here.
"""
from __future__ import annotations

import math

import numpy as np


def rope_tables(max_len: int, head_dim: int, base: float = 10000.0, dtype=np.float32):
    """(max_len, head_dim // 2) complex: e^(i * pos * base^(-2i/D)), the rotation of pair i at pos.

    complex64 for float32 models, complex128 for float64 ones.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim: RoPE rotates pairs of channels, so it must be even, got {head_dim}")
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (D/2,)
    angles = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq[None, :]  # (max_len, D/2)
    # Computed in float64 and rounded once, so the numpy (float64) and cpu (float32) backends
    # rotate by the same angles up to the final rounding.
    return np.exp(1j * angles).astype(np.result_type(dtype, np.complex64))


# A pair (x[2i], x[2i+1]) read as the complex number x[2i] + i x[2i+1] is rotated by one complex
# multiply. Viewing the float array as complex (no copy: the last axis is contiguous) makes RoPE a
# single vectorised ufunc call: 0.18 ms instead of 0.9 ms for six real multiply/adds on strided
# halves, at (B, T, heads, D) = (16, 128, 8, 32) float32 on this project's 2-core test machine.

def rope_forward(x, rot, out):
    """Rotates the pairs (x[..., 2i], x[..., 2i+1]) of x (B, T, H, D) by rot (T, D/2), the rows of
    rope_tables for the positions of x's T tokens. Writes into `out` (B, T, H, D), which may be a
    slice of a larger buffer (last axis contiguous), and returns it."""
    np.multiply(x.view(rot.dtype), rot[None, :, None, :], out=out.view(rot.dtype))
    return out


def rope_backward(dy, rot, out):
    """The gradient through rope_forward: the rotation by the opposite angles (its transpose)."""
    np.multiply(dy.view(rot.dtype), rot.conj()[None, :, None, :], out=out.view(rot.dtype))
    return out


def sinusoidal_table(max_len: int, d_model: int, dtype=np.float32):
    """(max_len, d_model): sin on even channels, cos on odd ones, wavelengths 2pi..10000*2pi
    ("Attention Is All You Need", section 3.5). Fixed, so it has no gradient."""
    half = (d_model + 1) // 2
    inv_freq = 10000.0 ** (-np.arange(half, dtype=np.float64) * 2 / d_model)  # (ceil(C/2),)
    angles = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq[None, :]  # (max_len, ceil(C/2))
    table = np.empty((max_len, 2 * half), dtype=np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)
    return table[:, :d_model].astype(dtype)


def alibi_slopes(n_head: int, dtype=np.float32):
    """The per-head ALiBi slopes of Press et al.: 2^(-8/n), 2^(-16/n), ... for n a power of two;
    otherwise the slopes of the next lower power of two, then every other slope of the next higher
    one (the paper's reference implementation)."""
    def powers_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_head & (n_head - 1) == 0:
        slopes = powers_of_two(n_head)
    else:
        lower = 2 ** int(math.floor(math.log2(n_head)))
        slopes = powers_of_two(lower) + powers_of_two(2 * lower)[0::2][: n_head - lower]
    return np.asarray(slopes, dtype=dtype)
