// Fused cross-entropy over logits (N, V): log-softmax and the loss of the target in one pass per
// row, never materialising the probabilities; the backward writes softmax - onehot directly.
#include "common.h"
#include "kernels.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace llmcore {
namespace LLMCORE_ISA {

namespace {

// Two halves of a vector as double lanes, for sums that must run in double.
typedef float vhalf __attribute__((vector_size(VEC / 2 * sizeof(float))));
typedef double vdouble __attribute__((vector_size(VEC / 2 * sizeof(double))));

// acc0 += the low half of e, acc1 += the high half, as doubles. With intrinsics where there are
// some: GCC's __builtin_convertvector of a half went through the stack, four lanes at a time, and
// held the whole forward at 34 cycles per vector.
inline void add_as_doubles(vdouble& acc0, vdouble& acc1, vfloat e) {
#if defined(__AVX512F__)
    acc0 += (vdouble)_mm512_cvtps_pd(_mm512_castps512_ps256((__m512)e));
    acc1 += (vdouble)_mm512_cvtps_pd((__m256)_mm512_extractf64x4_pd((__m512d)e, 1));
#elif defined(__AVX2__)
    acc0 += (vdouble)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)e));
    acc1 += (vdouble)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)e, 1));
#else
    vhalf lo, hi;
    std::memcpy(&lo, &e, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&e) + sizeof lo, sizeof hi);
    acc0 += __builtin_convertvector(lo, vdouble);
    acc1 += __builtin_convertvector(hi, vdouble);
#endif
}

// sum over a row of exp(row[i] - shift), in double: over V = 50257 classes a float sum drifts by
// ~1e-5 relative (the generic build has only 4 lanes), and that error lands in every dlogit.
// Whole vectors go through vexp and are added as two halves of double lanes (the compiler's own
// vectorisation of a double sum of fast_exp reached ~40% of the copy ceiling at 512 x 50257).
inline double row_sum_exp(const float* row, int64_t V, float shift) {
    vdouble acc0{}, acc1{};
    int64_t i = 0;
    // Four vectors' exponentials summed in float first (each a relative error of an ulp or two,
    // against one conversion to double per vector instead of four).
    for (; i + 4 * VEC <= V; i += 4 * VEC) {
        const vfloat e01 = vexp(load(row + i) - shift) + vexp(load(row + i + VEC) - shift);
        const vfloat e23 = vexp(load(row + i + 2 * VEC) - shift) + vexp(load(row + i + 3 * VEC) - shift);
        add_as_doubles(acc0, acc1, e01 + e23);
    }
    for (; i + VEC <= V; i += VEC) add_as_doubles(acc0, acc1, vexp(load(row + i) - shift));
    const vdouble acc = acc0 + acc1;
    double sum = 0.0;
    for (int l = 0; l < VEC / 2; ++l) sum += acc[l];
    for (; i < V; ++i) sum += (double)fast_exp(row[i] - shift);
    return sum;
}

}  // namespace

void cross_entropy_forward(float* loss, float* lse, const float* logits, const int64_t* targets,
                           int64_t N, int64_t V, int64_t ignore_index) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const float* row = logits + n * V;
        const float mx = row_max(row, V);
        // An all -inf row has mx = -inf: shift by 0 instead, so the row gives lse = -inf, not NaN.
        const float shift = std::isinf(mx) ? 0.0f : mx;
        const float l = shift + (float)std::log(row_sum_exp(row, V, shift));
        lse[n] = l;
        loss[n] = targets[n] == ignore_index ? 0.0f : l - row[targets[n]];
    }
}

// dlogits[n] = dloss[n] * (softmax(logits[n]) - onehot(targets[n])); ignored rows get 0.
void cross_entropy_backward(float* dlogits, const float* dloss, const float* logits,
                            const int64_t* targets, const float* lse, int64_t N, int64_t V,
                            int64_t ignore_index) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const float* row = logits + n * V;
        float* drow = dlogits + n * V;
        if (targets[n] == ignore_index) {
            for (int64_t i = 0; i < V; ++i) drow[i] = 0.0f;
            continue;
        }
        const float d = dloss[n], l = lse[n];
        int64_t i = 0;  // (vexp and fast_exp agree bitwise)
        for (; i + VEC <= V; i += VEC) store(drow + i, d * vexp(load(row + i) - l));
        for (; i < V; ++i) drow[i] = d * fast_exp(row[i] - l);
        drow[targets[n]] -= d;
    }
}

}  // namespace LLMCORE_ISA
}  // namespace llmcore
