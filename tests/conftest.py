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
