"""AdamW, one fused in-place step (one tensor, or every tensor of a model in one call), and the
global norm that gradient clipping divides by: csrc/adamw.cpp."""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _checks as chk


def _beta(name, value):
    value = chk.positive_float(name, value, allow_zero=True)
    if value >= 1:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value}")
    return value


def _step(step):
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step: expected an int, got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step: expected a count starting at 1, got {step}")
    return int(step)


def _tensor(param, grad, m, v, where=""):
    """One tensor's arrays, checked: param, m, v updated in place, grad of the same shape."""
    param = chk.writable_float_array(f"param{where}", param)
    m = chk.writable_float_array(f"m{where}", m, param.shape)
    v = chk.writable_float_array(f"v{where}", v, param.shape)
    grad = chk.float_array(f"grad{where}", grad)
    chk.same_shape(f"grad{where}", grad, param.shape, "param's shape")
    return param, grad, m, v


def adamw_step(param, grad, m, v, *, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step):
    """Updates param, m and v in place, like torch.optim.AdamW; `step` counts from 1.

    param, m and v must be C-contiguous, writeable float32 arrays of one shape; grad has it too.
    """
    param, grad, m, v = _tensor(param, grad, m, v)
    step = _step(step)
    lr = chk.positive_float("lr", lr, allow_zero=True)
    eps = chk.positive_float("eps", eps, allow_zero=True)
    weight_decay = chk.positive_float("weight_decay", weight_decay, allow_zero=True)
    chk.backend(param).adamw_step(param, grad, m, v, lr, _beta("beta1", beta1), _beta("beta2", beta2),
                                  eps, weight_decay, step)


def adamw_step_multi(params, grads, ms, vs, *, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                     step, grad_scale=1.0):
    """adamw_step on every tensor of the lists params, grads, ms, vs (one per parameter), with each
    gradient multiplied by grad_scale (global-norm clipping's factor) as it is read; the gradients
    themselves are not modified. weight_decay is one number for all or a sequence, one per tensor.

    On the CPU it is one call and one threaded pass over all of them (a model's 26 adamw_step calls
    each paid a return to Python and a thread barrier); with CuPy arrays it loops over the tensors.
    """
    params, grads, ms, vs = (list(x) for x in (params, grads, ms, vs))
    n = len(params)
    if not len(grads) == len(ms) == len(vs) == n:
        raise ValueError(f"params, grads, ms, vs: expected lists of one length, got {n}, {len(grads)}, "
                         f"{len(ms)}, {len(vs)}")
    decays = [weight_decay] * n if isinstance(weight_decay, numbers.Real) else list(weight_decay)
    if len(decays) != n:
        raise ValueError(f"weight_decay: expected one number or {n} (one per tensor), got {len(decays)}")
    decays = [chk.positive_float(f"weight_decay[{i}]", d, allow_zero=True) for i, d in enumerate(decays)]
    tensors = [_tensor(*t, where=f"[{i}]") for i, t in enumerate(zip(params, grads, ms, vs))]
    step = _step(step)
    lr = chk.positive_float("lr", lr, allow_zero=True)
    eps = chk.positive_float("eps", eps, allow_zero=True)
    grad_scale = chk.positive_float("grad_scale", grad_scale, allow_zero=True)
    beta1, beta2 = _beta("beta1", beta1), _beta("beta2", beta2)
    if n == 0:
        return
    mod = chk.backend(*(a for t in tensors for a in t))
    if chk.is_cupy(tensors[0][0]):  # the CUDA core has the one-tensor kernel
        for (param, grad, m, v), decay in zip(tensors, decays):
            g = grad if grad_scale == 1.0 else grad * np.float32(grad_scale)
            mod.adamw_step(param, g, m, v, lr, beta1, beta2, eps, decay, step)
        return
    params, grads, ms, vs = (list(x) for x in zip(*tensors))
    mod.adamw_step_multi(params, grads, ms, vs, lr, beta1, beta2, eps, decays, step, grad_scale)


def global_norm(arrays) -> float:
    """sqrt(sum of x^2 over every element of every array), accumulated in float64: the norm that
    global gradient clipping divides by. inf or NaN when an element is not finite.

    On the CPU one threaded pass over all the arrays, the same for any thread count; with CuPy
    arrays one reduction per array on the GPU and a single transfer of the total."""
    arrays = [chk.float_array(f"arrays[{i}]", a) for i, a in enumerate(arrays)]
    if not arrays:
        return 0.0
    if chk.is_cupy(arrays[0]):
        xp = chk.array_module(arrays[0])
        total = 0.0
        for a in arrays:  # squares and their sum in float64, as on the CPU
            total = total + xp.square(a, dtype=np.float64).sum()
        return math.sqrt(float(total))
    return math.sqrt(chk.backend(*arrays).sum_of_squares(arrays))
