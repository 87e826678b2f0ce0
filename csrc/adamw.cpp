// AdamW, one fused pass over param, grad, m and v of every tensor it is given (torch.optim.AdamW
// semantics, with g = grad * grad_scale, the global-norm clipping factor):
//   param *= 1 - lr * weight_decay                      (decoupled weight decay)
//   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
//   param -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// and the sum of squares over many arrays that the clipping factor comes from.
//
// A model's parameters go in one call: one parallel region over pieces of all of them instead of
// one per tensor, each separated by a return to Python (26 calls for the cpu-small model).
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace llmcore {
namespace LLMCORE_ISA {
namespace {

// Work is cut into pieces of at most kPiece elements of one tensor, fixed by the sizes alone.
constexpr int64_t kPiece = 1 << 14;

struct Piece {
    int64_t tensor, begin, end;
};

template <class Size>
std::vector<Piece> pieces_of(int64_t count, Size size) {
    std::vector<Piece> pieces;
    for (int64_t t = 0; t < count; ++t)
        for (int64_t b = 0; b < size(t); b += kPiece) pieces.push_back({t, b, std::min(size(t), b + kPiece)});
    return pieces;
}

}  // namespace

void adamw_step(const AdamwTensor* tensors, int64_t count, float lr, float beta1, float beta2,
                float eps, int64_t step, float grad_scale) {
    // Bias corrections in double: 1 - beta2^t for small t loses digits in float.
    const float step_size = (float)(lr / (1.0 - std::pow((double)beta1, (double)step)));
    const float inv_bc2_sqrt = (float)(1.0 / std::sqrt(1.0 - std::pow((double)beta2, (double)step)));
    const std::vector<Piece> pieces = pieces_of(count, [&](int64_t t) { return tensors[t].n; });
#pragma omp parallel for schedule(dynamic, 1)
    for (size_t i = 0; i < pieces.size(); ++i) {
        const AdamwTensor& a = tensors[pieces[i].tensor];
        float *param = a.param, *m = a.m, *v = a.v;
        const float* grad = a.grad;
        const float decay = 1.0f - lr * a.weight_decay;
#pragma omp simd
        for (int64_t j = pieces[i].begin; j < pieces[i].end; ++j) {
            const float g = grad[j] * grad_scale;
            const float mj = beta1 * m[j] + (1.0f - beta1) * g;
            const float vj = beta2 * v[j] + (1.0f - beta2) * g * g;
            m[j] = mj;
            v[j] = vj;
            param[j] = param[j] * decay - step_size * mj / (std::sqrt(vj) * inv_bc2_sqrt + eps);
        }
    }
}

double sum_of_squares(const float* const* arrays, const int64_t* sizes, int64_t count) {
    // Each piece sums in double; the pieces' sums are added in order, so the result does not
    // depend on the thread count.
    const std::vector<Piece> pieces = pieces_of(count, [&](int64_t t) { return sizes[t]; });
    std::vector<double> sums(pieces.size());
#pragma omp parallel for schedule(dynamic, 1)
    for (size_t i = 0; i < pieces.size(); ++i) {
        const float* x = arrays[pieces[i].tensor];
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = pieces[i].begin; j < pieces[i].end; ++j) s += (double)x[j] * (double)x[j];
        sums[i] = s;
    }
    double total = 0.0;
    for (double s : sums) total += s;
    return total;
}

}  // namespace LLMCORE_ISA
}  // namespace llmcore
