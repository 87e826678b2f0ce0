// AdamW, one step in place over n parameters (torch.optim.AdamW semantics, decoupled decay),
// in the reference's order (python/llmcore/reference/adamw.py):
//   param *= 1 - lr * weight_decay
//   m = beta1 m + (1 - beta1) grad;   v = beta2 v + (1 - beta2) grad^2
//   param -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//
// One fused pass: reads param, grad, m, v once and writes param, m, v once (28 bytes per
// parameter), float4 when all four are 16-byte aligned with the last n % 4 one by one. The
// step-dependent scalars are computed on the host in double, as Python computes them for the
// reference (1 - beta2^t loses digits in float for small t), then rounded to float once.
#include <cmath>

#include "common.cuh"
#include "kernels.cuh"

namespace llmcore::cuda {
namespace {

constexpr int kThreads = 256;

struct AdamWScalars {
    float beta1, beta2;
    float one_minus_beta1, one_minus_beta2;  // (1 - beta) in double, then float
    float decay;                             // 1 - lr * weight_decay
    float step_size;                         // lr / (1 - beta1^t)
    float bc2_sqrt;                          // sqrt(1 - beta2^t)
    float eps;
};

__device__ __forceinline__ void adamw_one(float& p, float& m, float& v, float g,
                                          const AdamWScalars& s) {
    m = m * s.beta1 + s.one_minus_beta1 * g;
    v = v * s.beta2 + s.one_minus_beta2 * g * g;
    const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
    p = p * s.decay - s.step_size * m / denom;
}

// param, m, v (n,) updated in place; grad (n,). kVec4: all four 16-byte aligned. Plain loads
// (not the read-only path) for the arrays written in place.
template <bool kVec4>
__global__ __launch_bounds__(kThreads, 4) void adamw_kernel(float* __restrict__ param,
                                                            float* __restrict__ m,
                                                            float* __restrict__ v,
                                                            const float* __restrict__ grad,
                                                            int64_t n, AdamWScalars s) {
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t done = 0;
    if constexpr (kVec4) {
        const int64_t nq = n / 4;
        float4* p4 = reinterpret_cast<float4*>(param);
        float4* m4 = reinterpret_cast<float4*>(m);
        float4* v4 = reinterpret_cast<float4*>(v);
        const float4* g4 = reinterpret_cast<const float4*>(grad);
        for (int64_t q = tid; q < nq; q += stride) {
            float4 p = p4[q], mq = m4[q], vq = v4[q];
            const float4 g = g4[q];
            adamw_one(p.x, mq.x, vq.x, g.x, s);
            adamw_one(p.y, mq.y, vq.y, g.y, s);
            adamw_one(p.z, mq.z, vq.z, g.z, s);
            adamw_one(p.w, mq.w, vq.w, g.w, s);
            p4[q] = p;
            m4[q] = mq;
            v4[q] = vq;
        }
        done = 4 * nq;
    }
    for (int64_t i = done + tid; i < n; i += stride) adamw_one(param[i], m[i], v[i], grad[i], s);
}

}  // namespace

void adamw_step(float* param, float* m, float* v, const float* grad, int64_t n, float lr,
                float beta1, float beta2, float eps, float weight_decay, int64_t step,
                cudaStream_t stream) {
    if (n <= 0) return;
    AdamWScalars s;
    s.beta1 = beta1;
    s.beta2 = beta2;
    s.one_minus_beta1 = (float)(1.0 - (double)beta1);
    s.one_minus_beta2 = (float)(1.0 - (double)beta2);
    s.decay = (float)(1.0 - (double)lr * (double)weight_decay);
    s.step_size = (float)((double)lr / (1.0 - std::pow((double)beta1, (double)step)));
    s.bc2_sqrt = (float)std::sqrt(1.0 - std::pow((double)beta2, (double)step));
    s.eps = eps;
    const bool vec4 = aligned16(param) && aligned16(m) && aligned16(v) && aligned16(grad);
    const unsigned grid = grid_for(vec4 ? ceil_div(n, 4) : n, kThreads);
    if (vec4) adamw_kernel<true><<<grid, kThreads, 0, stream>>>(param, m, v, grad, n, s);
    else adamw_kernel<false><<<grid, kThreads, 0, stream>>>(param, m, v, grad, n, s);
    LLMCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace llmcore::cuda
