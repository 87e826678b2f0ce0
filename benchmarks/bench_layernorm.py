"""layernorm and layernorm_backward: ours vs NumPy vs F.layer_norm.

One benchmark per (shape, implementation), grouped as layernorm/{fwd,bwd}/ROWSxC.
Shapes: llmcore.bench.SHAPES (QUICK_SHAPES with LLMCORE_BENCH_QUICK=1);
conftest.py checks each against the NumPy reference, then times it.
"""
STEMS = ("layernorm",)


def test_layernorm(case, impl, timed):
    timed(case, impl)
