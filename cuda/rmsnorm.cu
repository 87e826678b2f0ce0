// RMSNorm over the last axis of x (rows, C):
//   forward   rstd = 1 / sqrt(mean(x^2) + eps),  y = x * rstd * weight
//   backward  g = dy * weight,  dx = rstd * g - x * rstd^3 * mean(g * x),
//             dweight = sum over rows of dy * x * rstd   (overwritten, deterministic)
//
// Row-wise in the tiers of rows.cuh: up to C = 8192 the row sits in registers (a warp per row up
// to 1024, a block per row beyond), so x (and dy) are read once and y (dx) written once; longer
// rows re-read x from L2 for the second pass. dweight: each block keeps the sum of its rows'
// dy * x * rstd for its columns in registers (the columns a thread owns are the same in every
// row), the block's warps add theirs in warp order through shared memory, and the block writes
// one (C,) partial to the workspace; sum_partials (rows.cuh) adds the partials in a fixed order.
// Workspace: P partial rows (P, C) float32, P = norm_partials(rows, rows per block) <= 256.
//
// dx follows the reference's evaluation order with every product rounded (no FMA contraction)
// and rstd^3 rounded once from double, as NumPy's float32 r**3 is: over few channels dx cancels
// (over one, to eps / x^2 of its terms) and the tests hold it to twice NumPy float32's own
// error, which a differently rounded but equally good sequence misses by chance.
#include "common.cuh"
#include "kernels.cuh"
#include "rows.cuh"

namespace llmcore::cuda {
namespace {

// rstd^3 rounded once (float32 r**3 in NumPy is powf, correctly rounded here).
__device__ __forceinline__ float rstd_cubed(float r) {
    const double rd = r;
    return (float)(rd * rd * rd);
}

// dx = r * g - x * r^3 * mean(g * x), g = dy * w: the reference's order, each step rounded.
__device__ __forceinline__ float rmsnorm_dx(float dy, float w, float x, float r, float r3,
                                            float mean_gx) {
    return __fsub_rn(__fmul_rn(r, __fmul_rn(dy, w)), __fmul_rn(__fmul_rn(x, r3), mean_gx));
}

// ---- forward --------------------------------------------------------------------------------

// y, x (rows, C); rstd (rows,); weight (C,); C <= L::kMaxC.
template <class L>
__global__ __launch_bounds__(kRowThreads) void rmsnorm_forward_regs(
    float* __restrict__ y, float* __restrict__ rstd, const float* __restrict__ x,
    const float* __restrict__ weight, int64_t rows, int C, float eps) {
    __shared__ float shared[32];
    const int t = threadIdx.x % L::TPR;
    for (int64_t row = first_row<L>(); row < rows; row += row_step<L>()) {
        RowRegs<L> r;
        r.load(x + row * C, C, t);
        float ss = 0.0f;  // slots past C hold 0
#pragma unroll
        for (int k = 0; k < L::K; ++k)
#pragma unroll
            for (int j = 0; j < L::VEC; ++j) ss += r.v[k][j] * r.v[k][j];
        ss = row_sum<L::TPR>(ss, shared);
        const float s = 1.0f / sqrtf(ss / (float)C + eps);
        if (t == 0) rstd[row] = s;
#pragma unroll
        for (int k = 0; k < L::K; ++k) {
            if (r.col(k, t) < C) {
                float w[L::VEC];
                load_vec<L::VEC>(w, weight + r.col(k, t));
#pragma unroll
                for (int j = 0; j < L::VEC; ++j) r.v[k][j] = r.v[k][j] * s * w[j];
            }
        }
        r.store(y + row * C, C, t);
    }
}

// Any C: a block per row, two passes. vec: C % 4 == 0 and every pointer 16-byte aligned, so every
// row splits into quads only (head 0) and weight + 4q is aligned too.
__global__ __launch_bounds__(kRowThreads, kLongMinBlocks) void rmsnorm_forward_long(
    float* __restrict__ y, float* __restrict__ rstd, const float* __restrict__ x,
    const float* __restrict__ weight, int64_t rows, int64_t C, float eps, bool vec) {
    __shared__ float shared[32];
    const int t = threadIdx.x;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * C;
        float* yr = y + row * C;
        const RowSplit sp = split_row(xr, C, vec);
        float ss = 0.0f;
        for_row_scalars<kRowThreads>(sp, C, t, [&](int64_t i) { ss += xr[i] * xr[i]; });
        for_row_quads<kRowThreads, 4>(
            sp, t, [&](int64_t q) { return load4(xr + sp.head + 4 * q); },
            [&](int64_t, float4 a) {
                ss += a.x * a.x;
                ss += a.y * a.y;
                ss += a.z * a.z;
                ss += a.w * a.w;
            });
        ss = block_sum(ss, shared);
        const float s = 1.0f / sqrtf(ss / (float)C + eps);
        if (t == 0) rstd[row] = s;
        for_row_scalars<kRowThreads>(sp, C, t, [&](int64_t i) { yr[i] = xr[i] * s * weight[i]; });
        for_row_quads<kRowThreads, 4>(
            sp, t, [&](int64_t q) { return load4(xr + sp.head + 4 * q); },
            [&](int64_t q, float4 a) {
                const int64_t i = sp.head + 4 * q;
                const float4 w = load4(weight + i);
                store4(yr + i,
                       make_float4(a.x * s * w.x, a.y * s * w.y, a.z * s * w.z, a.w * s * w.w));
            });
    }
}

// ---- backward -------------------------------------------------------------------------------

// dx, dy, x (rows, C); weight (C,); rstd (rows,); partial (gridDim.x, C). C <= L::kMaxC.
// Block b handles rows b * R + group + i * gridDim.x * R (R = rows per block).
template <class L>
__global__ __launch_bounds__(kRowThreads) void rmsnorm_backward_regs(
    float* __restrict__ dx, float* __restrict__ partial, const float* __restrict__ dy,
    const float* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ rstd,
    int64_t rows, int C) {
    __shared__ float shared[32];
    __shared__ float combine[L::kRowsPerBlock > 1 ? L::kMaxC : 1];  // see write_block_partial
    const int t = threadIdx.x % L::TPR;
    float dw[L::K][L::VEC];
#pragma unroll
    for (int k = 0; k < L::K; ++k)
#pragma unroll
        for (int j = 0; j < L::VEC; ++j) dw[k][j] = 0.0f;

    for (int64_t row = first_row<L>(); row < rows; row += row_step<L>()) {
        RowRegs<L> g, xv;  // g: dy, then dx
        g.load(dy + row * C, C, t);
        xv.load(x + row * C, C, t);
        const float r = rstd[row];
        float dot = 0.0f;  // sum(g * x) with g = dy * weight
#pragma unroll
        for (int k = 0; k < L::K; ++k) {
            if (g.col(k, t) < C) {
                float w[L::VEC];
                load_vec<L::VEC>(w, weight + g.col(k, t));
#pragma unroll
                for (int j = 0; j < L::VEC; ++j)
                    dot += __fmul_rn(__fmul_rn(g.v[k][j], w[j]), xv.v[k][j]);
            }
        }
        dot = row_sum<L::TPR>(dot, shared);
        const float r3 = rstd_cubed(r), mean_gx = dot / (float)C;
#pragma unroll
        for (int k = 0; k < L::K; ++k) {
            if (g.col(k, t) < C) {
                float w[L::VEC];
                load_vec<L::VEC>(w, weight + g.col(k, t));
#pragma unroll
                for (int j = 0; j < L::VEC; ++j) {
                    const float d = g.v[k][j], xj = xv.v[k][j];
                    dw[k][j] += d * xj * r;
                    g.v[k][j] = rmsnorm_dx(d, w[j], xj, r, r3, mean_gx);
                }
            }
        }
        g.store(dx + row * C, C, t);
    }

    write_block_partial<L>(dw, combine, partial + (int64_t)blockIdx.x * C, C);
}

// Any C: a block per row, two passes; the block's dweight partial accumulates in its workspace
// row (each element always touched by the same thread, so no barrier is needed between rows).
__global__ __launch_bounds__(kRowThreads, kLongBackwardMinBlocks) void rmsnorm_backward_long(
    float* __restrict__ dx, float* __restrict__ partial, const float* __restrict__ dy,
    const float* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ rstd,
    int64_t rows, int64_t C, bool vec) {
    __shared__ float shared[32];
    const int t = threadIdx.x;
    float* pw = partial + (int64_t)blockIdx.x * C;
    struct Pair { float4 g, x; };
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const bool first = row == blockIdx.x;
        const float* gr = dy + row * C;
        const float* xr = x + row * C;
        float* dr = dx + row * C;
        const RowSplit sp = split_row(xr, C, vec);
        const float r = rstd[row];
        auto load = [&](int64_t q) {
            return Pair{load4(gr + sp.head + 4 * q), load4(xr + sp.head + 4 * q)};
        };
        auto gx = [](float d, float w, float xi) { return __fmul_rn(__fmul_rn(d, w), xi); };
        float dot = 0.0f;
        for_row_scalars<kRowThreads>(sp, C, t,
                                     [&](int64_t i) { dot += gx(gr[i], weight[i], xr[i]); });
        for_row_quads<kRowThreads, 4>(sp, t, load, [&](int64_t q, Pair a) {
            const float4 w = load4(weight + sp.head + 4 * q);
            dot += gx(a.g.x, w.x, a.x.x);
            dot += gx(a.g.y, w.y, a.x.y);
            dot += gx(a.g.z, w.z, a.x.z);
            dot += gx(a.g.w, w.w, a.x.w);
        });
        dot = block_sum(dot, shared);
        const float r3 = rstd_cubed(r), mean_gx = dot / (float)C;
        auto one = [&](float d, float xi, float w, float& dxi, float& pwi) {
            dxi = rmsnorm_dx(d, w, xi, r, r3, mean_gx);
            pwi = first ? d * xi * r : pwi + d * xi * r;
        };
        for_row_scalars<kRowThreads>(sp, C, t, [&](int64_t i) {
            float dxi, pwi = first ? 0.0f : pw[i];
            one(gr[i], xr[i], weight[i], dxi, pwi);
            dr[i] = dxi;
            pw[i] = pwi;
        });
        for_row_quads<kRowThreads, 4>(sp, t, load, [&](int64_t q, Pair a) {
            const int64_t i = sp.head + 4 * q;
            const float4 w = load4(weight + i);
            float4 d, p = first ? make_float4(0.0f, 0.0f, 0.0f, 0.0f) : load4(pw + i);
            one(a.g.x, a.x.x, w.x, d.x, p.x);
            one(a.g.y, a.x.y, w.y, d.y, p.y);
            one(a.g.z, a.x.z, w.z, d.z, p.z);
            one(a.g.w, a.x.w, w.w, d.w, p.w);
            store4(dr + i, d);
            store4(pw + i, p);
        });
    }
}

}  // namespace

void rmsnorm_forward(float* y, float* rstd, const float* x, const float* weight, int64_t rows,
                     int64_t C, float eps, cudaStream_t stream) {
    if (rows <= 0 || C <= 0) return;
    const bool vec4 = C % 4 == 0 && aligned16(y) && aligned16(x) && aligned16(weight);
    const bool in_regs = dispatch_row_layout(C, vec4, [&](auto layout) {
        using L = decltype(layout);
        rmsnorm_forward_regs<L><<<row_grid(rows, L::kRowsPerBlock), kRowThreads, 0, stream>>>(
            y, rstd, x, weight, rows, (int)C, eps);
        LLMCORE_CUDA_CHECK_LAUNCH();
    });
    if (!in_regs) {
        rmsnorm_forward_long<<<row_grid(rows, 1), kRowThreads, 0, stream>>>(
            y, rstd, x, weight, rows, C, eps, vec4);
        LLMCORE_CUDA_CHECK_LAUNCH();
    }
}

size_t rmsnorm_backward_workspace_bytes(int64_t rows, int64_t C) {
    return norm_partials_bytes(rows, C, 1);
}

void rmsnorm_backward(float* dx, float* dweight, const float* dy, const float* x,
                      const float* weight, const float* rstd, int64_t rows, int64_t C,
                      void* workspace, cudaStream_t stream) {
    if (C <= 0) return;
    if (rows <= 0) {  // an empty sum
        LLMCORE_CUDA_CHECK(cudaMemsetAsync(dweight, 0, (size_t)C * sizeof(float), stream));
        return;
    }
    float* partial = static_cast<float*>(workspace);
    const bool vec4 = C % 4 == 0 && aligned16(dx) && aligned16(dy) && aligned16(x) &&
                      aligned16(weight) && aligned16(partial);
    int64_t P = 0;
    const bool in_regs = dispatch_row_layout(C, vec4, [&](auto layout) {
        using L = decltype(layout);
        P = norm_partials(rows, L::kRowsPerBlock);
        rmsnorm_backward_regs<L><<<(unsigned)P, kRowThreads, 0, stream>>>(
            dx, partial, dy, x, weight, rstd, rows, (int)C);
        LLMCORE_CUDA_CHECK_LAUNCH();
    });
    if (!in_regs) {
        P = norm_partials(rows, 1);
        rmsnorm_backward_long<<<(unsigned)P, kRowThreads, 0, stream>>>(dx, partial, dy, x, weight,
                                                                      rstd, rows, C, vec4);
        LLMCORE_CUDA_CHECK_LAUNCH();
    }
    sum_partials(dweight, nullptr, partial, nullptr, P, C, stream);
}

}  // namespace llmcore::cuda
