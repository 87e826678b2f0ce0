"""Input validation shared by every public operation, for NumPy and CuPy arrays alike.

Each check names the argument, says what was expected and what came, and raises TypeError for a
wrong array type or dtype, ValueError for wrong shapes or values (DESIGN.md, "Conventions").
The compiled entry points check again (they must never read out of bounds when called directly),
but the messages users see come from here.
"""
from __future__ import annotations

import numbers

import numpy as np

from .._backend import backend_for, is_cupy


def is_array(x) -> bool:
    return isinstance(x, np.ndarray) or is_cupy(x)


def array_module(x):
    """numpy or cupy: the module that made `x`."""
    if is_cupy(x):
        import cupy

        return cupy
    return np


def _describe(x) -> str:
    if is_array(x):
        return f"a {x.dtype} array of shape {x.shape}"
    return f"{type(x).__module__}.{type(x).__qualname__}"


def float_array(name: str, x, ndim=None, *, contiguous: bool = True):
    """Checks that `x` is a float32 NumPy or CuPy array (of `ndim` dims, an int or a (min, max)
    range). Returns `x`, made C-contiguous when `contiguous` (a copy only if it was not).
    """
    if not is_array(x):
        raise TypeError(f"{name}: expected a numpy.ndarray (or cupy.ndarray) of float32, got {_describe(x)}")
    if x.dtype != np.float32:
        hint = " (convert with .astype(np.float32))" if x.dtype.kind in "fiub" else ""
        raise TypeError(f"{name}: expected dtype float32, got {x.dtype}{hint}")
    if ndim is not None:
        lo, hi = (ndim, ndim) if isinstance(ndim, int) else ndim
        if not lo <= x.ndim <= (hi if hi is not None else x.ndim):
            want = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            raise ValueError(f"{name}: expected {want} dimensions, got shape {x.shape}")
    # (not np.ascontiguousarray, which turns a 0-d array into a 1-d one)
    return x.copy(order="C") if contiguous and not x.flags.c_contiguous else x


def int_array(name: str, x):
    """Checks that `x` is an integer array; returns it as C-contiguous int64."""
    if not is_array(x):
        raise TypeError(f"{name}: expected a numpy.ndarray (or cupy.ndarray) of integers, got {_describe(x)}")
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer dtype, got {x.dtype}")
    if is_cupy(x):
        return x.astype(np.int64, order="C", copy=False)
    return np.asarray(x, dtype=np.int64, order="C")  # keeps 0-d ids 0-d


def writable_float_array(name: str, x, shape=None):
    """Checks an array that an operation updates in place: float32, C-contiguous, writeable."""
    float_array(name, x, contiguous=False)
    if not x.flags.c_contiguous:
        raise ValueError(f"{name}: updated in place, so it must be C-contiguous (got strides {x.strides})")
    if not is_cupy(x) and not x.flags.writeable:  # (CuPy arrays are always writeable)
        raise ValueError(f"{name}: updated in place, so it must be writeable")
    if shape is not None:
        same_shape(name, x, shape)
    return x


def same_shape(name: str, x, shape, what: str = "") -> None:
    shape = tuple(shape)
    if x.shape != shape:
        why = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {shape}{why}, got {x.shape}")


def optional_float_array(name: str, x, shape, what: str = ""):
    """None, or a float32 array of `shape`, made C-contiguous (an optional input like a residual)."""
    if x is None:
        return None
    x = float_array(name, x)
    same_shape(name, x, shape, what)
    return x


def with_residual(kernel, args, residual):
    """kernel(*args, residual): the compiled CPU core adds the residual as it writes its output.
    The CUDA core takes no residual argument, so on CuPy it is added to the result (the first
    array of a tuple) afterwards."""
    if residual is None:
        return kernel(*args)
    if not is_cupy(residual):
        return kernel(*args, residual)
    result = kernel(*args)
    first = result[0] if isinstance(result, tuple) else result
    first += residual
    return result


def nonempty_last_axis(name: str, x) -> None:
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: the last axis is reduced over, so it must not be empty (shape {x.shape})")


def positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {_describe(value)}")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        want = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{name}: expected {want}, got {value}")
    return value


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {sorted(options)}, got {value!r}")
    return value


def first_true(mask) -> int:
    """The flat index of the first True in a NumPy or CuPy boolean array."""
    return int(mask.reshape(-1).argmax())


def backend(*arrays):
    """The compiled module for these arrays: llmcore._cpu (NumPy) or llmcore._cuda (CuPy)."""
    return backend_for(arrays)
