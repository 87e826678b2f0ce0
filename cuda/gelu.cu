// GELU, elementwise over n floats, forward and backward:
//   tanh form (GPT-2's):  y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   erf form ("none"):    y = 0.5 x (1 + erf(x / sqrt 2)) = x Phi(x)
//
// Grid-stride loops over float4 when x, y (and dy, dx) are 16-byte aligned, the last n % 4
// elements one by one; one by one throughout otherwise. One read of each input and one write.
//
// As the CPU kernels (csrc/gelu.cpp), in forms that do not cancel: 0.5 x (1 + tanh u) is written
// x * sigmoid(2u) = x / (1 + exp(-2u)), because 1 + tanh(u) loses half the digits at x = -4;
// Phi(x) = erfc(-x / sqrt 2) / 2 rather than (1 + erf(x / sqrt 2)) / 2. With s = sigmoid(2u):
//   tanh form  dy/dx = s + 2 x s (1 - s) u'(x),  u'(x) = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
//   erf form   dy/dx = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
// Accurate expf and erfcf (results are held to ~1e-5 of a float64 reference). For very negative
// x, exp(-2u) overflows to inf and s = 0: y = -0, dy/dx = 0, as the limits are.
#include "common.cuh"
#include "kernels.cuh"

namespace llmcore::cuda {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCoeff = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr int kThreads = 256;

template <bool kTanh>
__device__ __forceinline__ float gelu(float x) {
    if constexpr (kTanh) {
        const float u = kSqrt2OverPi * (x + kCoeff * x * x * x);
        return x / (1.0f + expf(-2.0f * u));
    } else {
        return 0.5f * x * erfcf(-x * kInvSqrt2);
    }
}

template <bool kTanh>
__device__ __forceinline__ float gelu_grad(float x) {
    if constexpr (kTanh) {
        const float u = kSqrt2OverPi * (x + kCoeff * x * x * x);
        const float s = 1.0f / (1.0f + expf(-2.0f * u));
        const float du = kSqrt2OverPi * (1.0f + 3.0f * kCoeff * x * x);
        return s + 2.0f * x * s * (1.0f - s) * du;
    } else {
        const float cdf = 0.5f * erfcf(-x * kInvSqrt2);
        const float pdf = kInvSqrt2Pi * expf(-0.5f * x * x);
        return cdf + x * pdf;
    }
}

// y, x (n,). kVec4: both 16-byte aligned; quads [0, n / 4), then the tail.
template <bool kTanh, bool kVec4>
__global__ __launch_bounds__(kThreads, 4) void gelu_forward_kernel(float* __restrict__ y,
                                                                const float* __restrict__ x,
                                                                int64_t n) {
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t done = 0;
    if constexpr (kVec4) {
        const int64_t nq = n / 4;
        for (int64_t q = tid; q < nq; q += stride) {
            const float4 v = reinterpret_cast<const float4*>(x)[q];
            reinterpret_cast<float4*>(y)[q] =
                make_float4(gelu<kTanh>(v.x), gelu<kTanh>(v.y), gelu<kTanh>(v.z), gelu<kTanh>(v.w));
        }
        done = 4 * nq;
    }
    for (int64_t i = done + tid; i < n; i += stride) y[i] = gelu<kTanh>(x[i]);
}

// dx, dy, x (n,).
template <bool kTanh, bool kVec4>
__global__ __launch_bounds__(kThreads, 4) void gelu_backward_kernel(float* __restrict__ dx,
                                                                 const float* __restrict__ dy,
                                                                 const float* __restrict__ x,
                                                                 int64_t n) {
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t done = 0;
    if constexpr (kVec4) {
        const int64_t nq = n / 4;
        for (int64_t q = tid; q < nq; q += stride) {
            const float4 v = reinterpret_cast<const float4*>(x)[q];
            const float4 d = reinterpret_cast<const float4*>(dy)[q];
            reinterpret_cast<float4*>(dx)[q] =
                make_float4(d.x * gelu_grad<kTanh>(v.x), d.y * gelu_grad<kTanh>(v.y),
                            d.z * gelu_grad<kTanh>(v.z), d.w * gelu_grad<kTanh>(v.w));
        }
        done = 4 * nq;
    }
    for (int64_t i = done + tid; i < n; i += stride) dx[i] = dy[i] * gelu_grad<kTanh>(x[i]);
}

template <bool kTanh, bool kVec4>
void launch_forward(float* y, const float* x, int64_t n, cudaStream_t stream) {
    gelu_forward_kernel<kTanh, kVec4>
        <<<grid_for(kVec4 ? ceil_div(n, 4) : n, kThreads), kThreads, 0, stream>>>(y, x, n);
    LLMCORE_CUDA_CHECK_LAUNCH();
}

template <bool kTanh, bool kVec4>
void launch_backward(float* dx, const float* dy, const float* x, int64_t n, cudaStream_t stream) {
    gelu_backward_kernel<kTanh, kVec4>
        <<<grid_for(kVec4 ? ceil_div(n, 4) : n, kThreads), kThreads, 0, stream>>>(dx, dy, x, n);
    LLMCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace

void gelu_forward(float* y, const float* x, int64_t n, bool approximate_tanh,
                  cudaStream_t stream) {
    if (n <= 0) return;
    const bool vec4 = aligned16(y) && aligned16(x);
    if (approximate_tanh) {
        if (vec4) launch_forward<true, true>(y, x, n, stream);
        else launch_forward<true, false>(y, x, n, stream);
    } else {
        if (vec4) launch_forward<false, true>(y, x, n, stream);
        else launch_forward<false, false>(y, x, n, stream);
    }
}

void gelu_backward(float* dx, const float* dy, const float* x, int64_t n, bool approximate_tanh,
                   cudaStream_t stream) {
    if (n <= 0) return;
    const bool vec4 = aligned16(dx) && aligned16(dy) && aligned16(x);
    if (approximate_tanh) {
        if (vec4) launch_backward<true, true>(dx, dy, x, n, stream);
        else launch_backward<true, false>(dx, dy, x, n, stream);
    } else {
        if (vec4) launch_backward<false, true>(dx, dy, x, n, stream);
        else launch_backward<false, false>(dx, dy, x, n, stream);
    }
}

}  // namespace llmcore::cuda
