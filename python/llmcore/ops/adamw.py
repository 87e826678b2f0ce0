"""AdamW, one fused in-place step: csrc/adamw.cpp."""
from __future__ import annotations

import numbers

from . import _checks as chk


def _beta(name, value):
    value = chk.positive_float(name, value, allow_zero=True)
    if value >= 1:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value}")
    return value


def adamw_step(param, grad, m, v, *, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step):
    """Updates param, m and v in place, like torch.optim.AdamW; `step` counts from 1.

    param, m and v must be C-contiguous, writeable float32 arrays of one shape; grad has it too.
    """
    param = chk.writable_float_array("param", param)
    m = chk.writable_float_array("m", m, param.shape)
    v = chk.writable_float_array("v", v, param.shape)
    grad = chk.float_array("grad", grad)
    chk.same_shape("grad", grad, param.shape, "param's shape")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step: expected an int, got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step: expected a count starting at 1, got {step}")
    lr = chk.positive_float("lr", lr, allow_zero=True)
    eps = chk.positive_float("eps", eps, allow_zero=True)
    weight_decay = chk.positive_float("weight_decay", weight_decay, allow_zero=True)
    chk.backend(param).adamw_step(param, grad, m, v, lr, _beta("beta1", beta1), _beta("beta2", beta2),
                                  eps, weight_decay, int(step))
