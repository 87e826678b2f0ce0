// Race-free, deterministic sums over rows (the weight and bias gradients of the norms).
//
// Rows are split into one contiguous range per thread; each thread sums its range into its own
// slice of a scratch buffer, and the slices are then added in thread order. The result does not
// depend on scheduling, only (by float rounding) on the thread count.
#pragma once

#include <algorithm>

#include "aligned_buffer.h"
#include "common.h"

namespace llmcore {
namespace LLMCORE_ISA {

// Calls body(row_begin, row_end, partials...) on each thread, with `count` zeroed partial vectors
// of length C per thread, then writes their sums over threads into outs[0..count).
template <int count, typename Body>
void sum_rows_into(float* const (&outs)[count], int64_t rows, int64_t C, Body body) {
    static thread_local AlignedBuffer scratch;
    const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(max_threads(), rows));
    const int64_t stride = (C + 15) / 16 * 16;  // keep each partial on its own cache lines
    float* partial = scratch.get((int64_t)threads * count * stride);
#pragma omp parallel num_threads(threads)
    {
        const int t = thread_id();
        const int64_t r0 = rows * t / threads, r1 = rows * (t + 1) / threads;
        float* mine = partial + (int64_t)t * count * stride;
        for (int64_t i = 0; i < count * stride; ++i) mine[i] = 0.0f;
        float* p[count];
        for (int i = 0; i < count; ++i) p[i] = mine + i * stride;
        body(r0, r1, p);
    }
    for (int i = 0; i < count; ++i) {
        float* out = outs[i];
        for (int64_t c = 0; c < C; ++c) out[c] = partial[i * stride + c];
        for (int t = 1; t < threads; ++t) {
            const float* src = partial + ((int64_t)t * count + i) * stride;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) out[c] += src[c];
        }
    }
}

}  // namespace LLMCORE_ISA
}  // namespace llmcore
