"""RoPE in the CPU core (csrc/rope.cpp) against its specification, the float64 complex multiply of
llmcore.positions, on every SIMD level: plain and strided (fused QKV) views, in place, bad input."""
import numpy as np
import pytest

from llmcore import _cpu, positions
from helpers import assert_close, randn

TOL = 1e-6

# (B, T, H, D): batch 1, odd counts, D just around the vector widths (pairs of 4, 8, 16 floats)
SHAPES = [(1, 1, 1, 2), (2, 5, 3, 8), (1, 7, 2, 34), (3, 4, 5, 64), (2, 3, 1, 130)]


def _spec(x, T, D, conjugate):
    """The float64 complex multiply, on a copy."""
    rot = positions.rope_tables(T, D, dtype=np.float64)
    fn = positions.rope_backward if conjugate else positions.rope_forward
    x = np.asarray(x, np.float64)
    return fn(x, rot, out=np.empty_like(x))


@pytest.mark.parametrize("conjugate", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_the_complex_multiply(simd, rng, shape, conjugate):
    B, T, H, D = shape
    x = randn(rng, shape)
    rot = positions.rope_tables(T, D)
    fn = positions.rope_backward if conjugate else positions.rope_forward
    out = fn(x, rot, out=np.empty_like(x))
    assert_close(out, _spec(x, T, D, conjugate), TOL, "out")


def test_rope_through_fused_buffer_views(simd, rng):
    # q, k rotated out of a (B, T, H + 2 Hkv, D) buffer into a (B, T, H + Hkv, D) one, and the
    # gradients rotated back into slices of a fused gradient buffer: no copies anywhere.
    B, T, H, Hkv, D = 2, 9, 4, 2, 16
    qkv = randn(rng, (B, T, H + 2 * Hkv, D))
    rot = positions.rope_tables(T, D)
    qk = np.full((B, T, H + Hkv, D), np.nan, np.float32)
    positions.rope_forward(qkv[:, :, :H + Hkv], rot, out=qk)
    assert_close(qk, _spec(qkv[:, :, :H + Hkv], T, D, False), TOL, "qk")
    dqkv = np.zeros((B, T, H + 2 * Hkv, D), np.float32)
    dk = randn(rng, (B, T, Hkv, D))
    positions.rope_backward(dk, rot, out=dqkv[:, :, H:H + Hkv])
    assert_close(dqkv[:, :, H:H + Hkv], _spec(dk, T, D, True), TOL, "dk")
    assert not dqkv[:, :, :H].any() and not dqkv[:, :, H + Hkv:].any()  # nothing outside the slice


def test_rope_in_place_and_round_trip(rng):
    x = randn(rng, (2, 6, 3, 32))
    rot = positions.rope_tables(6, 32)
    y = x.copy()
    positions.rope_forward(y, rot, out=y)
    assert_close(y, _spec(x, 6, 32, False), TOL, "in place")
    positions.rope_backward(y, rot, out=y)  # the inverse rotation
    assert_close(y, x, TOL, "round trip")


def test_rope_bad_input(rng):
    x = randn(rng, (1, 4, 2, 8))
    rot = positions.rope_tables(4, 8)
    buf = randn(rng, (1, 4, 3, 8))
    with pytest.raises(ValueError, match="overlap"):
        _cpu.rope(buf[:, :, :2], rot, buf[:, :, 1:], False)  # shifted by one head
    with pytest.raises(ValueError, match="even"):
        _cpu.rope(randn(rng, (1, 4, 2, 7)), positions.rope_tables(4, 8)[:, :3].copy(), np.empty((1, 4, 2, 7), np.float32), False)
    with pytest.raises(TypeError, match="complex64"):
        _cpu.rope(x, rot.astype(np.complex128), np.empty_like(x), False)
    with pytest.raises(ValueError, match="rot"):
        _cpu.rope(x, positions.rope_tables(3, 8), np.empty_like(x), False)  # too few positions
    frozen = np.empty_like(x)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _cpu.rope(x, rot, frozen, False)
    with pytest.raises(ValueError, match="contiguous"):
        _cpu.rope(randn(rng, (1, 4, 2, 16))[..., ::2], rot, np.empty_like(x), False)
