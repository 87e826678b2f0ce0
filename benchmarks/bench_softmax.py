"""softmax and softmax_backward over attention-probability rows: ours vs NumPy vs torch.softmax.

One benchmark per (shape, implementation), grouped as softmax/{fwd,bwd}/ROWSxT.
Shapes: llmcore.bench.SHAPES (QUICK_SHAPES with LLMCORE_BENCH_QUICK=1);
conftest.py checks each against the NumPy reference, then times it.
"""
STEMS = ("softmax",)


def test_softmax(case, impl, timed):
    timed(case, impl)
