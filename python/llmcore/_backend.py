"""Which compiled module runs an operation: llmcore._cpu for NumPy arrays, llmcore._cuda for CuPy.

Importing llmcore never needs CUDA: _cuda is imported lazily, the first time a CuPy array arrives.
"""
from __future__ import annotations


from . import _cpu

_cuda_module = None
_cuda_error: str | None = None


def _load_cuda():
    global _cuda_module, _cuda_error
    if _cuda_module is None and _cuda_error is None:
        try:
            from . import _cuda  # noqa: F401  (built only where a CUDA compiler was found)

            _cuda_module = _cuda
        except ImportError as exc:
            _cuda_error = f"llmcore was built without its CUDA core ({exc})"
    return _cuda_module


def cuda_available() -> bool:
    """True when the CUDA core was built and a GPU is visible."""
    mod = _load_cuda()
    if mod is None:
        return False
    try:
        return mod.device_count() > 0
    except Exception:  # a driver that is missing or too old: CUDA is simply not available
        return False


def is_cupy(x) -> bool:
    """True for a CuPy array (checked without importing CuPy)."""
    return type(x).__module__.startswith("cupy") and hasattr(x, "__cuda_array_interface__")


def backend_for(arrays):
    """The compiled module for a set of arrays, which must all live on the same device."""
    on_gpu = [is_cupy(a) for a in arrays]
    if not any(on_gpu):
        return _cpu
    if not all(on_gpu):
        raise TypeError("arrays must all be NumPy (CPU) or all CuPy (GPU), not a mix")
    mod = _load_cuda()
    if mod is None or not cuda_available():
        raise RuntimeError(
            "a CuPy array was passed but CUDA is not available: "
            + (_cuda_error or "no GPU is visible to the CUDA core")
        )
    return mod


