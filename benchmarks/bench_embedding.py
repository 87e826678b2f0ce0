"""embedding and embedding_backward: ours vs NumPy (fancy indexing, np.add.at) vs F.embedding.

One benchmark per (shape, implementation), grouped as embedding/{fwd,bwd}/NxC of V.
Shapes: llmcore.bench.SHAPES (QUICK_SHAPES with LLMCORE_BENCH_QUICK=1);
conftest.py checks each against the NumPy reference, then times it.
"""
STEMS = ("embedding",)


def test_embedding(case, impl, timed):
    timed(case, impl)
