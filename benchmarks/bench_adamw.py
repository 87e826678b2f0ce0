"""adamw_step, one in-place step: ours vs NumPy vs torch.optim.AdamW (fused where available).

One benchmark per (shape, implementation), grouped as adamw/step/N.
Shapes: llmcore.bench.SHAPES (QUICK_SHAPES with LLMCORE_BENCH_QUICK=1);
conftest.py checks each against the NumPy reference, then times it.
"""
STEMS = ("adamw",)


def test_adamw(case, impl, timed):
    timed(case, impl)
