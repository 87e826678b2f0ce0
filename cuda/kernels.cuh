// The CUDA core's launchers: one group per operation file (cuda/<op>.cu), called by
// cuda/bindings.cpp.
//
// Conventions are the CPU core's (csrc/kernels.h): outputs first, then inputs, then saved
// activations, then sizes; float32 arrays, C-contiguous unless a stride says otherwise; int64
// sizes. In addition every launcher takes the stream to run on (CuPy's current stream) last,
// launches asynchronously and checks the launch (LLMCORE_CUDA_CHECK_LAUNCH() in common.cuh),
// throwing std::runtime_error on failure. Launchers never allocate device memory: CuPy owns it.
// A launcher that needs scratch space has a companion *_workspace_bytes() and takes a
// `void* workspace` of at least that many bytes (256-byte aligned, contents undefined).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../csrc/kernels.h"  // AttentionShape

namespace llmcore::cuda {

// How a matmul uses the tensor cores; chosen like torch.set_float32_matmul_precision.
//   FP32: exact float32 FMA on the CUDA cores ("highest").
//   TF32: tensor cores, operands rounded to TF32 (10-bit mantissa), fp32 accumulation ("high").
//   BF16: tensor cores, operands rounded to bfloat16 (7-bit mantissa), fp32 accumulation
//         ("medium"). Storage stays float32 in every mode: CuPy has no bfloat16 dtype, and
//         fp32 master weights need no second copy; operands are rounded as they are staged
//         into shared memory.
enum class MatmulPrecision { FP32, TF32, BF16 };

// ---- matmul.cu --------------------------------------------------------------------------
// C[b] (M,N) = op(A[b]) @ op(B[b]) (+ bias[N]) (+ C[b] if accumulate), for b < batch.
// op(A) is (M,K): A is stored (M,K) row-major, or (K,M) when trans_a. op(B) is (K,N): stored
// (K,N), or (N,K) when trans_b. Batch strides in elements; 0 shares one matrix across the
// batch. Any M, N, K >= 0 (K = 0 gives bias or zeros); pointers 4-byte aligned only.
// With a workspace of gemm_workspace_bytes(...) (0 when the shape gains nothing from it), a
// small output with a long K (a weight gradient: trans_a, not trans_b, batch 1) is split over K
// into partial products summed in a fixed order: deterministic, and the GPU fills.
size_t gemm_workspace_bytes(int64_t batch, int64_t M, int64_t N, int64_t K, bool trans_a,
                            bool trans_b);
void gemm(float* c, const float* a, const float* b, const float* bias, int64_t batch, int64_t M,
          int64_t N, int64_t K, bool trans_a, bool trans_b, int64_t batch_stride_a,
          int64_t batch_stride_b, int64_t batch_stride_c, bool accumulate,
          MatmulPrecision precision, void* workspace, size_t workspace_bytes,
          cudaStream_t stream);
// dbias[N] = sum over the M rows of dy (M,N); deterministic.
void bias_backward(float* dbias, const float* dy, int64_t M, int64_t N, cudaStream_t stream);

// ---- softmax.cu -------------------------------------------------------------------------
// Row-wise over the last axis of (rows, cols), cols >= 1.
void softmax_forward(float* y, const float* x, int64_t rows, int64_t cols, cudaStream_t stream);
void softmax_backward(float* dx, const float* dy, const float* y, int64_t rows, int64_t cols,
                      cudaStream_t stream);

// ---- rmsnorm.cu -------------------------------------------------------------------------
void rmsnorm_forward(float* y, float* rstd, const float* x, const float* weight, int64_t rows,
                     int64_t C, float eps, cudaStream_t stream);
size_t rmsnorm_backward_workspace_bytes(int64_t rows, int64_t C);
// dweight is overwritten (not accumulated); the sum over rows is deterministic.
void rmsnorm_backward(float* dx, float* dweight, const float* dy, const float* x,
                      const float* weight, const float* rstd, int64_t rows, int64_t C,
                      void* workspace, cudaStream_t stream);

// ---- layernorm.cu -----------------------------------------------------------------------
void layernorm_forward(float* y, float* mean, float* rstd, const float* x, const float* weight,
                       const float* bias, int64_t rows, int64_t C, float eps,
                       cudaStream_t stream);
size_t layernorm_backward_workspace_bytes(int64_t rows, int64_t C);
void layernorm_backward(float* dx, float* dweight, float* dbias, const float* dy, const float* x,
                        const float* weight, const float* mean, const float* rstd, int64_t rows,
                        int64_t C, void* workspace, cudaStream_t stream);

// ---- gelu.cu ----------------------------------------------------------------------------
// approximate_tanh: 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))); otherwise 0.5x(1+erf(x/sqrt2)).
void gelu_forward(float* y, const float* x, int64_t n, bool approximate_tanh,
                  cudaStream_t stream);
void gelu_backward(float* dx, const float* dy, const float* x, int64_t n, bool approximate_tanh,
                   cudaStream_t stream);

// ---- cross_entropy.cu -------------------------------------------------------------------
// loss[n] = lse[n] - logits[n, targets[n]]; rows whose target is ignore_index get loss 0 (lse
// is still written). Targets are already checked to lie in [0, V) or equal ignore_index.
void cross_entropy_forward(float* loss, float* lse, const float* logits, const int64_t* targets,
                           int64_t N, int64_t V, int64_t ignore_index, cudaStream_t stream);
// dlogits[n, j] = dloss[n] * (softmax(logits[n])[j] - [j == targets[n]]); 0 for ignored rows.
void cross_entropy_backward(float* dlogits, const float* dloss, const float* logits,
                            const int64_t* targets, const float* lse, int64_t N, int64_t V,
                            int64_t ignore_index, cudaStream_t stream);

// ---- embedding.cu -----------------------------------------------------------------------
// out[i] = weight[ids[i]]; ids already checked to lie in [0, V).
void embedding_forward(float* out, const float* weight, const int64_t* ids, int64_t n_ids,
                       int64_t C, cudaStream_t stream);
size_t embedding_backward_workspace_bytes(int64_t n_ids, int64_t V, int64_t C);
// dweight (V,C) = 0, then dweight[ids[i]] += dout[i]; deterministic (no float atomics).
void embedding_backward(float* dweight, const float* dout, const int64_t* ids, int64_t n_ids,
                        int64_t V, int64_t C, void* workspace, cudaStream_t stream);

// ---- adamw.cu ---------------------------------------------------------------------------
// One AdamW step in place (torch.optim.AdamW semantics); step counts from 1.
void adamw_step(float* param, float* m, float* v, const float* grad, int64_t n, float lr,
                float beta1, float beta2, float eps, float weight_decay, int64_t step,
                cudaStream_t stream);

// ---- attention.cu -----------------------------------------------------------------------
// Shapes and strides as in csrc/kernels.h (AttentionShape): q (B,T,H,D), k and v (B,S,Hkv,D)
// with element strides (batch, seq, head) and a contiguous last axis; out (B,T,H,D) and
// lse (B,H,T) contiguous. With causal and S > T, query i sits at key position S - T + i.
// alibi_slopes is null or (H,). Every D from 1 to 256 is supported.
size_t attention_forward_workspace_bytes(const AttentionShape& shape);
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const AttentionShape& shape, bool causal, float scale,
                       const float* alibi_slopes, void* workspace, cudaStream_t stream);
// dout and out contiguous (B,T,H,D); dq (B,T,H,D), dk and dv (B,S,Hkv,D) contiguous and fully
// overwritten. GQA: dk/dv are summed over the heads sharing a K/V head inside the kernel.
size_t attention_backward_workspace_bytes(const AttentionShape& shape);
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                        const float* k, const float* v, const float* out, const float* lse,
                        const AttentionShape& shape, bool causal, float scale,
                        const float* alibi_slopes, void* workspace, cudaStream_t stream);

// ---- checks.cu --------------------------------------------------------------------------
// The flat index of the first id outside [0, limit) that is not `except` (pass
// has_except=false for none), or -1. Synchronises `stream` to read the answer back.
int64_t first_id_out_of_range(const int64_t* ids, int64_t n, int64_t limit, bool has_except,
                              int64_t except, void* workspace /* >= 8 bytes */,
                              cudaStream_t stream);

}  // namespace llmcore::cuda
