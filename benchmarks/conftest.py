"""What every benchmarks/bench_<op>.py shares.

A bench file names the operation stems it covers (STEMS) and has one test taking `case` and `impl`;
pytest_generate_tests below makes one test per (case, impl) from llmcore.bench's registry, so the
shapes, inputs, FLOP and byte counts are the ones `llmcore bench` uses. The `timed` fixture checks
the implementation against the NumPy reference, then times it with pytest-benchmark in the group
op/direction/shape, so ours, numpy and torch of one case sit side by side in the report.

LLMCORE_BENCH_QUICK=1 switches to the quick shapes (about a minute for the directory, not 2.5).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

import llmcore
from llmcore import bench

QUICK = os.environ.get("LLMCORE_BENCH_QUICK", "") not in ("", "0")
IMPLS = ("ours", "numpy", "torch")


def pytest_collect_file(file_path, parent):
    """Collects bench_*.py here without touching the project's pytest settings (which collect
    test_*.py under tests/ only, so `pytest` alone never runs these)."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):  # a file named on the command line is collected anyway
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if {"case", "impl"} <= set(metafunc.fixturenames):
        stems = getattr(metafunc.module, "STEMS")
        params = [pytest.param(case, impl, id=f"{case.group}/{impl}")
                  for stem in stems for case in bench.cases(stem, QUICK) for impl in IMPLS]
        metafunc.parametrize(("case", "impl"), params)


@pytest.fixture(scope="session")
def torch_module():
    """PyTorch with llmcore's thread count, or None when it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(llmcore.get_num_threads())
    return torch


def _copies(args):
    return tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args)


def _plan(fn, min_sample_s=1e-3, budget_s=0.4):
    """pytest-benchmark rounds and iterations from one timed call: samples of >= min_sample_s
    (timer resolution), 3 to 20 rounds, about budget_s per benchmark so the directory stays quick."""
    t0 = time.perf_counter()
    fn()
    t = max(time.perf_counter() - t0, 1e-9)
    iterations = max(1, int(min_sample_s / t))
    rounds = min(20, max(3, int(budget_s / (t * iterations))))
    return rounds, iterations


@pytest.fixture
def timed(benchmark, torch_module):
    """timed(case, impl): checks `impl` ("ours", "numpy" or "torch") against the reference, then
    benchmarks it. A wrong result fails the test before anything is timed."""
    def run(case: bench.Case, impl: str):
        args = case.make(np.random.default_rng(0))
        want = case.ref(*(_copies(args) if case.inplace else args))
        if impl == "ours":
            got = case.ours(*(_copies(args) if case.inplace else args))
            fn = lambda: case.ours(*args)  # noqa: E731
        elif impl == "numpy":
            got, fn = want, (lambda: case.ref(*args))
        else:
            if torch_module is None:
                pytest.skip("torch is not installed")
            if case.torch is None:
                pytest.skip(f"{case.op} has no PyTorch equivalent")
            fn = case.torch(torch_module, *(_copies(args) if case.inplace else args))
            got = fn()
        err = bench.rel_error(got, want)
        assert err <= bench.TOLERANCE, f"{case.group} {impl}: rel error {err:.2e} > {bench.TOLERANCE:.0e}"

        benchmark.group = case.group
        benchmark.extra_info.update(
            op=case.op, direction=case.direction, model=case.shape.model, what=case.shape.what,
            impl=impl, flops=case.flops, bytes=case.nbytes, rel_err=err,
            threads=llmcore.get_num_threads(), simd=llmcore.simd())
        time.sleep(bench.PAUSE_S)  # let the previous test's BLAS threads stop spinning (see llmcore.bench)
        rounds, iterations = _plan(fn)
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
        if benchmark.stats is None:  # --benchmark-disable: the correctness check above was the test
            return
        # GFLOP/s or GB/s from the median, so --benchmark-json carries the rate without a calculator
        median = benchmark.stats.stats.median
        if case.flops:
            benchmark.extra_info["gflops"] = case.flops / median / 1e9
        else:
            benchmark.extra_info["gbs"] = case.nbytes / median / 1e9
    return run
