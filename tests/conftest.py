import zlib

import numpy as np
import pytest

import llmcore
from llmcore import _cpu


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: fresh inputs per test, reproducible per run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=list(_cpu.supported_simd()))
def simd(request):
    """Runs the test once per SIMD level this build and CPU support (generic, avx2, avx512)."""
    before = llmcore.simd()
    llmcore.set_simd(request.param)
    yield request.param
    llmcore.set_simd(before)


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = llmcore.get_num_threads()
    yield
    llmcore.set_num_threads(before)


@pytest.fixture
def one_thread():
    """For tiny models: they gain nothing from threads, and one thread is immune to the stalls two
    OpenMP threads suffer when another process holds a core of a 2-core machine."""
    before = llmcore.get_num_threads()
    llmcore.set_num_threads(1)
    yield
    llmcore.set_num_threads(before)


def _cuda_skip_reason():
    if not llmcore.cuda_available():
        info = llmcore.info()
        return ("no GPU visible to llmcore's CUDA core" if info["cuda_built"]
                else "llmcore was built without its CUDA core (no nvcc at build time)")
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install 'llmcore[cuda]')"
    return None


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, with the reason, where no GPU (or no CuPy) is at hand."""
    reason = None
    for item in items:
        if "cuda" in item.keywords:
            reason = reason or _cuda_skip_reason() or "available"
            if reason != "available":
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def cp():
    """CuPy, for tests marked `cuda` (they are skipped before this runs where there is no GPU)."""
    import cupy

    yield cupy
    cupy.cuda.Stream.null.synchronize()  # an asynchronous fault surfaces in the test that caused it
