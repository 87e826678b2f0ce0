"""LayerNorm over the last axis and its backward: csrc/layernorm.cpp."""
from __future__ import annotations

from . import _checks as chk


def _check_x_params(x, weight, bias=None):
    x = chk.float_array("x", x, (1, None))
    chk.nonempty_last_axis("x", x)
    weight = chk.float_array("weight", weight, 1)
    chk.same_shape("weight", weight, x.shape[-1:], "x's last axis")
    if bias is not None:
        bias = chk.float_array("bias", bias, 1)
        chk.same_shape("bias", bias, x.shape[-1:], "x's last axis")
    return x, weight, bias


def layernorm(x, weight, bias, eps: float = 1e-5):
    """(y, mean, rstd): y = (x - mean) * rstd * weight + bias; mean, rstd of shape x.shape[:-1]."""
    x, weight, bias = _check_x_params(x, weight, bias)
    if bias is None:
        raise TypeError("bias: expected a float32 array of shape (C,), got None")
    eps = chk.positive_float("eps", eps, allow_zero=True)
    return chk.backend(x, weight, bias).layernorm_forward(x, weight, bias, eps)


def layernorm_backward(dy, x, weight, mean, rstd, residual=None):
    """(dx, dweight, dbias) for y = layernorm(x, weight, bias)[0], given the forward's mean, rstd.

    residual (x's shape), if given, is added to dx, as in rmsnorm_backward.
    """
    x, weight, _ = _check_x_params(x, weight)
    dy = chk.float_array("dy", dy)
    chk.same_shape("dy", dy, x.shape, "x's shape")
    mean = chk.float_array("mean", mean)
    chk.same_shape("mean", mean, x.shape[:-1], "x's shape without its last axis")
    rstd = chk.float_array("rstd", rstd)
    chk.same_shape("rstd", rstd, x.shape[:-1], "x's shape without its last axis")
    residual = chk.optional_float_array("residual", residual, x.shape, "x's shape")
    mod = chk.backend(*(a for a in (dy, x, weight, mean, rstd, residual) if a is not None))
    return chk.with_residual(mod.layernorm_backward, (dy, x, weight, mean, rstd), residual)
