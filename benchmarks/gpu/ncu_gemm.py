"""The GEMMs Nsight Compute profiles (benchmarks/gpu/h100_run.sh ncu): llmcore's TF32 kernel at
GPT-2's c_fc shape and at 4096^3, once each after a warm-up."""
import cupy as cp

from llmcore import ops

ops.set_matmul_precision("high")
for M, N, K in ((8192, 3072, 768), (4096, 4096, 4096), (768, 768, 8192)):
    x = cp.random.standard_normal((M, K), dtype=cp.float32)
    w = cp.random.standard_normal((N, K), dtype=cp.float32)
    ops.linear(x, w)
    cp.cuda.runtime.deviceSynchronize()
