"""Cross-entropy of logits (N, V) against integer targets (N,), in NumPy."""
from __future__ import annotations

import numpy as np


def cross_entropy(logits, targets, *, ignore_index=-100):
    """(loss per row, lse per row); rows whose target is ignore_index get loss 0."""
    mx = logits.max(axis=-1, keepdims=True)
    mx = np.where(np.isinf(mx), 0, mx)  # an all -inf row gives lse = -inf, not NaN
    lse = (mx + np.log(np.exp(logits - mx).sum(axis=-1, keepdims=True)))[:, 0]
    keep = targets != ignore_index
    safe = np.where(keep, targets, 0)
    picked = np.take_along_axis(logits, safe[:, None].astype(np.int64), axis=1)[:, 0]
    loss = np.where(keep, lse - picked, 0).astype(logits.dtype)
    return loss, lse.astype(logits.dtype)


def cross_entropy_backward(dloss, logits, targets, lse, *, ignore_index=-100):
    """dlogits = dloss * (softmax(logits) - onehot(targets)); 0 on ignored rows."""
    keep = targets != ignore_index
    d = np.exp(logits - lse[:, None])
    d[np.arange(len(targets))[keep], targets[keep]] -= 1
    return (d * np.where(keep, dloss, 0)[:, None]).astype(logits.dtype)
