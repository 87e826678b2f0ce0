"""Embedding lookup and its gradient, in NumPy."""
from __future__ import annotations

import numpy as np


def embedding(weight, ids):
    """weight (V, C) gathered at ids (any shape) -> ids.shape + (C,)."""
    return weight[ids]


def embedding_backward(dout, ids, vocab_size):
    """dweight (V, C): the rows of dout summed into the rows their ids name."""
    C = dout.shape[-1]
    dweight = np.zeros((vocab_size, C), dtype=dout.dtype)
    np.add.at(dweight, ids.reshape(-1), dout.reshape(ids.size, C))  # (n, C)
    return dweight
