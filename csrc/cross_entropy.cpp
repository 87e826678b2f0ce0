// Fused cross-entropy over logits (N, V): log-softmax and the loss of the target in one pass per
// row, never materialising the probabilities; the backward writes softmax - onehot directly.
#include "common.h"
#include "kernels.h"

namespace llmcore {
namespace LLMCORE_ISA {

void cross_entropy_forward(float* loss, float* lse, const float* logits, const int64_t* targets,
                           int64_t N, int64_t V, int64_t ignore_index) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const float* row = logits + n * V;
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int64_t i = 0; i < V; ++i) mx = row[i] > mx ? row[i] : mx;
        // An all -inf row has mx = -inf: shift by 0 instead, so the row gives lse = -inf, not NaN.
        const float shift = std::isinf(mx) ? 0.0f : mx;
        // The sum runs in double: over V = 50257 classes a float sum drifts by ~1e-5 relative
        // (the generic build has only 4 lanes), and that error lands in every dlogit.
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < V; ++i) sum += (double)fast_exp(row[i] - shift);
        const float l = shift + (float)std::log(sum);
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
#pragma omp simd
        for (int64_t i = 0; i < V; ++i) drow[i] = d * fast_exp(row[i] - l);
        drow[targets[n]] -= d;
    }
}

}  // namespace LLMCORE_ISA
}  // namespace llmcore
