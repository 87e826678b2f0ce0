"""LayerNorm over the last axis, in NumPy: y = (x - mean) / sqrt(var + eps) * weight + bias."""
from __future__ import annotations

import numpy as np


def layernorm(x, weight, bias, eps=1e-5):
    """(y, mean, rstd); mean and rstd have x's shape without its last axis."""
    mean = x.mean(axis=-1)
    xc = x - mean[..., None]
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1) + eps)
    return xc * rstd[..., None] * weight + bias, mean, rstd.astype(x.dtype)


def layernorm_backward(dy, x, weight, mean, rstd, residual=None):
    """(dx, dweight, dbias); dx plus residual (the gradient around the norm) when given."""
    r = rstd[..., None]
    xhat = (x - mean[..., None]) * r
    g = dy * weight
    dx = r * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    C = x.shape[-1]
    dweight = (dy * xhat).reshape(-1, C).sum(axis=0)
    dbias = dy.reshape(-1, C).sum(axis=0)
    return (dx if residual is None else dx + residual), dweight, dbias
