"""Positional encodings: RoPE, sinusoidal tables and ALiBi slopes.

RoPE on float32 NumPy arrays runs in the CPU core (csrc/rope.cpp: one threaded pass through the
strides of the fused QKV buffer); on CuPy and float64 arrays it is one complex multiply, which is
also its specification. The tables are built on the host in float64 and moved to the model's
device. Learned positions are an ordinary embedding table (model.py), and ALiBi is a bias the
attention kernel adds itself; only its per-head slopes are computed here.
"""
from __future__ import annotations

import math

import numpy as np

from . import _cpu
from .ops._checks import array_module


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
# single vectorised ufunc call on any array module. On the CPU the compiled kernel does the same
# arithmetic in one threaded pass: in a training step of the cpu-small model (B=16, T=128, 8 heads
# of 64 rotated) the NumPy form took 11 ms of a 214 ms step on 2 cores.

def _complex_view(a, cdtype):
    """a (..., D) float, last axis contiguous -> (..., D/2) complex sharing a's memory.

    NumPy views any such array; CuPy's .view only C-contiguous ones, so a strided CuPy slice (q and
    k inside the fused QKV buffer) is wrapped around the same memory with the same outer strides.
    Every offset is a multiple of 2 floats (D is even), so the complex elements stay aligned."""
    if a.flags.c_contiguous or isinstance(a, np.ndarray):
        return a.view(cdtype)
    if a.strides[-1] != a.itemsize:
        raise ValueError(f"RoPE needs the last axis contiguous, got strides {a.strides}")
    xp = array_module(a)
    return xp.ndarray(a.shape[:-1] + (a.shape[-1] // 2,), dtype=cdtype, memptr=a.data,
                      strides=a.strides[:-1] + (np.dtype(cdtype).itemsize,))


def _rotate(x, rot, out, conjugate):
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and rot.dtype == np.complex64:
        return _cpu.rope(x, rot, out, conjugate)
    xp = array_module(x)
    xp.multiply(_complex_view(x, rot.dtype), (rot.conj() if conjugate else rot)[None, :, None, :],
                out=_complex_view(out, rot.dtype))
    return out


def rope_forward(x, rot, out):
    """Rotates the pairs (x[..., 2i], x[..., 2i+1]) of x (B, T, H, D) by rot (T, D/2), the rows of
    rope_tables for the positions of x's T tokens. Writes into `out` (B, T, H, D), which may be a
    slice of a larger buffer (last axis contiguous), and returns it. NumPy or CuPy arrays."""
    return _rotate(x, rot, out, conjugate=False)


def rope_backward(dy, rot, out):
    """The gradient through rope_forward: the rotation by the opposite angles (its transpose)."""
    return _rotate(dy, rot, out, conjugate=True)


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
