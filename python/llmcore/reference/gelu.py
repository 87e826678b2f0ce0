"""GELU in NumPy: the tanh approximation (GPT-2's) and the exact erf form ("none").

Both are written without the cancellation of their textbook forms for negative x, where
1 + tanh(u) and 1 + erf(x / sqrt 2) are differences of nearly equal numbers: at x = -7.9 the erf
form in float64 was 0.6% off (-1.3120e-14 against the true -1.3043e-14), and the tanh form is 0
where the true value is ~1e-20. Instead, with u = sqrt(2/pi) (x + 0.044715 x^3),
  tanh form: 0.5 (1 + tanh u) = s = sigmoid(2u) = 1 / (1 + exp(-2u)), 1 - tanh^2 u = 4 s (1 - s);
  erf form:  Phi(x) = erfc(-x / sqrt 2) / 2.
The compiled kernels use the same forms (csrc/gelu.cpp).
"""
from __future__ import annotations

import math

import numpy as np

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_COEFF = 0.044715
# math.erfc is scalar; vectorise it once (NumPy has no erfc of its own and SciPy is not required).
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def _check(approximate):
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate: expected 'tanh' or 'none', got {approximate!r}")


def _two_u(x):
    """2u = 2 sqrt(2/pi) (x + 0.044715 x^3). x * x * x, not x**3: NumPy computes a power of a
    float32 array through powf element by element, 70x slower than two multiplies (98 ms against
    1.4 ms on 2048 x 1024, numpy 2.4), which had made this GELU most of the numpy backend's step."""
    return 2.0 * _SQRT_2_OVER_PI * (x + _COEFF * (x * x * x))


def _sigmoid(z):
    """1 / (1 + exp(-z)): exp overflows to inf for very negative z, giving the limit 0."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def _phi_cdf(x):
    """Phi(x), the standard normal CDF, in x's float dtype."""
    return (0.5 * _erfc(-x / math.sqrt(2.0))).astype(x.dtype)


def gelu(x, approximate="tanh"):
    _check(approximate)
    if approximate == "tanh":
        return x * _sigmoid(_two_u(x))
    return x * _phi_cdf(x)


def gelu_backward(dy, x, approximate="tanh"):
    _check(approximate)
    if approximate == "tanh":
        s = _sigmoid(_two_u(x))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _COEFF * x * x)
        # 1 - s only loses digits where s is near 1, and there s dominates the sum.
        return dy * (s + 2.0 * x * s * (1.0 - s) * du)
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return dy * (_phi_cdf(x) + x * pdf)
