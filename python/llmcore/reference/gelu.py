"""GELU in NumPy: the tanh approximation (GPT-2's) and the exact erf form ("none")."""
from __future__ import annotations

import math

import numpy as np

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_COEFF = 0.044715
# math.erf is scalar; vectorise it once (NumPy has no erf of its own and SciPy is not required).
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _check(approximate):
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate: expected 'tanh' or 'none', got {approximate!r}")


def gelu(x, approximate="tanh"):
    _check(approximate)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + _COEFF * x**3)))
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(x.dtype)


def gelu_backward(dy, x, approximate="tanh"):
    _check(approximate)
    if approximate == "tanh":
        t = np.tanh(_SQRT_2_OVER_PI * (x + _COEFF * x**3))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _COEFF * x * x)
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
    cdf = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return (dy * (cdf + x * pdf)).astype(x.dtype)
