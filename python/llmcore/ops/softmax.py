"""softmax over the last axis and its backward: csrc/softmax.cpp."""
from __future__ import annotations

from . import _checks as chk


def softmax(x):
    """exp(x) / sum(exp(x)) over the last axis (max-subtracted, so large inputs are safe)."""
    x = chk.float_array("x", x, (1, None))
    return chk.backend(x).softmax_forward(x)


def softmax_backward(dy, y):
    """dx for y = softmax(x): y * (dy - sum(dy * y, axis=-1))."""
    y = chk.float_array("y", y, (1, None))
    dy = chk.float_array("dy", dy)
    chk.same_shape("dy", dy, y.shape, "y's shape")
    return chk.backend(dy, y).softmax_backward(dy, y)
