// Shared machinery of the row-wise kernels (softmax.cu, rmsnorm.cu, layernorm.cu,
// cross_entropy.cu): how a row of C floats is spread over the threads that own it, held in
// registers, reduced, and, for rows too long for registers, walked through memory with 16-byte
// accesses. Also the deterministic column sum that finishes the norms' weight gradients.
//
// Three tiers, chosen on the host from C (and the alignment) alone, so that which rows a block
// sums for a weight gradient never depends on the device:
//   warp tier   C <= 1024: a warp per row, 8 rows per 256-thread block, the row in registers;
//                          reductions are warp shuffles, no barriers. Memory is touched once.
//   block tier  C <= 8192: a 256-thread block per row, the row in registers; block reductions
//                          (two barriers each). Memory is touched once.
//   long tier   beyond:    a 256-thread block per row that walks the row in memory once per
//                          pass it needs; the later passes mostly hit L2 (the row was just read).
// (A kernel holding several arrays in registers lowers the limits: dispatch_row_layout.)
// In the register tiers thread t of a row's TPR threads holds the K vectors of VEC floats that
// start at columns (k * TPR + t) * VEC, k < K: each warp-wide access is 512 (VEC = 4) or 128
// (VEC = 1) contiguous bytes. VEC = 4 needs C % 4 == 0 and every row pointer 16-byte aligned.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace llmcore::cuda {

constexpr int kRowThreads = 256;           // threads per block of every row kernel
constexpr int64_t kMaxRowBlocks = 1 << 20; // grid cap; kernels loop (grid-stride) beyond it
// Minimum resident blocks asked of the long-tier and cross-entropy kernels (__launch_bounds__):
// caps them at 64 registers, which also stops ptxas from spilling one of them at 40 (seen with
// nvcc 13.0 when left to its own heuristics).
constexpr int kLongMinBlocks = 4;
// The long-tier norm backwards keep more live values (dy, x, weight and the partials of a batch
// of quads): at 64 registers they spill, at 128 (two blocks per SM) they do not.
constexpr int kLongBackwardMinBlocks = 2;

// Where one row lives in registers: TPR threads per row, K vectors of VEC floats per thread.
template <int VEC_, int K_, int TPR_>
struct RowLayout {
    static constexpr int VEC = VEC_, K = K_, TPR = TPR_;
    static constexpr int kRowsPerBlock = kRowThreads / TPR;  // 8 (warp tier) or 1 (block tier)
    static constexpr int kMaxC = VEC * K * TPR;
    static_assert(TPR == kWarpSize || TPR == kRowThreads, "a row is a warp or a whole block");
    static_assert(VEC == 1 || VEC == 4, "float or float4");
};

template <class L, int kMaxSlots, class F>
bool try_row_layout(int64_t C, F& f) {
    if constexpr (L::K * L::VEC > kMaxSlots) {
        return false;  // not even compiled
    } else {
        if (C > L::kMaxC) return false;
        f(L{});
        return true;
    }
}

// Host: calls f(RowLayout<...>{}) with the smallest layout that holds C floats (vec4: the float4
// layouts, which need C % 4 == 0 and aligned pointers) and returns true, or returns false when C
// is beyond the register tiers. kMaxSlots caps the floats per thread (K * VEC) of one row array:
// a kernel that keeps several arrays in registers passes less, so that C beyond it takes the
// next tier rather than a layout that would cost occupancy. Few K values on purpose: slots past
// C are predicated off, so a coarse K only costs registers, while every extra K is another
// instantiation of each kernel.
template <int kMaxSlots = 32, class F>
bool dispatch_row_layout(int64_t C, bool vec4, F&& f) {
    if (vec4)
        return try_row_layout<RowLayout<4, 1, 32>, kMaxSlots>(C, f) ||
               try_row_layout<RowLayout<4, 2, 32>, kMaxSlots>(C, f) ||
               try_row_layout<RowLayout<4, 4, 32>, kMaxSlots>(C, f) ||
               try_row_layout<RowLayout<4, 6, 32>, kMaxSlots>(C, f) ||  // GPT-2 small: C = 768
               try_row_layout<RowLayout<4, 8, 32>, kMaxSlots>(C, f) ||
               try_row_layout<RowLayout<4, 2, kRowThreads>, kMaxSlots>(C, f) ||
               try_row_layout<RowLayout<4, 4, kRowThreads>, kMaxSlots>(C, f) ||
               try_row_layout<RowLayout<4, 8, kRowThreads>, kMaxSlots>(C, f);
    return try_row_layout<RowLayout<1, 2, 32>, kMaxSlots>(C, f) ||
           try_row_layout<RowLayout<1, 8, 32>, kMaxSlots>(C, f) ||
           try_row_layout<RowLayout<1, 32, 32>, kMaxSlots>(C, f) ||
           try_row_layout<RowLayout<1, 8, kRowThreads>, kMaxSlots>(C, f) ||
           try_row_layout<RowLayout<1, 32, kRowThreads>, kMaxSlots>(C, f);
}

// Blocks for `rows` rows at `rows_per_block` rows per block (grid-stride loops cover the rest).
inline unsigned row_grid(int64_t rows, int64_t rows_per_block) {
    int64_t blocks = ceil_div(rows, rows_per_block);
    if (blocks < 1) blocks = 1;
    return (unsigned)(blocks < kMaxRowBlocks ? blocks : kMaxRowBlocks);
}

inline bool aligned4(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 3u) == 0; }
// Two arrays whose rows start at the same offset within 16 bytes: one split serves both.
inline bool same_misalignment(const void* a, const void* b) {
    return (reinterpret_cast<uintptr_t>(a) & 15u) == (reinterpret_cast<uintptr_t>(b) & 15u);
}
inline size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// ---- norm weight gradients: per-block partial sums, then a fixed-order column sum ------------
//
// The backward of a norm writes one partial (C,) vector per block (each block owns a fixed set of
// rows: block b takes rows b*R.., b*R + P*R.., ... for R rows per block) into the workspace, then
// sum_partials adds the P partials per column in a fixed order. P depends on rows and the tier
// only, so results are bitwise reproducible on any GPU; no float atomics anywhere.
constexpr int64_t kMaxPartials = 256;    // 2 blocks of 8 warps per H100 SM; the partials then
                                         // add ~2-4% to the traffic of 8192 rows
constexpr int64_t kMinRowsPerGroup = 4;  // rows per warp (or block) before another block pays

inline int64_t norm_partials(int64_t rows, int64_t rows_per_block) {
    int64_t p = ceil_div(rows, rows_per_block * kMinRowsPerGroup);
    if (p < 1) p = 1;
    return p < kMaxPartials ? p : kMaxPartials;
}

// Workspace for `count` (C,) partial sums per block: an upper bound over every tier.
inline size_t norm_partials_bytes(int64_t rows, int64_t C, int count) {
    int64_t p = rows < kMaxPartials ? rows : kMaxPartials;
    if (p < 1) p = 1;
    return (size_t)count * align256((size_t)p * (size_t)C * sizeof(float));
}

#if defined(__CUDACC__)

__device__ __forceinline__ float4 load4(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}
// In PTX: a plain float4 assignment is sometimes split into four 4-byte stores when its
// components come from separate computations (seen in the long-tier loops). The "memory"
// clobber keeps the compiler from moving loads across it (the long-tier norm backward re-reads
// what it stored for the previous row).
__device__ __forceinline__ void store4(float* p, float4 v) {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z),
                 "f"(v.w)
                 : "memory");
}

template <int VEC>
__device__ __forceinline__ void load_vec(float (&d)[VEC], const float* p) {
    if constexpr (VEC == 4) {
        const float4 v = load4(p);
        d[0] = v.x, d[1] = v.y, d[2] = v.z, d[3] = v.w;
    } else {
        d[0] = *p;
    }
}

template <int VEC>
__device__ __forceinline__ void store_vec(float* p, const float (&d)[VEC]) {
    if constexpr (VEC == 4) store4(p, make_float4(d[0], d[1], d[2], d[3]));
    else *p = d[0];
}

// Sum / max over the TPR threads of a row; every one of them gets the result. The block form
// (TPR == blockDim.x) needs `shared` (32 floats) and all threads of the block.
template <int TPR>
__device__ __forceinline__ float row_sum(float v, float* shared) {
    if constexpr (TPR == kWarpSize) return warp_sum(v);
    else return block_sum(v, shared);
}
template <int TPR>
__device__ __forceinline__ float row_max(float v, float* shared) {
    if constexpr (TPR == kWarpSize) return warp_max(v);
    else return block_max(v, shared);
}

// The rows of a register-tier kernel: thread group threadIdx.x / TPR of block b starts at row
// b * R + group and steps by gridDim.x * R.
template <class L>
__device__ __forceinline__ int64_t first_row() {
    return (int64_t)blockIdx.x * L::kRowsPerBlock + threadIdx.x / L::TPR;
}
template <class L>
__device__ __forceinline__ int64_t row_step() {
    return (int64_t)gridDim.x * L::kRowsPerBlock;
}

// One row in registers (see the top of the file for which columns a thread holds).
template <class L>
struct RowRegs {
    float v[L::K][L::VEC];

    __device__ __forceinline__ static int col(int k, int t) { return (k * L::TPR + t) * L::VEC; }

    // Slots at or past C read as 0.
    __device__ __forceinline__ void load(const float* row, int C, int t) {
#pragma unroll
        for (int k = 0; k < L::K; ++k) {
            if (col(k, t) < C) {
                load_vec<L::VEC>(v[k], row + col(k, t));
            } else {
#pragma unroll
                for (int j = 0; j < L::VEC; ++j) v[k][j] = 0.0f;
            }
        }
    }

    __device__ __forceinline__ void store(float* row, int C, int t) const {
#pragma unroll
        for (int k = 0; k < L::K; ++k)
            if (col(k, t) < C) store_vec<L::VEC>(row + col(k, t), v[k]);
    }
};

// The end of a norm backward in the register tiers: each row group (warp, or the whole block)
// holds in `acc` the sums over its rows for the columns its threads own (the same columns in
// every row). The block's groups add theirs in group order through `combine` (L::kMaxC floats of
// shared memory when there are several groups) and the last writes the block's partial row.
// Called by every thread of the block.
template <class L>
__device__ __forceinline__ void write_block_partial(const float (&acc)[L::K][L::VEC],
                                                    float* combine, float* partial_row, int C) {
    const int t = threadIdx.x % L::TPR, group = threadIdx.x / L::TPR;
#pragma unroll 1
    for (int w = 0; w < L::kRowsPerBlock; ++w) {
        if (group == w) {
#pragma unroll
            for (int k = 0; k < L::K; ++k) {
                const int c0 = RowRegs<L>::col(k, t);
                if (c0 < C) {
#pragma unroll
                    for (int j = 0; j < L::VEC; ++j) {
                        const float v = w == 0 ? acc[k][j] : combine[c0 + j] + acc[k][j];
                        if (w == L::kRowsPerBlock - 1) partial_row[c0 + j] = v;
                        else combine[c0 + j] = v;
                    }
                }
            }
        }
        if constexpr (L::kRowsPerBlock > 1) __syncthreads();
    }
}

// ---- rows walked in memory (long tier, cross-entropy) -----------------------------------------
//
// A row that starts anywhere (4-byte aligned) splits into a scalar head up to its first 16-byte
// boundary (< 4 floats), float4 quads, and a scalar tail (< 4 floats). Arrays whose rows share
// the misalignment (same_misalignment on the host) share the split, so e.g. the odd vocabulary
// 50257 still gets float4 access. vec == false makes the whole row the scalar tail.
struct RowSplit {
    int64_t head;   // elements [0, head) one by one
    int64_t nquad;  // quads at head + 4q, q < nquad
    int64_t tail;   // elements [tail, C) one by one
};

__device__ __forceinline__ RowSplit split_row(const float* row, int64_t C, bool vec) {
    RowSplit s{0, 0, 0};
    if (!vec) return s;
    int64_t h = (int64_t)(((16u - ((unsigned)reinterpret_cast<uintptr_t>(row) & 15u)) & 15u) >> 2);
    if (h > C) h = C;
    s.head = h;
    s.nquad = (C - h) >> 2;
    s.tail = h + 4 * s.nquad;
    return s;
}

// Calls use(i) for every scalar element of a split row that thread t (of TPR) owns.
template <int TPR, class Use>
__device__ __forceinline__ void for_row_scalars(const RowSplit& s, int64_t C, int t, Use use) {
    for (int64_t i = t; i < s.head; i += TPR) use(i);
    for (int64_t i = s.tail + t; i < C; i += TPR) use(i);
}

// Calls use(q, load(q)) for the quads thread t owns, U loads issued before their uses so that U
// 16-byte requests per thread are in flight (the loop is otherwise latency-bound).
template <int TPR, int U, class Load, class Use>
__device__ __forceinline__ void for_row_quads(const RowSplit& s, int t, Load load, Use use) {
    using T = decltype(load(int64_t(0)));
    for (int64_t q0 = t; q0 < s.nquad; q0 += (int64_t)U * TPR) {
        T a[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int64_t q = q0 + (int64_t)u * TPR;
            a[u] = q < s.nquad ? load(q) : T{};
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int64_t q = q0 + (int64_t)u * TPR;
            if (q < s.nquad) use(q, a[u]);
        }
    }
}

// ---- online log-sum-exp ------------------------------------------------------------------------
//
// A running (m, s) with s = sum_i exp(x_i - shift(m)) and m = max_i x_i (NaNs skipped by fmaxf but
// carried into s, so a NaN anywhere makes s NaN). shift(m) = m for finite m; shift(-inf) = 0 so
// that a -inf never meets -inf (exp(-inf - -inf) would be NaN): an all -inf row gives s = 0. With
// kInfToZero, shift(+inf) = 0 too (cross-entropy: a +inf logit gives lse = +inf, as the reference);
// without it a +inf gives NaN through exp(inf - inf), as softmax's reference does.
template <bool kInfToZero>
__device__ __forceinline__ float lse_shift(float m) {
    if constexpr (kInfToZero) return isinf(m) ? 0.0f : m;
    else return m == -INFINITY ? 0.0f : m;
}

template <bool kInfToZero>
struct OnlineLse {
    float m = -INFINITY, s = 0.0f;

    // Raises the max to mn (if larger), rescaling s. While m is -inf, s only holds exp(-inf) = 0
    // or NaN terms, which no rescale changes (and exp(-mn) may overflow, so skip it).
    __device__ __forceinline__ void raise(float mn) {
        if (mn > m) {
            if (m != -INFINITY) s *= expf(lse_shift<kInfToZero>(m) - lse_shift<kInfToZero>(mn));
            m = mn;
        }
    }
    __device__ __forceinline__ void add(float x) {
        raise(x);
        s += expf(x - lse_shift<kInfToZero>(m));
    }
    __device__ __forceinline__ void add(float4 a) {
        raise(fmaxf(fmaxf(a.x, a.y), fmaxf(a.z, a.w)));
        const float sh = lse_shift<kInfToZero>(m);
        s += expf(a.x - sh);
        s += expf(a.y - sh);
        s += expf(a.z - sh);
        s += expf(a.w - sh);
    }
    // Symmetric in its two operands, so butterfly partners agree bitwise.
    __device__ __forceinline__ void merge(float m2, float s2) {
        const float mn = fmaxf(m, m2), sh = lse_shift<kInfToZero>(mn);
        const float a = m == -INFINITY ? s : s * expf(lse_shift<kInfToZero>(m) - sh);
        const float b = m2 == -INFINITY ? s2 : s2 * expf(lse_shift<kInfToZero>(m2) - sh);
        m = mn;
        s = a + b;
    }
    __device__ __forceinline__ float lse() const { return lse_shift<kInfToZero>(m) + logf(s); }
};

template <bool Z>
__device__ __forceinline__ void warp_merge(OnlineLse<Z>& st) {
#pragma unroll
    for (int o = kWarpSize / 2; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, st.m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, st.s, o);
        st.merge(m2, s2);
    }
}

// Over the whole block; every thread gets the same (m, s). `shared` holds 64 floats.
template <bool Z>
__device__ __forceinline__ void block_merge(OnlineLse<Z>& st, float* shared) {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    warp_merge(st);
    if (lane == 0) {
        shared[warp] = st.m;
        shared[32 + warp] = st.s;
    }
    __syncthreads();
    OnlineLse<Z> r;
    r.m = shared[0];
    r.s = shared[32];
    for (int w = 1; w < warps; ++w) r.merge(shared[w], shared[32 + w]);
    __syncthreads();  // `shared` may be reused
    st = r;
}

template <int TPR, bool Z>
__device__ __forceinline__ void row_merge(OnlineLse<Z>& st, float* shared) {
    if constexpr (TPR == kWarpSize) warp_merge(st);
    else block_merge(st, shared);
}

// ---- the column sum of the norms' partials -----------------------------------------------------
namespace {  // internal linkage: each .cu that includes this gets its own kernel and launcher

// out_y[c] = sum over b < P of partial_y[b * C + c] for y = blockIdx.y < kOutputs (1 or 2).
// Block (32, 32): thread (x, y) sums b = y, y + 32, ... for column blockIdx.x * 32 + x, then
// thread y = 0 adds the 32 results in order: a fixed tree, whatever the scheduling.
// (A template, so only the files that use it compile it.)
template <int kOutputs>
__global__ __launch_bounds__(1024) void sum_partials_kernel(float* __restrict__ out0,
                                                            float* __restrict__ out1,
                                                            const float* __restrict__ partial0,
                                                            const float* __restrict__ partial1,
                                                            int P, int64_t C) {
    __shared__ float sums[32][33];
    float* out = blockIdx.y == 0 ? out0 : out1;
    const float* partial = blockIdx.y == 0 ? partial0 : partial1;
    const int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x;
    float v = 0.0f;
    if (c < C)
        for (int b = threadIdx.y; b < P; b += 32) v += partial[(int64_t)b * C + c];
    sums[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float total = sums[0][threadIdx.x];
        for (int y = 1; y < 32; ++y) total += sums[y][threadIdx.x];
        out[c] = total;
    }
}

// Host: out0 (and out1 when given) = column sums of the P partials of shape (P, C).
template <int = 0>  // compiled only where used
void sum_partials(float* out0, float* out1, const float* partial0, const float* partial1,
                         int64_t P, int64_t C, cudaStream_t stream) {
    const unsigned blocks = (unsigned)ceil_div(C, 32);
    if (out1)
        sum_partials_kernel<2><<<dim3(blocks, 2), dim3(32, 32), 0, stream>>>(out0, out1, partial0,
                                                                            partial1, (int)P, C);
    else
        sum_partials_kernel<1><<<dim3(blocks, 1), dim3(32, 32), 0, stream>>>(out0, out1, partial0,
                                                                            partial1, (int)P, C);
    LLMCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace

#endif  // __CUDACC__

}  // namespace llmcore::cuda
