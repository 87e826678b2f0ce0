"""matmul and linear in NumPy: the specification of csrc/matmul.cpp."""
from __future__ import annotations

import numpy as np


def _t(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def matmul(a, b, *, transpose_a=False, transpose_b=False):
    """a @ b over the last two axes; leading batch dims of `a` (and of `b` where it has them)."""
    return np.matmul(_t(a) if transpose_a else a, _t(b) if transpose_b else b)


def linear(x, weight, bias=None, residual=None):
    """x (..., in) @ weight (out, in).T + bias (out,) + residual (..., out)."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y + residual if residual is not None else y


def linear_backward(dy, x, weight, *, has_bias=False, dweight=None, dbias=None):
    """(dx, dweight, dbias or None) for y = linear(x, weight, bias); given dweight (and dbias),
    the gradients are added into them and they are returned."""
    rows = int(np.prod(x.shape[:-1]))  # (not -1: a reshape cannot infer it when a size is 0)
    dy2 = dy.reshape(rows, dy.shape[-1])  # (rows, out)
    x2 = x.reshape(rows, x.shape[-1])  # (rows, in)
    dx = dy @ weight  # (..., in)
    dw = dy2.T @ x2  # (out, in)
    db = dy2.sum(axis=0) if has_bias else None
    if dweight is None:
        return dx, dw, db
    dweight += dw
    if db is not None:
        dbias += db
    return dx, dweight, dbias
