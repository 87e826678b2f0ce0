"""Fused, numerically stable cross-entropy and its backward: csrc/cross_entropy.cpp."""
from __future__ import annotations

import numbers

from . import _checks as chk


def _check(logits, targets, ignore_index):
    logits = chk.float_array("logits", logits, 2)
    chk.nonempty_last_axis("logits", logits)
    targets = chk.int_array("targets", targets)
    chk.same_shape("targets", targets, logits.shape[:1], "one target per row of logits")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    V = logits.shape[1]
    # (CuPy targets are checked on the device by llmcore._cuda: one wait instead of two)
    bad = None if chk.is_cupy(targets) else (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad is not None and bad.any():
        i = chk.first_true(bad)
        raise ValueError(f"targets: value {int(targets[i])} at index {i} is outside [0, {V}) "
                         f"and is not ignore_index ({ignore_index})")
    return logits, targets, int(ignore_index)


def cross_entropy(logits, targets, *, ignore_index: int = -100):
    """(loss, lse) per row of logits (N, V) for integer targets (N,); ignored rows have loss 0."""
    logits, targets, ignore_index = _check(logits, targets, ignore_index)
    return chk.backend(logits).cross_entropy_forward(logits, targets, ignore_index)


def cross_entropy_backward(dloss, logits, targets, lse, *, ignore_index: int = -100):
    """dlogits = dloss[:, None] * (softmax(logits) - onehot(targets)), given the forward's lse."""
    logits, targets, ignore_index = _check(logits, targets, ignore_index)
    dloss = chk.float_array("dloss", dloss)
    chk.same_shape("dloss", dloss, logits.shape[:1], "one value per row of logits")
    lse = chk.float_array("lse", lse)
    chk.same_shape("lse", lse, logits.shape[:1], "one value per row of logits")
    return chk.backend(dloss, logits, lse).cross_entropy_backward(dloss, logits, targets, lse, ignore_index)
