// softmax over the last axis of x (rows, C):  y = exp(x - max) / sum(exp(x - max)),
// and its backward:                           dx = y * (dy - sum(dy * y)).
//
// Row-wise, in the tiers of rows.cuh. Rows up to 8192 floats live in registers (a warp per row up
// to 1024, a block per row beyond), so x is read once and y written once; the max, the sum and
// the scaling all work on registers. Longer rows (a 50257-word vocabulary) take a block per row
// and two passes: an online max/sum (the running sum rescaled whenever the max grows), then the
// write pass, whose re-read of x mostly hits L2. The backward is the same with dy and y.
// exp is the accurate expf, not __expf: results are held to ~1e-5 of a float64 reference.
// NaN and inf as in the reference: a NaN anywhere makes the row NaN, an all -inf row is NaN.
#include "common.cuh"
#include "kernels.cuh"
#include "rows.cuh"

namespace llmcore::cuda {
namespace {

// ---- forward --------------------------------------------------------------------------------

// x, y (rows, C), C <= L::kMaxC: the row in registers.
template <class L>
__global__ __launch_bounds__(kRowThreads) void softmax_forward_regs(float* __restrict__ y,
                                                                    const float* __restrict__ x,
                                                                    int64_t rows, int C) {
    __shared__ float shared[32];
    const int t = threadIdx.x % L::TPR;
    for (int64_t row = first_row<L>(); row < rows; row += row_step<L>()) {
        RowRegs<L> r;
        r.load(x + row * C, C, t);
        float m = -INFINITY;
#pragma unroll
        for (int k = 0; k < L::K; ++k)
            if (r.col(k, t) < C)
#pragma unroll
                for (int j = 0; j < L::VEC; ++j) m = fmaxf(m, r.v[k][j]);
        m = row_max<L::TPR>(m, shared);
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < L::K; ++k)
            if (r.col(k, t) < C)
#pragma unroll
                for (int j = 0; j < L::VEC; ++j) {
                    r.v[k][j] = expf(r.v[k][j] - m);
                    s += r.v[k][j];
                }
        s = row_sum<L::TPR>(s, shared);
        const float inv = 1.0f / s;
#pragma unroll
        for (int k = 0; k < L::K; ++k)
#pragma unroll
            for (int j = 0; j < L::VEC; ++j) r.v[k][j] *= inv;
        r.store(y + row * C, C, t);
    }
}

// x, y (rows, C), any C: a block per row, two passes. vec: x and y rows share their
// misalignment, so both use the split of the x row.
__global__ __launch_bounds__(kRowThreads, kLongMinBlocks) void softmax_forward_long(
    float* __restrict__ y, const float* __restrict__ x, int64_t rows, int64_t C, bool vec) {
    __shared__ float shared[64];
    const int t = threadIdx.x;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * C;
        float* yr = y + row * C;
        const RowSplit sp = split_row(xr, C, vec);
        OnlineLse<false> st;
        for_row_scalars<kRowThreads>(sp, C, t, [&](int64_t i) { st.add(xr[i]); });
        for_row_quads<kRowThreads, 4>(
            sp, t, [&](int64_t q) { return load4(xr + sp.head + 4 * q); },
            [&](int64_t, float4 a) { st.add(a); });
        block_merge(st, shared);
        const float sh = lse_shift<false>(st.m), inv = 1.0f / st.s;
        for_row_scalars<kRowThreads>(sp, C, t, [&](int64_t i) { yr[i] = expf(xr[i] - sh) * inv; });
        for_row_quads<kRowThreads, 4>(
            sp, t, [&](int64_t q) { return load4(xr + sp.head + 4 * q); },
            [&](int64_t q, float4 a) {
                store4(yr + sp.head + 4 * q,
                       make_float4(expf(a.x - sh) * inv, expf(a.y - sh) * inv,
                                   expf(a.z - sh) * inv, expf(a.w - sh) * inv));
            });
    }
}

// ---- backward -------------------------------------------------------------------------------

// dx, dy, y (rows, C), C <= L::kMaxC: dy and y in registers.
template <class L>
__global__ __launch_bounds__(kRowThreads) void softmax_backward_regs(float* __restrict__ dx,
                                                                     const float* __restrict__ dy,
                                                                     const float* __restrict__ y,
                                                                     int64_t rows, int C) {
    __shared__ float shared[32];
    const int t = threadIdx.x % L::TPR;
    for (int64_t row = first_row<L>(); row < rows; row += row_step<L>()) {
        RowRegs<L> g, p;  // dy, y; slots past C are 0 and add nothing to the dot product
        g.load(dy + row * C, C, t);
        p.load(y + row * C, C, t);
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < L::K; ++k)
#pragma unroll
            for (int j = 0; j < L::VEC; ++j) dot += g.v[k][j] * p.v[k][j];
        dot = row_sum<L::TPR>(dot, shared);
#pragma unroll
        for (int k = 0; k < L::K; ++k)
#pragma unroll
            for (int j = 0; j < L::VEC; ++j) g.v[k][j] = p.v[k][j] * (g.v[k][j] - dot);
        g.store(dx + row * C, C, t);
    }
}

// Any C: a block per row, two passes (the dot product, then dx).
__global__ __launch_bounds__(kRowThreads, kLongMinBlocks) void softmax_backward_long(
    float* __restrict__ dx, const float* __restrict__ dy, const float* __restrict__ y, int64_t rows,
    int64_t C, bool vec) {
    __shared__ float shared[32];
    const int t = threadIdx.x;
    struct Pair { float4 g, p; };
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* gr = dy + row * C;
        const float* pr = y + row * C;
        float* dr = dx + row * C;
        const RowSplit sp = split_row(gr, C, vec);
        auto load = [&](int64_t q) {
            return Pair{load4(gr + sp.head + 4 * q), load4(pr + sp.head + 4 * q)};
        };
        float dot = 0.0f;
        for_row_scalars<kRowThreads>(sp, C, t, [&](int64_t i) { dot += gr[i] * pr[i]; });
        for_row_quads<kRowThreads, 4>(sp, t, load, [&](int64_t, Pair a) {
            dot += a.g.x * a.p.x;
            dot += a.g.y * a.p.y;
            dot += a.g.z * a.p.z;
            dot += a.g.w * a.p.w;
        });
        dot = block_sum(dot, shared);
        for_row_scalars<kRowThreads>(sp, C, t, [&](int64_t i) { dr[i] = pr[i] * (gr[i] - dot); });
        for_row_quads<kRowThreads, 4>(sp, t, load, [&](int64_t q, Pair a) {
            store4(dr + sp.head + 4 * q,
                   make_float4(a.p.x * (a.g.x - dot), a.p.y * (a.g.y - dot),
                               a.p.z * (a.g.z - dot), a.p.w * (a.g.w - dot)));
        });
    }
}

}  // namespace

void softmax_forward(float* y, const float* x, int64_t rows, int64_t cols, cudaStream_t stream) {
    if (rows <= 0 || cols <= 0) return;
    const bool vec4 = cols % 4 == 0 && aligned16(x) && aligned16(y);
    const bool in_regs = dispatch_row_layout(cols, vec4, [&](auto layout) {
        using L = decltype(layout);
        softmax_forward_regs<L><<<row_grid(rows, L::kRowsPerBlock), kRowThreads, 0, stream>>>(
            y, x, rows, (int)cols);
        LLMCORE_CUDA_CHECK_LAUNCH();
    });
    if (!in_regs) {
        const bool vec = aligned4(x) && aligned4(y) && same_misalignment(x, y);
        softmax_forward_long<<<row_grid(rows, 1), kRowThreads, 0, stream>>>(y, x, rows, cols, vec);
        LLMCORE_CUDA_CHECK_LAUNCH();
    }
}

void softmax_backward(float* dx, const float* dy, const float* y, int64_t rows, int64_t cols,
                      cudaStream_t stream) {
    if (rows <= 0 || cols <= 0) return;
    const bool vec4 = cols % 4 == 0 && aligned16(dx) && aligned16(dy) && aligned16(y);
    const bool in_regs = dispatch_row_layout(cols, vec4, [&](auto layout) {
        using L = decltype(layout);
        softmax_backward_regs<L><<<row_grid(rows, L::kRowsPerBlock), kRowThreads, 0, stream>>>(
            dx, dy, y, rows, (int)cols);
        LLMCORE_CUDA_CHECK_LAUNCH();
    });
    if (!in_regs) {
        const bool vec = aligned4(dx) && aligned4(dy) && aligned4(y) &&
                         same_misalignment(dx, dy) && same_misalignment(dx, y);
        softmax_backward_long<<<row_grid(rows, 1), kRowThreads, 0, stream>>>(dx, dy, y, rows, cols,
                                                                              vec);
        LLMCORE_CUDA_CHECK_LAUNCH();
    }
}

}  // namespace llmcore::cuda
