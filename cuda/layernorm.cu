// LayerNorm over the last axis of x (rows, C):
//   forward   mean = mean(x),  rstd = 1 / sqrt(mean((x - mean)^2) + eps),
//             y = (x - mean) * rstd * weight + bias
//   backward  xhat = (x - mean) * rstd,  g = dy * weight,
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
//             dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
//             (overwritten, deterministic)
//
// Row-wise in the tiers of rows.cuh: up to C = 8192 the row sits in registers (a warp per row up
// to 1024, a block per row beyond), so x (and dy) are read once and y (dx) written once, and the
// variance comes from the centred values in registers (no E[x^2] - E[x]^2 cancellation). Longer
// rows re-read the row from L2 for each pass (three in the forward, two in the backward).
// dweight and dbias as in rmsnorm.cu: per-block partial sums kept in registers, combined in
// warp order through shared memory, one (C,) partial of each per block in the workspace, then
// sum_partials (rows.cuh) in a fixed order.
// Workspace: [dweight partials (P, C) | pad to 256 B | dbias partials (P, C)], float32,
// P = norm_partials(rows, rows per block) <= 256.
//
// dx follows the reference's evaluation order with every step rounded (no FMA contraction): over
// one channel g - mean(g) and x - mean are then exactly 0, so dx is exactly 0 as it should be.
#include <tuple>
#include <utility>

#include "common.cuh"
#include "kernels.cuh"
#include "rows.cuh"

namespace llmcore::cuda {
namespace {

// xhat = (x - mean) * rstd, rounded at each step as the reference.
__device__ __forceinline__ float layernorm_xhat(float x, float mean, float r) {
    return __fmul_rn(__fsub_rn(x, mean), r);
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w.
__device__ __forceinline__ float layernorm_dx(float g, float xhat, float r, float g_mean,
                                              float gx_mean) {
    return __fmul_rn(r, __fsub_rn(__fsub_rn(g, g_mean), __fmul_rn(xhat, gx_mean)));
}

// ---- forward --------------------------------------------------------------------------------

// y, x (rows, C); mean, rstd (rows,); weight, bias (C,); C <= L::kMaxC.
template <class L>
__global__ __launch_bounds__(kRowThreads) void layernorm_forward_regs(
    float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
    const float* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
    int64_t rows, int C, float eps) {
    __shared__ float shared[32];
    const int t = threadIdx.x % L::TPR;
    for (int64_t row = first_row<L>(); row < rows; row += row_step<L>()) {
        RowRegs<L> r;
        r.load(x + row * C, C, t);
        float sum = 0.0f;  // slots past C hold 0
#pragma unroll
        for (int k = 0; k < L::K; ++k)
#pragma unroll
            for (int j = 0; j < L::VEC; ++j) sum += r.v[k][j];
        const float m = row_sum<L::TPR>(sum, shared) / (float)C;
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < L::K; ++k) {
            if (r.col(k, t) < C) {
#pragma unroll
                for (int j = 0; j < L::VEC; ++j) {
                    r.v[k][j] = r.v[k][j] - m;  // centred from here on
                    ss += r.v[k][j] * r.v[k][j];
                }
            }
        }
        const float s = 1.0f / sqrtf(row_sum<L::TPR>(ss, shared) / (float)C + eps);
        if (t == 0) {
            mean[row] = m;
            rstd[row] = s;
        }
#pragma unroll
        for (int k = 0; k < L::K; ++k) {
            if (r.col(k, t) < C) {
                float w[L::VEC], b[L::VEC];
                load_vec<L::VEC>(w, weight + r.col(k, t));
                load_vec<L::VEC>(b, bias + r.col(k, t));
#pragma unroll
                for (int j = 0; j < L::VEC; ++j) r.v[k][j] = r.v[k][j] * s * w[j] + b[j];
            }
        }
        r.store(y + row * C, C, t);
    }
}

// Any C: a block per row, three passes (sum, centred sum of squares, y). vec: C % 4 == 0 and
// every pointer 16-byte aligned, so rows split into quads only and weight + 4q is aligned.
__global__ __launch_bounds__(kRowThreads, kLongMinBlocks) void layernorm_forward_long(
    float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
    const float* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
    int64_t rows, int64_t C, float eps, bool vec) {
    __shared__ float shared[32];
    const int t = threadIdx.x;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * C;
        float* yr = y + row * C;
        const RowSplit sp = split_row(xr, C, vec);
        auto load = [&](int64_t q) { return load4(xr + sp.head + 4 * q); };
        float sum = 0.0f;
        for_row_scalars<kRowThreads>(sp, C, t, [&](int64_t i) { sum += xr[i]; });
        for_row_quads<kRowThreads, 4>(sp, t, load, [&](int64_t, float4 a) {
            sum += a.x;
            sum += a.y;
            sum += a.z;
            sum += a.w;
        });
        const float m = block_sum(sum, shared) / (float)C;
        float ss = 0.0f;
        auto sq = [&](float v) { ss += (v - m) * (v - m); };
        for_row_scalars<kRowThreads>(sp, C, t, [&](int64_t i) { sq(xr[i]); });
        for_row_quads<kRowThreads, 4>(sp, t, load, [&](int64_t, float4 a) {
            sq(a.x);
            sq(a.y);
            sq(a.z);
            sq(a.w);
        });
        const float s = 1.0f / sqrtf(block_sum(ss, shared) / (float)C + eps);
        if (t == 0) {
            mean[row] = m;
            rstd[row] = s;
        }
        auto out = [&](float v, float w, float b) { return (v - m) * s * w + b; };
        for_row_scalars<kRowThreads>(sp, C, t,
                                     [&](int64_t i) { yr[i] = out(xr[i], weight[i], bias[i]); });
        for_row_quads<kRowThreads, 4>(sp, t, load, [&](int64_t q, float4 a) {
            const int64_t i = sp.head + 4 * q;
            const float4 w = load4(weight + i), b = load4(bias + i);
            store4(yr + i, make_float4(out(a.x, w.x, b.x), out(a.y, w.y, b.y), out(a.z, w.z, b.z),
                                       out(a.w, w.w, b.w)));
        });
    }
}

// ---- backward -------------------------------------------------------------------------------

// dx, dy, x (rows, C); weight (C,); mean, rstd (rows,); pw, pb (gridDim.x, C) partials of
// dweight and dbias. C <= L::kMaxC. Block b handles rows b * R + group + i * gridDim.x * R.
template <class L>
__global__ __launch_bounds__(kRowThreads) void layernorm_backward_regs(
    float* __restrict__ dx, float* __restrict__ pw, float* __restrict__ pb,
    const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ weight,
    const float* __restrict__ mean, const float* __restrict__ rstd, int64_t rows, int C) {
    __shared__ float shared[32];
    __shared__ float combine[L::kRowsPerBlock > 1 ? L::kMaxC : 1];  // see write_block_partial
    const int t = threadIdx.x % L::TPR;
    float dw[L::K][L::VEC], db[L::K][L::VEC];
#pragma unroll
    for (int k = 0; k < L::K; ++k)
#pragma unroll
        for (int j = 0; j < L::VEC; ++j) dw[k][j] = db[k][j] = 0.0f;

    for (int64_t row = first_row<L>(); row < rows; row += row_step<L>()) {
        RowRegs<L> d, xh;  // dy, then dx; x, then xhat
        d.load(dy + row * C, C, t);
        xh.load(x + row * C, C, t);
        const float m = mean[row], r = rstd[row];
        float g_sum = 0.0f, gx_sum = 0.0f;
#pragma unroll
        for (int k = 0; k < L::K; ++k) {
            if (d.col(k, t) < C) {
                float w[L::VEC];
                load_vec<L::VEC>(w, weight + d.col(k, t));
#pragma unroll
                for (int j = 0; j < L::VEC; ++j) {
                    xh.v[k][j] = layernorm_xhat(xh.v[k][j], m, r);
                    const float g = __fmul_rn(d.v[k][j], w[j]);
                    g_sum += g;
                    gx_sum += __fmul_rn(g, xh.v[k][j]);
                }
            }
        }
        const float g_mean = row_sum<L::TPR>(g_sum, shared) / (float)C;
        const float gx_mean = row_sum<L::TPR>(gx_sum, shared) / (float)C;
#pragma unroll
        for (int k = 0; k < L::K; ++k) {
            if (d.col(k, t) < C) {
                float w[L::VEC];
                load_vec<L::VEC>(w, weight + d.col(k, t));
#pragma unroll
                for (int j = 0; j < L::VEC; ++j) {
                    const float dyj = d.v[k][j], xhat = xh.v[k][j];
                    dw[k][j] += dyj * xhat;
                    db[k][j] += dyj;
                    d.v[k][j] = layernorm_dx(__fmul_rn(dyj, w[j]), xhat, r, g_mean, gx_mean);
                }
            }
        }
        d.store(dx + row * C, C, t);
    }
    write_block_partial<L>(dw, combine, pw + (int64_t)blockIdx.x * C, C);
    write_block_partial<L>(db, combine, pb + (int64_t)blockIdx.x * C, C);
}

// Any C: a block per row, two passes; the block's partials accumulate in its workspace rows
// (each element always touched by the same thread, so no barrier is needed between rows).
__global__ __launch_bounds__(kRowThreads, kLongBackwardMinBlocks) void layernorm_backward_long(
    float* __restrict__ dx, float* __restrict__ pw, float* __restrict__ pb,
    const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ weight,
    const float* __restrict__ mean, const float* __restrict__ rstd, int64_t rows, int64_t C,
    bool vec) {
    __shared__ float shared[32];
    const int t = threadIdx.x;
    float* pwr = pw + (int64_t)blockIdx.x * C;
    float* pbr = pb + (int64_t)blockIdx.x * C;
    struct Pair { float4 d, x; };
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const bool first = row == blockIdx.x;
        const float* dr = dy + row * C;
        const float* xr = x + row * C;
        float* dxr = dx + row * C;
        const RowSplit sp = split_row(xr, C, vec);
        const float m = mean[row], r = rstd[row];
        auto load = [&](int64_t q) {
            return Pair{load4(dr + sp.head + 4 * q), load4(xr + sp.head + 4 * q)};
        };
        float g_sum = 0.0f, gx_sum = 0.0f;
        auto sums = [&](float dyi, float xi, float w) {
            const float g = __fmul_rn(dyi, w);
            g_sum += g;
            gx_sum += __fmul_rn(g, layernorm_xhat(xi, m, r));
        };
        for_row_scalars<kRowThreads>(sp, C, t, [&](int64_t i) { sums(dr[i], xr[i], weight[i]); });
        for_row_quads<kRowThreads, 4>(sp, t, load, [&](int64_t q, Pair a) {
            const float4 w = load4(weight + sp.head + 4 * q);
            sums(a.d.x, a.x.x, w.x);
            sums(a.d.y, a.x.y, w.y);
            sums(a.d.z, a.x.z, w.z);
            sums(a.d.w, a.x.w, w.w);
        });
        const float g_mean = block_sum(g_sum, shared) / (float)C;
        const float gx_mean = block_sum(gx_sum, shared) / (float)C;
        auto one = [&](float dyi, float xi, float w, float& dxi, float& pwi, float& pbi) {
            const float xhat = layernorm_xhat(xi, m, r);
            dxi = layernorm_dx(__fmul_rn(dyi, w), xhat, r, g_mean, gx_mean);
            pwi = first ? dyi * xhat : pwi + dyi * xhat;
            pbi = first ? dyi : pbi + dyi;
        };
        for_row_scalars<kRowThreads>(sp, C, t, [&](int64_t i) {
            float dxi, pwi = first ? 0.0f : pwr[i], pbi = first ? 0.0f : pbr[i];
            one(dr[i], xr[i], weight[i], dxi, pwi, pbi);
            dxr[i] = dxi;
            pwr[i] = pwi;
            pbr[i] = pbi;
        });
        for_row_quads<kRowThreads, 4>(sp, t, load, [&](int64_t q, Pair a) {
            const int64_t i = sp.head + 4 * q;
            const float4 w = load4(weight + i), zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            float4 o, p = first ? zero : load4(pwr + i), b = first ? zero : load4(pbr + i);
            one(a.d.x, a.x.x, w.x, o.x, p.x, b.x);
            one(a.d.y, a.x.y, w.y, o.y, p.y, b.y);
            one(a.d.z, a.x.z, w.z, o.z, p.z, b.z);
            one(a.d.w, a.x.w, w.w, o.w, p.w, b.w);
            store4(dxr + i, o);
            store4(pwr + i, p);
            store4(pbr + i, b);
        });
    }
}

}  // namespace

void layernorm_forward(float* y, float* mean, float* rstd, const float* x, const float* weight,
                       const float* bias, int64_t rows, int64_t C, float eps,
                       cudaStream_t stream) {
    if (rows <= 0 || C <= 0) return;
    const bool vec4 = C % 4 == 0 && aligned16(y) && aligned16(x) && aligned16(weight) &&
                      aligned16(bias);
    const bool in_regs = dispatch_row_layout(C, vec4, [&](auto layout) {
        using L = decltype(layout);
        layernorm_forward_regs<L><<<row_grid(rows, L::kRowsPerBlock), kRowThreads, 0, stream>>>(
            y, mean, rstd, x, weight, bias, rows, (int)C, eps);
        LLMCORE_CUDA_CHECK_LAUNCH();
    });
    if (!in_regs) {
        layernorm_forward_long<<<row_grid(rows, 1), kRowThreads, 0, stream>>>(
            y, mean, rstd, x, weight, bias, rows, C, eps, vec4);
        LLMCORE_CUDA_CHECK_LAUNCH();
    }
}

size_t layernorm_backward_workspace_bytes(int64_t rows, int64_t C) {
    return norm_partials_bytes(rows, C, 2);
}

void layernorm_backward(float* dx, float* dweight, float* dbias, const float* dy, const float* x,
                        const float* weight, const float* mean, const float* rstd, int64_t rows,
                        int64_t C, void* workspace, cudaStream_t stream) {
    if (C <= 0) return;
    if (rows <= 0) {  // empty sums
        LLMCORE_CUDA_CHECK(cudaMemsetAsync(dweight, 0, (size_t)C * sizeof(float), stream));
        LLMCORE_CUDA_CHECK(cudaMemsetAsync(dbias, 0, (size_t)C * sizeof(float), stream));
        return;
    }
    // The dbias partials start a 256-byte-aligned slice after the dweight partials; both slices
    // fit the workspace because P <= min(rows, kMaxPartials).
    auto slices = [&](int64_t P) {
        float* pw = static_cast<float*>(workspace);
        float* pb = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                             align256((size_t)P * (size_t)C * sizeof(float)));
        return std::make_pair(pw, pb);
    };
    const bool vec4 = C % 4 == 0 && aligned16(dx) && aligned16(dy) && aligned16(x) &&
                      aligned16(weight) && aligned16(workspace);
    int64_t P = 0;
    float *pw = nullptr, *pb = nullptr;
    // At most 24 floats per thread and array: x, dy and the two sums make four arrays in
    // registers, and 32 floats each (C = 1024 in a warp) needs 166 registers, one block per SM.
    const bool in_regs = dispatch_row_layout<24>(C, vec4, [&](auto layout) {
        using L = decltype(layout);
        P = norm_partials(rows, L::kRowsPerBlock);
        std::tie(pw, pb) = slices(P);
        layernorm_backward_regs<L><<<(unsigned)P, kRowThreads, 0, stream>>>(
            dx, pw, pb, dy, x, weight, mean, rstd, rows, (int)C);
        LLMCORE_CUDA_CHECK_LAUNCH();
    });
    if (!in_regs) {
        P = norm_partials(rows, 1);
        std::tie(pw, pb) = slices(P);
        layernorm_backward_long<<<(unsigned)P, kRowThreads, 0, stream>>>(
            dx, pw, pb, dy, x, weight, mean, rstd, rows, C, vec4);
        LLMCORE_CUDA_CHECK_LAUNCH();
    }
    sum_partials(dweight, dbias, pw, pb, P, C, stream);
}

}  // namespace llmcore::cuda
