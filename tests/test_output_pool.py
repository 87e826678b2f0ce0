"""The output pool (csrc/output_pool.h): large kernel outputs reuse freed blocks, never alias live
arrays, and respect the cache limit."""
import numpy as np
import pytest

import llmcore
from llmcore import ops

ROWS, COLS = 1024, 512  # 2 MiB of float32: above the pool's 1 MiB threshold


@pytest.fixture
def fresh_pool():
    llmcore.empty_cache()
    yield
    llmcore.set_memory_limit(2048)
    llmcore.empty_cache()


def _x(seed=0):
    return np.random.default_rng(seed).standard_normal((ROWS, COLS), dtype=np.float32)


def test_freed_outputs_are_reused(fresh_pool):
    x = _x()
    before = llmcore.memory_stats()
    y = ops.softmax(x)
    del y
    after_first = llmcore.memory_stats()
    assert after_first["cached_bytes"] >= x.nbytes
    y = ops.softmax(x)
    after_second = llmcore.memory_stats()
    assert after_second["hits"] == before["hits"] + 1
    np.testing.assert_allclose(y, llmcore.reference.softmax(x), rtol=1e-5, atol=1e-7)


def test_live_outputs_never_share_memory(fresh_pool):
    x1, x2 = _x(1), _x(2)
    y1 = ops.softmax(x1)
    y2 = ops.softmax(x2)
    assert not np.shares_memory(y1, y2)
    y1_copy = y1.copy()
    y3 = ops.gelu(x2)  # must not land on y1's block while y1 is alive
    assert not np.shares_memory(y1, y3)
    np.testing.assert_array_equal(y1, y1_copy)


def test_outputs_are_ordinary_writeable_arrays(fresh_pool):
    y = ops.softmax(_x())
    assert y.flags.writeable and y.flags.c_contiguous and y.dtype == np.float32
    y[...] = 1.0  # the caller owns it
    view = y[::2]
    del y
    assert float(view.sum()) == view.size  # the block lives as long as any view of it


def test_limit_zero_turns_caching_off(fresh_pool):
    llmcore.set_memory_limit(0)
    y = ops.softmax(_x())
    del y
    assert llmcore.memory_stats()["cached_bytes"] == 0


def test_empty_cache_releases_cached_blocks(fresh_pool):
    y = ops.softmax(_x())
    del y
    assert llmcore.memory_stats()["cached_bytes"] > 0
    llmcore.empty_cache()
    assert llmcore.memory_stats()["cached_bytes"] == 0


def test_small_outputs_bypass_the_pool(fresh_pool):
    before = llmcore.memory_stats()
    ops.softmax(np.ones((4, 33), np.float32))
    after = llmcore.memory_stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_limit(bad):
    with pytest.raises(ValueError, match="megabytes"):
        llmcore.set_memory_limit(bad)
