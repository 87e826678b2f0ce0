// The kernel table: one signature per CPU kernel, and one table of pointers per instruction set.
//
// Conventions (llm.c's): outputs first, then inputs, then saved activations, then sizes.
// All arrays are float32 and C-contiguous unless a stride argument says otherwise; sizes are
// int64_t. Kernels never allocate output arrays and never touch Python: bindings.cpp checks
// the arrays, allocates the outputs and releases the GIL around the call.
#pragma once

#include <cstdint>

namespace llmcore {

// C[b] (M,N) = op(A[b]) @ op(B[b]) (+ bias[N]) (+ residual[b]) (+ C[b] if accumulate), for
// b < batch. op(A) is (M,K): A is stored (M,K) row-major, or (K,M) when trans_a. Likewise op(B)
// is (K,N), stored (N,K) when trans_b. residual is null or laid out as C (a skip connection added
// in the epilogue, so the sum needs no pass of its own). Batch strides are in elements; 0 shares
// one matrix across the batch.
using GemmFn = void(float* c, const float* a, const float* b, const float* bias,
                    const float* residual, int64_t batch, int64_t M, int64_t N, int64_t K,
                    bool trans_a, bool trans_b, int64_t batch_stride_a, int64_t batch_stride_b,
                    int64_t batch_stride_c, bool accumulate);
// dbias[N] (+)= sum over the M rows of dy (M,N): added to dbias when accumulate, else written.
using BiasBackwardFn = void(float* dbias, const float* dy, int64_t M, int64_t N, bool accumulate);

// Row-wise over the last axis of (rows, cols).
using SoftmaxForwardFn = void(float* y, const float* x, int64_t rows, int64_t cols);
using SoftmaxBackwardFn = void(float* dx, const float* dy, const float* y, int64_t rows,
                               int64_t cols);

using RmsnormForwardFn = void(float* y, float* rstd, const float* x, const float* weight,
                              int64_t rows, int64_t C, float eps);
// The norms' backward passes add `residual` (null, or (rows, C)) to dx: the gradient that reaches
// the norm's input through the skip connection around it, summed without a pass of its own.
using RmsnormBackwardFn = void(float* dx, float* dweight, const float* dy, const float* x,
                               const float* weight, const float* rstd, const float* residual,
                               int64_t rows, int64_t C);

using LayernormForwardFn = void(float* y, float* mean, float* rstd, const float* x,
                                const float* weight, const float* bias, int64_t rows, int64_t C,
                                float eps);
using LayernormBackwardFn = void(float* dx, float* dweight, float* dbias, const float* dy,
                                 const float* x, const float* weight, const float* mean,
                                 const float* rstd, const float* residual, int64_t rows,
                                 int64_t C);

// approximate_tanh selects 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))); otherwise the erf form.
using GeluForwardFn = void(float* y, const float* x, int64_t n, bool approximate_tanh);
using GeluBackwardFn = void(float* dx, const float* dy, const float* x, int64_t n,
                            bool approximate_tanh);

// loss[n] = lse[n] - logits[n, targets[n]]; rows whose target is ignore_index get loss 0.
// Targets must already be checked to lie in [0, V) or equal ignore_index.
using CrossEntropyForwardFn = void(float* loss, float* lse, const float* logits,
                                   const int64_t* targets, int64_t N, int64_t V,
                                   int64_t ignore_index);
using CrossEntropyBackwardFn = void(float* dlogits, const float* dloss, const float* logits,
                                    const int64_t* targets, const float* lse, int64_t N,
                                    int64_t V, int64_t ignore_index);

// out[i] = weight[ids[i]]; ids must already be checked to lie in [0, V).
using EmbeddingForwardFn = void(float* out, const float* weight, const int64_t* ids,
                                int64_t n_ids, int64_t C);
// dweight (V,C) = 0, then dweight[ids[i]] += dout[i].
using EmbeddingBackwardFn = void(float* dweight, const float* dout, const int64_t* ids,
                                 int64_t n_ids, int64_t V, int64_t C);

// One AdamW step in place on each of `count` tensors (torch.optim.AdamW semantics, the gradient
// multiplied by grad_scale first); step counts from 1.
struct AdamwTensor {
    float *param, *m, *v;
    const float* grad;
    int64_t n;
    float weight_decay;
};
using AdamwStepFn = void(const AdamwTensor* tensors, int64_t count, float lr, float beta1,
                         float beta2, float eps, int64_t step, float grad_scale);
// The sum of x^2 over `count` arrays (array i has sizes[i] floats), accumulated in double; the same
// for any thread count.
using SumOfSquaresFn = double(const float* const* arrays, const int64_t* sizes, int64_t count);

// Attention over q (B,T,H,D), k and v (B,S,Hkv,D) with arbitrary strides on every axis but the
// last (a view into a fused QKV buffer needs no copy). Strides are in elements, ordered
// (batch, seq, head). out (B,T,H,D) and lse (B,H,T) are contiguous. With causal and S > T, query
// i sits at key position S - T + i. alibi_slopes is null or (H,). rope is null or (S, D/2)
// interleaved (cos, sin), D even: q and k are then rotated by their positions (RoPE) as the
// kernels read them, and the backward returns dq and dk for the unrotated q and k. The backward
// writes dq, dk and dv through their own strides (views into one fused gradient buffer need no
// copy afterwards).
struct AttentionShape {
    int64_t B, T, S, H, Hkv, D;
    int64_t q_strides[3], k_strides[3], v_strides[3];
    int64_t dq_strides[3], dk_strides[3], dv_strides[3];  // backward only
};
using AttentionForwardFn = void(float* out, float* lse, const float* q, const float* k,
                                const float* v, const AttentionShape& shape, bool causal,
                                float scale, const float* alibi_slopes, const float* rope);
// dout and out are contiguous (B,T,H,D); dq (B,T,H,D), dk and dv (B,S,Hkv,D) are fully
// overwritten, through shape.dq/dk/dv_strides, and overlap neither each other nor the inputs.
using AttentionBackwardFn = void(float* dq, float* dk, float* dv, const float* dout,
                                 const float* q, const float* k, const float* v, const float* out,
                                 const float* lse, const AttentionShape& shape, bool causal,
                                 float scale, const float* alibi_slopes, const float* rope);

// RoPE over x (B, T, H, D), D even: each pair (x[2i], x[2i+1]) of position t, read as a complex
// number, is multiplied by rot[t][i] (rot (T, D/2) of interleaved (cos, sin)), or by its conjugate.
// x and out have arbitrary (batch, seq, head) strides in elements and a contiguous last axis; out
// is either x itself or does not overlap it.
struct RopeShape {
    int64_t B, T, H, D;
    int64_t x_strides[3], out_strides[3];
};
using RopeFn = void(float* out, const float* x, const float* rot, const RopeShape& shape,
                    bool conjugate);

struct KernelTable {
    const char* isa;  // "generic", "avx2" or "avx512"
    GemmFn* gemm;
    BiasBackwardFn* bias_backward;
    SoftmaxForwardFn* softmax_forward;
    SoftmaxBackwardFn* softmax_backward;
    RmsnormForwardFn* rmsnorm_forward;
    RmsnormBackwardFn* rmsnorm_backward;
    LayernormForwardFn* layernorm_forward;
    LayernormBackwardFn* layernorm_backward;
    GeluForwardFn* gelu_forward;
    GeluBackwardFn* gelu_backward;
    CrossEntropyForwardFn* cross_entropy_forward;
    CrossEntropyBackwardFn* cross_entropy_backward;
    EmbeddingForwardFn* embedding_forward;
    EmbeddingBackwardFn* embedding_backward;
    AdamwStepFn* adamw_step;
    SumOfSquaresFn* sum_of_squares;
    AttentionForwardFn* attention_forward;
    AttentionBackwardFn* attention_backward;
    RopeFn* rope;
};

// One table per compiled instruction set (kernel_table.cpp, compiled once per ISA).
namespace generic { extern const KernelTable kernels; }
#if defined(LLMCORE_HAVE_AVX2)
namespace avx2 { extern const KernelTable kernels; }
#endif
#if defined(LLMCORE_HAVE_AVX512)
namespace avx512 { extern const KernelTable kernels; }
#endif

}  // namespace llmcore
