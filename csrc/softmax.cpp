// softmax over the last axis: one task per row, the row read from memory once (the max, the
// exponentials and the scaling all work on a row that sits in L1/L2).
#include "common.h"
#include "kernels.h"

namespace llmcore {
namespace LLMCORE_ISA {

void softmax_forward(float* y, const float* x, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * cols;
        float* yr = y + r * cols;
        const float mx = row_max(xr, cols);
        // A NaN anywhere must give a NaN row, as in the reference; the max above skips NaNs
        // but exp(NaN - mx) below brings it back into the sum.
        const float sum = exp_and_sum(yr, xr, cols, mx);
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t i = 0; i < cols; ++i) yr[i] *= inv;
    }
}

// dx = y * (dy - sum(dy * y))
void softmax_backward(float* dx, const float* dy, const float* y, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float* dyr = dy + r * cols;
        const float* yr = y + r * cols;
        float* dxr = dx + r * cols;
        const float dot = row_sum(
            cols, [&](int64_t i) { return load(dyr + i) * load(yr + i); },
            [&](int64_t i) { return dyr[i] * yr[i]; });
#pragma omp simd
        for (int64_t i = 0; i < cols; ++i) dxr[i] = yr[i] * (dyr[i] - dot);
    }
}

}  // namespace LLMCORE_ISA
}  // namespace llmcore
