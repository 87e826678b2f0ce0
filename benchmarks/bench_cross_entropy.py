"""cross_entropy and cross_entropy_backward: ours vs NumPy vs F.cross_entropy(reduction="none").

One benchmark per (shape, implementation), grouped as cross_entropy/{fwd,bwd}/NxV.
Shapes: llmcore.bench.SHAPES (QUICK_SHAPES with LLMCORE_BENCH_QUICK=1);
conftest.py checks each against the NumPy reference, then times it.
"""
STEMS = ("cross_entropy",)


def test_cross_entropy(case, impl, timed):
    timed(case, impl)
