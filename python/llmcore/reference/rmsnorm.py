"""RMSNorm over the last axis, in NumPy: y = x / sqrt(mean(x^2) + eps) * weight."""
from __future__ import annotations

import numpy as np


def rmsnorm(x, weight, eps=1e-5):
    """(y, rstd); rstd has x's shape without its last axis."""
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1) + eps)
    return x * rstd[..., None] * weight, rstd.astype(x.dtype)


def rmsnorm_backward(dy, x, weight, rstd, residual=None):
    """(dx, dweight); dx plus residual (the gradient around the norm) when given."""
    r = rstd[..., None]
    g = dy * weight
    dx = r * g - x * r**3 * (g * x).mean(axis=-1, keepdims=True)
    dweight = (dy * x * r).reshape(-1, x.shape[-1]).sum(axis=0)
    return (dx if residual is None else dx + residual), dweight
