"""Embedding lookup and its gradient: csrc/embedding.cpp."""
from __future__ import annotations

import numbers

from . import _checks as chk


def _check_ids(ids, vocab_size: int):
    ids = chk.int_array("ids", ids)
    if chk.is_cupy(ids):  # llmcore._cuda checks on the device (one wait instead of two)
        return ids
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        flat = chk.first_true(bad)
        raise ValueError(f"ids: value {int(ids.reshape(-1)[flat])} at flat index {flat} is outside [0, {vocab_size})")
    return ids


def embedding(weight, ids):
    """The rows of weight (V, C) at integer ids (any shape) -> ids.shape + (C,)."""
    weight = chk.float_array("weight", weight, 2)
    ids = _check_ids(ids, weight.shape[0])
    return chk.backend(weight).embedding_forward(weight, ids)


def embedding_backward(dout, ids, vocab_size: int):
    """dweight (vocab_size, C): each row of dout (ids.shape + (C,)) added into the row its id names."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size: expected an int, got {type(vocab_size).__name__}")
    if vocab_size < 0:
        raise ValueError(f"vocab_size: expected a number >= 0, got {vocab_size}")
    ids = _check_ids(ids, int(vocab_size))
    dout = chk.float_array("dout", dout, ids.ndim + 1)
    chk.same_shape("dout", dout, ids.shape + dout.shape[-1:], "ids' shape plus a channel axis")
    return chk.backend(dout).embedding_backward(dout, ids, int(vocab_size))
