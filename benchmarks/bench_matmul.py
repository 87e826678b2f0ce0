"""matmul, linear and linear_backward: ours vs NumPy's BLAS vs torch.matmul / F.linear.

One benchmark per (shape, implementation), grouped as matmul/fwd/... and
linear/{fwd,bwd}/....
Shapes: llmcore.bench.SHAPES (QUICK_SHAPES with LLMCORE_BENCH_QUICK=1);
conftest.py checks each against the NumPy reference, then times it.
"""
STEMS = ("matmul", "linear")


def test_matmul(case, impl, timed):
    timed(case, impl)
