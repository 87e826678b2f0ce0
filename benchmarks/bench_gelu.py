"""gelu and gelu_backward (tanh form, GPT-2's): ours vs NumPy vs F.gelu(approximate="tanh").

One benchmark per (shape, implementation), grouped as gelu/{fwd,bwd}/ROWSx4C.
Shapes: llmcore.bench.SHAPES (QUICK_SHAPES with LLMCORE_BENCH_QUICK=1);
conftest.py checks each against the NumPy reference, then times it.
"""
STEMS = ("gelu",)


def test_gelu(case, impl, timed):
    timed(case, impl)
