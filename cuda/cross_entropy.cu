// Fused cross-entropy over logits (N, V) and integer targets (N,):
//   forward   lse[n] = log(sum_j exp(logits[n, j])),  loss[n] = lse[n] - logits[n, targets[n]]
//   backward  dlogits[n, j] = dloss[n] * (exp(logits[n, j] - lse[n]) - [j == targets[n]])
// Rows whose target is ignore_index get loss 0 and dlogits 0 (their lse is still written).
//
// One pass over memory each way: the forward reads every logit once, keeping an online max/sum
// (rows.cuh, OnlineLse: the running sum is rescaled when the max grows), so the probabilities
// are never stored; the backward reads logits once and writes dlogits once, using the saved lse.
// A warp per row for V <= 1024, a 256-thread block per row above (GPT-2's V = 50257: ~200
// floats per thread). V is usually odd, so rows are walked with float4 accesses after a scalar
// head up to each row's first 16-byte boundary (rows.cuh, split_row) rather than needing V % 4.
// exp/log are the accurate expf/logf.
#include "common.cuh"
#include "kernels.cuh"
#include "rows.cuh"

namespace llmcore::cuda {
namespace {

constexpr int64_t kWarpPerRowMaxV = 1024;

// loss, lse (N,); logits (N, V); targets (N,). TPR threads per row (32 or kRowThreads).
template <int TPR>
__global__ __launch_bounds__(kRowThreads, kLongMinBlocks) void cross_entropy_forward_kernel(
    float* __restrict__ loss, float* __restrict__ lse, const float* __restrict__ logits,
    const int64_t* __restrict__ targets, int64_t N, int64_t V, int64_t ignore_index, bool vec) {
    __shared__ float shared[64];
    constexpr int kRowsPerBlock = kRowThreads / TPR;
    const int t = threadIdx.x % TPR;
    for (int64_t row = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / TPR; row < N;
         row += (int64_t)gridDim.x * kRowsPerBlock) {
        const float* xr = logits + row * V;
        const RowSplit sp = split_row(xr, V, vec);
        // An all -inf row gives lse = -inf, a +inf logit lse = +inf, a NaN lse = NaN (the
        // reference's shift-by-0 for an infinite max; see lse_shift).
        OnlineLse<true> st;
        for_row_scalars<TPR>(sp, V, t, [&](int64_t i) { st.add(xr[i]); });
        for_row_quads<TPR, 4>(
            sp, t, [&](int64_t q) { return load4(xr + sp.head + 4 * q); },
            [&](int64_t, float4 a) { st.add(a); });
        row_merge<TPR>(st, shared);
        if (t == 0) {
            const float l = st.lse();
            const int64_t target = targets[row];
            lse[row] = l;
            loss[row] = target == ignore_index ? 0.0f : l - xr[target];
        }
    }
}

// dlogits, logits (N, V); dloss, lse, targets (N,). vec: dlogits and logits rows share their
// misalignment, so the split of the logits row serves both.
template <int TPR>
__global__ __launch_bounds__(kRowThreads, kLongMinBlocks) void cross_entropy_backward_kernel(
    float* __restrict__ dlogits, const float* __restrict__ dloss, const float* __restrict__ logits,
    const int64_t* __restrict__ targets, const float* __restrict__ lse, int64_t N, int64_t V,
    int64_t ignore_index, bool vec) {
    constexpr int kRowsPerBlock = kRowThreads / TPR;
    const int t = threadIdx.x % TPR;
    for (int64_t row = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / TPR; row < N;
         row += (int64_t)gridDim.x * kRowsPerBlock) {
        const float* xr = logits + row * V;
        float* dr = dlogits + row * V;
        const RowSplit sp = split_row(xr, V, vec);
        const int64_t target = targets[row];
        if (target == ignore_index) {  // uniform over the row's threads
            for_row_scalars<TPR>(sp, V, t, [&](int64_t i) { dr[i] = 0.0f; });
            for (int64_t q = t; q < sp.nquad; q += TPR)
                store4(dr + sp.head + 4 * q, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
            continue;
        }
        const float d = dloss[row], l = lse[row];
        // The reference's order: p = exp(x - lse), p[target] -= 1, then times dloss.
        auto grad = [&](float x, int64_t i) {
            float p = expf(x - l);
            if (i == target) p -= 1.0f;
            return p * d;
        };
        for_row_scalars<TPR>(sp, V, t, [&](int64_t i) { dr[i] = grad(xr[i], i); });
        for_row_quads<TPR, 4>(
            sp, t, [&](int64_t q) { return load4(xr + sp.head + 4 * q); },
            [&](int64_t q, float4 a) {
                const int64_t i = sp.head + 4 * q;
                store4(dr + i, make_float4(grad(a.x, i), grad(a.y, i + 1), grad(a.z, i + 2),
                                           grad(a.w, i + 3)));
            });
    }
}

}  // namespace

void cross_entropy_forward(float* loss, float* lse, const float* logits, const int64_t* targets,
                           int64_t N, int64_t V, int64_t ignore_index, cudaStream_t stream) {
    if (N <= 0 || V <= 0) return;
    const bool vec = aligned4(logits);
    if (V <= kWarpPerRowMaxV) {
        cross_entropy_forward_kernel<kWarpSize>
            <<<row_grid(N, kRowThreads / kWarpSize), kRowThreads, 0, stream>>>(
                loss, lse, logits, targets, N, V, ignore_index, vec);
    } else {
        cross_entropy_forward_kernel<kRowThreads><<<row_grid(N, 1), kRowThreads, 0, stream>>>(
            loss, lse, logits, targets, N, V, ignore_index, vec);
    }
    LLMCORE_CUDA_CHECK_LAUNCH();
}

void cross_entropy_backward(float* dlogits, const float* dloss, const float* logits,
                            const int64_t* targets, const float* lse, int64_t N, int64_t V,
                            int64_t ignore_index, cudaStream_t stream) {
    if (N <= 0 || V <= 0) return;
    const bool vec = aligned4(logits) && aligned4(dlogits) && same_misalignment(logits, dlogits);
    if (V <= kWarpPerRowMaxV) {
        cross_entropy_backward_kernel<kWarpSize>
            <<<row_grid(N, kRowThreads / kWarpSize), kRowThreads, 0, stream>>>(
                dlogits, dloss, logits, targets, lse, N, V, ignore_index, vec);
    } else {
        cross_entropy_backward_kernel<kRowThreads><<<row_grid(N, 1), kRowThreads, 0, stream>>>(
            dlogits, dloss, logits, targets, lse, N, V, ignore_index, vec);
    }
    LLMCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace llmcore::cuda
