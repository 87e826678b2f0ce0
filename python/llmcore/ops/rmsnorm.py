"""RMSNorm over the last axis and its backward: csrc/rmsnorm.cpp."""
from __future__ import annotations

from . import _checks as chk


def _check_x_weight(x, weight):
    x = chk.float_array("x", x, (1, None))
    chk.nonempty_last_axis("x", x)
    weight = chk.float_array("weight", weight, 1)
    chk.same_shape("weight", weight, x.shape[-1:], "x's last axis")
    return x, weight


def rmsnorm(x, weight, eps: float = 1e-5):
    """(y, rstd): y = x * rstd * weight, rstd = 1/sqrt(mean(x^2) + eps) of shape x.shape[:-1]."""
    x, weight = _check_x_weight(x, weight)
    eps = chk.positive_float("eps", eps, allow_zero=True)
    return chk.backend(x, weight).rmsnorm_forward(x, weight, eps)


def rmsnorm_backward(dy, x, weight, rstd, residual=None):
    """(dx, dweight) for y = rmsnorm(x, weight)[0], given the forward's rstd.

    residual (x's shape), if given, is added to dx: the gradient that reaches x around the norm,
    through a skip connection (x + f(rmsnorm(x))), summed in the same pass.
    """
    x, weight = _check_x_weight(x, weight)
    dy = chk.float_array("dy", dy)
    chk.same_shape("dy", dy, x.shape, "x's shape")
    rstd = chk.float_array("rstd", rstd)
    chk.same_shape("rstd", rstd, x.shape[:-1], "x's shape without its last axis")
    residual = chk.optional_float_array("residual", residual, x.shape, "x's shape")
    mod = chk.backend(*(a for a in (dy, x, weight, rstd, residual) if a is not None))
    return chk.with_residual(mod.rmsnorm_backward, (dy, x, weight, rstd), residual)
