"""rmsnorm and rmsnorm_backward: ours vs NumPy vs F.rms_norm.

One benchmark per (shape, implementation), grouped as rmsnorm/{fwd,bwd}/ROWSxC.
Shapes: llmcore.bench.SHAPES (QUICK_SHAPES with LLMCORE_BENCH_QUICK=1);
conftest.py checks each against the NumPy reference, then times it.
"""
STEMS = ("rmsnorm",)


def test_rmsnorm(case, impl, timed):
    timed(case, impl)
