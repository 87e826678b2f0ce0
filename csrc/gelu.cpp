// GELU, elementwise: the tanh approximation (GPT-2's) or the exact erf form.
#include <algorithm>

#include "common.h"
#include "kernels.h"

namespace llmcore {
namespace LLMCORE_ISA {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCoeff = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr int64_t kGrain = 4096;  // elements per OpenMP chunk: 16 KiB, a few microseconds

}  // namespace

// tanh form: 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3). Written
// with the sigmoid, because 1 + tanh(u) cancels for negative x (at x = -4 half the float32 digits
// are lost) while 1 / (1 + exp(-2u)) keeps them. The erf form likewise uses
// Phi(x) = erfc(-x / sqrt 2) / 2 rather than (1 + erf(x / sqrt 2)) / 2.
//
// The tanh form is written once for T = float and T = vfloat: whole vectors through vexp (one
// vscalefps on AVX-512 where fast_exp, which the compiler vectorised before, spent a floor, two
// conversions and two multiplies), the scalar form for the tail of a chunk. The results are the
// same either way (vexp and fast_exp agree bitwise).
template <class T>
inline T exp_of(T x) {
    if constexpr (sizeof(T) == sizeof(float)) return fast_exp(x);
    else return vexp(x);
}

// 1 + exp(-2u) at x: the denominator of sigmoid(2u), which both directions divide by.
template <class T>
inline T one_plus_exp_minus_2u(T v) {
    const T u = kSqrt2OverPi * (v + kCoeff * v * v * v);
    return 1.0f + exp_of(-2.0f * u);
}

template <class T>
inline T gelu_tanh(T v) {
    return v / one_plus_exp_minus_2u(v);
}

// with s = sigmoid(2u) = (1 + tanh u) / 2 and 1 - tanh^2 u = 4 s (1 - s):
//   d/dx = s + 2 x s (1 - s) u'(x),  u'(x) = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
template <class T>
inline T gelu_tanh_grad(T v, T dy) {
    const T s = 1.0f / one_plus_exp_minus_2u(v);
    const T du = kSqrt2OverPi * (1.0f + 3.0f * kCoeff * v * v);
    return dy * (s + 2.0f * v * s * (1.0f - s) * du);
}

void gelu_forward(float* y, const float* x, int64_t n, bool approximate_tanh) {
    if (approximate_tanh) {
#pragma omp parallel for schedule(static)
        for (int64_t c0 = 0; c0 < n; c0 += kGrain) {
            const int64_t c1 = std::min(n, c0 + kGrain);
            int64_t i = c0;
            for (; i + VEC <= c1; i += VEC) store(y + i, gelu_tanh(load(x + i)));
            for (; i < c1; ++i) y[i] = gelu_tanh(x[i]);
        }
    } else {
        // libm's erfcf: exact to an ulp, not vectorised (no vectorisable erfc here yet).
#pragma omp parallel for schedule(static, kGrain)
        for (int64_t i = 0; i < n; ++i) y[i] = 0.5f * x[i] * std::erfc(-x[i] * kInvSqrt2);
    }
}

// erf form: d/dx = Phi(x) + x phi(x)
void gelu_backward(float* dx, const float* dy, const float* x, int64_t n, bool approximate_tanh) {
    if (approximate_tanh) {
#pragma omp parallel for schedule(static)
        for (int64_t c0 = 0; c0 < n; c0 += kGrain) {
            const int64_t c1 = std::min(n, c0 + kGrain);
            int64_t i = c0;
            for (; i + VEC <= c1; i += VEC) store(dx + i, gelu_tanh_grad(load(x + i), load(dy + i)));
            for (; i < c1; ++i) dx[i] = gelu_tanh_grad(x[i], dy[i]);
        }
    } else {
#pragma omp parallel for schedule(static, kGrain)
        for (int64_t i = 0; i < n; ++i) {
            const float v = x[i];
            const float cdf = 0.5f * std::erfc(-v * kInvSqrt2);
            const float pdf = kInvSqrt2Pi * fast_exp(-0.5f * v * v);
            dx[i] = dy[i] * (cdf + v * pdf);
        }
    }
}

}  // namespace LLMCORE_ISA
}  // namespace llmcore
