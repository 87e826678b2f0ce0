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


def adamw_step_multi(params, grads, ms, vs, *, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                     step, grad_scale=1.0):
    """adamw_step on each tensor, its gradient multiplied by grad_scale (not modified); weight_decay
    is one number or one per tensor."""
    params, grads, ms, vs = list(params), list(grads), list(ms), list(vs)
    decays = [weight_decay] * len(params) if np.isscalar(weight_decay) else list(weight_decay)
    if not len(grads) == len(ms) == len(vs) == len(decays) == len(params):
        raise ValueError("params, grads, ms, vs, weight_decay: expected one entry per tensor")
    for param, grad, m, v, decay in zip(params, grads, ms, vs, decays):
        adamw_step(param, grad * grad.dtype.type(grad_scale), m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                   weight_decay=decay, step=step)


def global_norm(arrays) -> float:
    """sqrt of the sum of x^2 over every element of every array, in float64."""
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, dtype=np.float64))) for a in arrays)))
