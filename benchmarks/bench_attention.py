"""attention and attention_backward, causal: ours (the fused kernel) vs NumPy (materialised
scores, BLAS matmuls) vs torch's scaled_dot_product_attention on the CPU.

One benchmark per (shape, implementation), grouped as attention/{fwd,bwd}/B.. H.. T.. D..:
training shapes of the goal model (B4 H8 T512 D64), GPT-2 and the char model, and one GQA decoding
step against a KV cache (forward only). Shapes: llmcore.bench.SHAPES (QUICK_SHAPES with
LLMCORE_BENCH_QUICK=1); conftest.py checks each against the NumPy reference, then times it.
FLOPs count visible query/key pairs only (4 D forward, 10 D backward per pair).
"""
STEMS = ("attention",)


def test_attention(case, impl, timed):
    timed(case, impl)
