"""AdamW, the learning-rate schedule (linear warmup, cosine decay) and global-norm gradient clipping."""
from __future__ import annotations

import math

import numpy as np

from . import nn


class AdamW:
    """torch.optim.AdamW semantics: one fused llmcore adamw_step_multi call updates every parameter.

    Weight decay applies only to matrices (ndim >= 2: linear weights and embeddings); norm weights
    and biases are not decayed, as in GPT-2/nanoGPT.
    """

    def __init__(self, params: dict, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, backend=None):
        self.params = dict(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.be = nn.get_backend(backend or backend_for([p.data for p in self.params.values()]))
        xp = self.be.xp  # the moments live beside the parameters (on the GPU for "cuda")
        self.m = {k: xp.zeros_like(p.data) for k, p in self.params.items()}
        self.v = {k: xp.zeros_like(p.data) for k, p in self.params.items()}
        self.step_count = 0

    def step(self, lr=None, grad_scale=1.0):
        """One update with every parameter's current .grad times grad_scale (clip_scale's factor;
        the gradients are not modified). lr overrides self.lr, for schedules."""
        self.step_count += 1
        lr = self.lr if lr is None else lr
        # .grad is read afresh (a layer may hand in a new array); m and v were built in the
        # parameters' order.
        params = self.params.values()
        self.be.ops.adamw_step_multi(
            [p.data for p in params], [p.grad for p in params], list(self.m.values()),
            list(self.v.values()), lr=lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
            weight_decay=[self.weight_decay if p.data.ndim >= 2 else 0.0 for p in params],
            step=self.step_count, grad_scale=grad_scale)

    def state_arrays(self) -> dict:
        """The moments as flat name -> array on the backend's device (checkpoints copy them with
        be.to_host, for safetensors); the step count goes with the JSON."""
        out = {f"m.{k}": a for k, a in self.m.items()}
        out.update({f"v.{k}": a for k, a in self.v.items()})
        return out

    def load_state_arrays(self, arrays: dict, step_count: int):
        for k in self.params:
            for kind, store in (("m", self.m), ("v", self.v)):
                key = f"{kind}.{k}"
                if key not in arrays or arrays[key].shape != store[k].shape:
                    raise ValueError(f"optimizer state: {key!r} is missing or has the wrong shape")
                store[k][...] = self.be.to_device(arrays[key])  # host (safetensors) -> device
        self.step_count = int(step_count)


def lr_schedule(step: int, *, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate for update number `step` (0-based): linear warmup over `warmup` steps, then a
    cosine from max_lr down to min_lr at step `total`, and min_lr after it."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)  # 0 .. 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def backend_for(arrays) -> str:
    """The backend that updates these arrays when none is named, the same for AdamW and grad_norm:
    "cuda" for CuPy arrays, else the compiled core ("cpu") when all are float32 and the reference
    ("numpy") otherwise (float64)."""
    arrays = list(arrays)
    if any(nn.array_module(a) is not np for a in arrays):
        return "cuda"
    return "cpu" if all(a.dtype == np.float32 for a in arrays) else "numpy"


def grad_norm(params: dict, backend=None) -> float:
    """The global norm of every parameter's gradient (inf or NaN when one is not finite), through
    the backend's global_norm: on the compiled core one threaded pass on the CPU, one transfer from
    the GPU. backend: a name or nn.Backend (an optimizer's .be), by default backend_for(grads)."""
    grads = [p.grad for p in params.values()]
    return nn.get_backend(backend or backend_for(grads)).ops.global_norm(grads)


def clip_scale(norm: float, max_norm) -> float:
    """The factor global-norm clipping multiplies every gradient by: min(1, max_norm / norm), 1
    when max_norm is None or 0 (no clipping) or norm is not finite."""
    if max_norm is not None and max_norm > 0 and norm > max_norm and math.isfinite(norm):
        return max_norm / (norm + 1e-6)
    return 1.0


def clip_grad_norm(params: dict, max_norm: float) -> float:
    """Scales every gradient by clip_scale(norm, max_norm) in place; returns the norm before
    clipping. (The training step instead hands the factor to AdamW.step, which applies it as it
    reads each gradient: no pass of its own.)"""
    norm = grad_norm(params)
    scale = clip_scale(norm, max_norm)
    if scale != 1.0:
        for p in params.values():
            p.grad *= scale
    return norm
