"""Runtime settings of the CPU core: threads, the SIMD level and the output pool's limit, read from
the environment at import (LLMCORE_NUM_THREADS, LLMCORE_SIMD, LLMCORE_POOL_LIMIT_MB) and
changeable afterwards."""
from __future__ import annotations

import os
import platform

from . import _cpu
from ._backend import cuda_available


def get_num_threads() -> int:
    """OpenMP threads the CPU kernels use."""
    return _cpu.get_num_threads()


def set_num_threads(n: int) -> None:
    """Sets the OpenMP threads of the CPU kernels (results are deterministic for a given count)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    _cpu.set_num_threads(n)


def simd() -> str:
    """The instruction set of the CPU kernels in use: 'avx512', 'avx2' or 'generic'."""
    return _cpu.simd()


def set_simd(name: str) -> None:
    """Uses the kernels compiled for `name` (one of supported_simd()); for testing lower paths."""
    _cpu.set_simd(name)


def memory_stats() -> dict:
    """The output pool's counters: cached_bytes (free blocks kept for reuse), in_use_bytes (blocks
    held by live arrays), limit_bytes (the cap on cached_bytes), hits and misses (outputs served
    from the cache / by new memory). Kernel outputs of 1 MiB and more come from this pool."""
    return dict(_cpu.pool_stats())


def set_memory_limit(megabytes: int) -> None:
    """Caps the output pool's cached (free) memory; 0 turns caching off. Default 2048 MiB, or
    LLMCORE_POOL_LIMIT_MB."""
    if isinstance(megabytes, bool) or not isinstance(megabytes, int) or megabytes < 0:
        raise ValueError(f"megabytes: expected an int >= 0, got {megabytes!r}")
    _cpu.set_pool_limit(megabytes << 20)


def empty_cache() -> None:
    """Returns the output pool's cached blocks to the operating system (arrays in use are kept)."""
    _cpu.empty_cache()


def info() -> dict:
    """What this build is and what it chose on this machine."""
    from . import __version__

    return {
        "version": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "simd": simd(),
        "simd_supported": list(_cpu.supported_simd()),
        "openmp": bool(_cpu.openmp),
        "num_threads": get_num_threads(),
        "cpu_count": os.cpu_count(),
        "output_pool_limit_mb": memory_stats()["limit_bytes"] >> 20,
        **_cuda_info(),
    }


def _cuda_info() -> dict:
    """The CUDA core's build (architectures, runtime) and the GPUs it sees."""
    try:
        from . import _cuda
    except ImportError:
        return {"cuda_built": False, "cuda_available": False}
    build = _cuda.build_info()
    runtime = build["cuda_runtime_built"]
    out = {
        "cuda_built": True,
        "cuda_available": cuda_available(),
        "cuda_architectures": ["sm_" + a for a in build["architectures"].split(",")],
        "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
        "cuda_driver": (f"{build['driver'] // 1000}.{build['driver'] % 1000 // 10}"
                        if build["driver"] else "none"),
    }
    devices = []
    for i in range(_cuda.device_count()):
        p = _cuda.device_properties(i)
        devices.append(f"{i}: {p['name']}, compute capability {p['compute_capability'][0]}."
                       f"{p['compute_capability'][1]}, {p['multiprocessors']} SMs, "
                       f"{p['memory_bytes'] / 2**30:.1f} GiB")
    out["cuda_devices"] = devices
    if cuda_available():
        from .ops import get_matmul_precision

        out["matmul_precision"] = get_matmul_precision()
    return out


def _apply_environment() -> None:
    threads = os.environ.get("LLMCORE_NUM_THREADS")
    if threads:
        try:
            n = int(threads)
        except ValueError:
            raise ValueError(f"LLMCORE_NUM_THREADS: expected a positive integer, got {threads!r}") from None
        set_num_threads(n)
    limit = os.environ.get("LLMCORE_POOL_LIMIT_MB")
    if limit:
        try:
            set_memory_limit(int(limit))
        except ValueError:
            raise ValueError(f"LLMCORE_POOL_LIMIT_MB: expected an integer >= 0, got {limit!r}") from None
    level = os.environ.get("LLMCORE_SIMD")
    if level:
        try:
            set_simd(level)
        except ValueError as exc:
            raise ValueError(f"LLMCORE_SIMD: {exc}") from None


_apply_environment()
