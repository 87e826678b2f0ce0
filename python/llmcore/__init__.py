"""llmcore: a compiled core (C++ and CUDA kernels) for training transformers from first principles.

    import numpy as np, llmcore
    x = np.random.randn(8, 64).astype(np.float32)
    y = llmcore.ops.softmax(x)            # the compiled kernel
    r = llmcore.reference.softmax(x)      # the NumPy specification it is tested against
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

from . import ops, reference
from ._backend import cuda_available
from ._runtime import (empty_cache, get_num_threads, info, memory_stats, set_memory_limit, set_num_threads,
                       set_simd, simd)

try:
    __version__ = _version("llmcore")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0+unknown"

__all__ = [
    "ops", "reference", "cuda_available", "info", "get_num_threads", "set_num_threads",
    "simd", "set_simd", "memory_stats", "set_memory_limit", "empty_cache", "__version__",
]
