"""One AdamW step in NumPy, in place (torch.optim.AdamW semantics, decoupled weight decay)."""
from __future__ import annotations

import numpy as np


def adamw_step(param, grad, m, v, *, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step):
    """Updates param, m and v in place; `step` counts from 1."""
    param *= 1 - lr * weight_decay
    m *= beta1
    m += (1 - beta1) * grad
    v *= beta2
    v += (1 - beta2) * grad * grad
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = np.sqrt(v) / np.sqrt(bias_correction2) + eps
    param -= (lr / bias_correction1) * m / denom
