// attention: fused scaled-dot-product attention on the GPU, forward and backward, causal or not,
// MHA/GQA/MQA, ALiBi, q/k/v read through their strides. FlashAttention-2's algorithm in float32
// on the CUDA cores (exact FMA, no tensor cores); the math is python/llmcore/reference/attention.py.
//
// Nothing of size T x S is ever stored: keys are visited in tiles, the softmax is computed online
// (a running max m and sum l per query row) and the backward recomputes each tile's
// probabilities from the saved lse = m + log(l).
//
// Rows. The H/Hkv = G query heads that share a kv head read the same keys, so both passes work on
// the G*T "packed rows" of one (batch, kv head), query-position major: row R is query position
// i = R / G of head h = hk*G + R % G (FlashAttention's "pack GQA"). A query tile therefore holds
// G heads x BQ/G positions and every K/V tile it loads serves all of them: GQA/MQA cost no extra
// K/V traffic, and decoding (T = 1) still fills a tile with the G heads' rows. With G = 1 the rows
// are plain query positions. Query i sits at key position pos = S - T + i; causal hides key j > pos.
//
// Thread tiles. A block is BQ/RT row groups (ty) x 16 column groups (tx), RT = 4 rows per thread
// (8 in the forward at DP = 128, see forward_rows_per_thread); a warp holds two row groups, so
// the 16 threads sharing a row are 16 consecutive lanes and row reductions are 4 xor-shuffles.
// Every product is a register tile of RT rows per thread:
//   scores (BQ x BK): rows ty*4..ty*4+3, keys tx + 16*jj        (strided: conflict-free K reads)
//   output (BQ x DP): rows ty*4..ty*4+3, columns c*16*VW + tx*VW + u (runs of VW = 4 floats)
// (with RT = 8 also rows 32 + ty*4..ty*4+3).
// Shared tiles are row-major with 4 floats of padding per row (row stride = 4 mod 32 banks): the
// float4 reads of 8 different rows (a quarter warp) hit 8 different bank quads, and the two row
// groups of a warp read rows 4 apart, which land 16 banks apart. The head dimension is padded to
// DP in {32, 64, 128, 256} with zeros in shared memory (never read or written past D in global
// memory): D <= 32 runs the DP = 32 kernels, 33..64 the DP = 64 ones, and so on.
//
// Instances (rows x keys per tile, threads; shared memory at DP = 32 / 64 / 128 / 256):
//   forward, > 32 packed rows   64 x 64 (DP <= 64) or 64 x 32, 256 threads
//                               (128 threads x 8 rows at DP = 128);        45 / 69 / 76 / 140 KiB
//   forward, <= 32 (decoding)   16 x 32, 64 threads;                        14 / 24 / 44 / 84 KiB
//   backward                    64 x 64, 256 threads (DP <= 64)            71 / 103 KiB
//                               32 x 32, 128 threads (DP >= 128)           76 / 140 KiB
//
// Loads use cp.async (sm_80+): 16-byte copies when the host has checked that every row start is
// 16-byte aligned and D % 4 == 0, else 4-byte copies; rows past the end and columns past D are
// zero-filled by the copy itself. The forward overlaps loads with math using one buffer per
// tile: V(t) streams in while S = Q K(t)^T is computed, K(t+1) while O += P V(t) is.
//
// Forward, one block per (query tile, batch x kv head, key split):
//   for each key tile the tile's rows can see (tiles above the causal diagonal are skipped):
//     S = Q K^T (registers) -> scale, ALiBi, mask -> row max (shuffles) -> P = exp(S - m) (shared)
//     O = O * exp(m_old - m) + P V (registers); l likewise, kept per thread and summed at the end
//   out = O / l, lse = m + log(l).
// A row whose every score so far is -inf (a fully masked tile) uses 0 instead of m as the
// exponent's reference, so exp(-inf - ref) = 0 and nothing computes (-inf) - (-inf).
// Split-KV (decoding, small batches): when the blocks above would be fewer than two per SM, the
// key tiles of a query tile are split over nsplit blocks (about four blocks per SM, at least two
// key tiles per split, at most 64 splits), each writing its unnormalised (O, m, l) to the
// workspace; a combine kernel (a warp per row) rescales and sums them. Decoding also uses the
// small tile (16 rows, 32 keys, 64 threads) so that one query row per head wastes little work.
//
// Backward, FlashAttention-2: delta_i = dout_i . out_i (a warp per row, into the workspace), then
// one block per (key tile, batch x kv head, query split), square BB x BB tiles:
//   K, V tiles stay in shared memory; dK, dV accumulate in registers. For every query tile that
//   sees the key tile (all G heads of the group are in the packed rows: the GQA reduction happens
//   in the tile, K/V are never expanded):
//     S = Q K^T, dP = dO V^T          (registers; rows ty*4.., keys tx + 16*jj)
//     P = exp(S - lse), dS = P (dP - delta) scale   (zero where masked; to shared memory)
//     dV += P^T dO,  dK += dS^T Q     (registers; key rows ty*4.., columns as the output above)
//     dQ += dS K                       (registers, then float atomicAdd into dq)
//   dq is zeroed first (cudaMemsetAsync) and collects every key tile's share with atomics, as in
//   FlashAttention-2: no second pass recomputing S and dP, at the price of a non-deterministic
//   summation order in dq. dk, dv are written once by their block (every key row, zero where no
//   query sees it), except when a small problem (fewer than two blocks per SM) splits the query
//   tiles of a key tile over several blocks: then dk, dv are zeroed and also collected with
//   atomics.
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "kernels.cuh"

namespace llmcore::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Small device helpers

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// Asynchronous global -> shared copies. With valid false nothing is read (src-size 0) and the
// destination is zero-filled; src must still be a legal address, so callers pass the tensor base.
__device__ __forceinline__ void cp_async16(float* dst, const float* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d),
                 "l"(__cvta_generic_to_global(src)), "r"(valid ? 16 : 0)
                 : "memory");
#else
    *reinterpret_cast<float4*>(dst) =
        valid ? *reinterpret_cast<const float4*>(src) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#endif
}

__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d),
                 "l"(__cvta_generic_to_global(src)), "r"(valid ? 4 : 0)
                 : "memory");
#else
    *dst = valid ? *src : 0.0f;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits for every copy this thread issued; a __syncthreads() after it publishes them to the block.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Stages BR rows of a (rows x D) operand into shared memory as BR x DP floats (row stride DP + 4).
// row(r) gives the global address of row r, or nullptr for a row past the end. Rows past the end
// and columns D..DP-1 are zero-filled, so padded entries are exact zeros in every product.
// vec: 16-byte copies (host-checked: every row start 16-byte aligned and D % 4 == 0), else 4-byte.
// Consecutive threads copy consecutive pieces of a row: coalesced reads, conflict-free writes.
template <int BR, int DP, int NT, typename RowFn>
__device__ __forceinline__ void stage_rows(float* dst, RowFn row, int D, bool vec,
                                           const float* dummy) {
    constexpr int LD = DP + 4;
    if (vec) {
        constexpr int CH = DP / 4, N = BR * CH;
#pragma unroll
        for (int e0 = 0; e0 < N; e0 += NT) {
            const int e = e0 + (int)threadIdx.x;
            if (N % NT == 0 || e < N) {
                const int r = e / CH, c = 4 * (e % CH);
                const float* src = row(r);
                const bool ok = src != nullptr && c < D;
                cp_async16(dst + r * LD + c, ok ? src + c : dummy, ok);
            }
        }
    } else {
        constexpr int N = BR * DP;
#pragma unroll 4
        for (int e0 = 0; e0 < N; e0 += NT) {
            const int e = e0 + (int)threadIdx.x;
            if (N % NT == 0 || e < N) {
                const int r = e / DP, c = e % DP;
                const float* src = row(r);
                const bool ok = src != nullptr && c < D;
                cp_async4(dst + r * LD + c, ok ? src + c : dummy, ok);
            }
        }
    }
}

// Shared-memory vector loads into registers (the address is a multiple of W floats).
__device__ __forceinline__ void ld4(float (&x)[4], const float* p) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    x[0] = t.x, x[1] = t.y, x[2] = t.z, x[3] = t.w;
}

template <int W>
__device__ __forceinline__ void ldv(float (&x)[W], const float* p) {
    if constexpr (W == 4) {
        ld4(x, p);
    } else if constexpr (W == 2) {
        const float2 t = *reinterpret_cast<const float2*>(p);
        x[0] = t.x, x[1] = t.y;
    } else {
        x[0] = p[0];
    }
}

// Sum / max over the 16 lanes that share a row group (lanes 0-15 or 16-31 of the warp). Every
// thread of the warp must call these together.
__device__ __forceinline__ float group16_sum(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float group16_max(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The scaled, ALiBi-biased score (rel = pos_i - j), written once for the forward and the
// backward. Both compute qk with the same FMA chain (d = 0, 1, ...) and these two explicitly
// rounded steps (no contraction), so the backward's exp(score - lse) sees bitwise the forward's
// score. With no ALiBi the slope is 0 and the second step adds -0.
__device__ __forceinline__ float biased_score(float qk, float scale, float slope, int rel) {
    return __fmaf_rn(-slope, fabsf((float)rel), __fmul_rn(qk, scale));
}

// Writes columns c*16*VW + tx*VW + u (u < VW, c < NC) of one row, times f; columns >= D are
// skipped. vec: 16-byte stores (host-checked: row start 16-byte aligned, D % 4 == 0).
template <int VW, int NC>
__device__ __forceinline__ void store_cols(float* row, const float* vals, float f, int D, int tx,
                                           bool vec) {
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const int col = c * 16 * VW + tx * VW;
        if (VW == 4 && vec) {
            if (col < D)
                *reinterpret_cast<float4*>(row + col) =
                    make_float4(vals[c * VW] * f, vals[c * VW + 1] * f, vals[c * VW + 2] * f,
                                vals[c * VW + 3] * f);
        } else {
#pragma unroll
            for (int u = 0; u < VW; ++u)
                if (col + u < D) row[col + u] = vals[c * VW + u] * f;
        }
    }
}

template <int VW, int NC>
__device__ __forceinline__ void atomic_add_cols(float* row, const float* vals, int D, int tx) {
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int u = 0; u < VW; ++u) {
            const int col = c * 16 * VW + tx * VW + u;
            if (col < D) atomicAdd(row + col, vals[c * VW + u]);
        }
}

// ---------------------------------------------------------------------------------------------
// Forward

struct FwdParams {
    float* out;     // (B, T, H, D)
    float* lse;     // (B, H, T)
    float* part_o;  // nsplit > 1: (nsplit, B*Hkv*GT, D) unnormalised O of each split
    float* part_m;  //              (nsplit, B*Hkv*GT) running max (-inf: the split saw no key)
    float* part_l;  //              (nsplit, B*Hkv*GT) sum of exp(score - m)
    const float *q, *k, *v, *alibi;
    int64_t qs[3], ks[3], vs[3];  // element strides (batch, seq, head)
    int B, T, S, H, Hkv, D, G, GT;  // G = H / Hkv; GT = G*T packed rows per (batch, kv head)
    int ntiles, nsplit;             // query tiles per (batch, kv head); key splits
    float scale;
    bool causal;
    bool vec_in;   // q, k, v rows 16-byte aligned and D % 4 == 0
    bool vec_out;  // out (or part_o) rows 16-byte aligned
};

// Shared memory: Qs (BQ x DP+4), Ks and Vs (BK x DP+4), Ps (BQ x BK+4), and per query row its
// ALiBi slope and key position (BQ each; the position is an int).
template <int BQ, int BK, int DP>
constexpr size_t forward_smem_bytes() {
    return sizeof(float) * ((size_t)(BQ + 2 * BK) * (DP + 4) + (size_t)BQ * (BK + 4) + 2 * BQ);
}

// Rows per thread RT: 4, or 8 where a 4 x BK/16 score tile would make the S = Q K^T loop wait
// on shared memory. At DP = 128 (64 x 32 tiles) a warp's float4 step is 4 Q loads (one
// wavefront each, broadcast) + 2 K loads (two each) for 32 FMAs: shared memory saturates when
// the FMA pipes do. With 8 rows it is 8 + 4 wavefronts for 64 FMAs.
template <int BQ, int DP>
__host__ __device__ constexpr int forward_rows_per_thread() {
    return BQ == 64 && DP == 128 ? 8 : 4;
}

// Blocks per SM the register allocation must allow. 64-row tiles: two where shared memory fits
// two (DP <= 128); at DP = 256 (139 KiB) one fits, so it may use all 255 registers instead of
// spilling. 64-thread decoding tiles: eight up to DP = 64 (the kernel is memory-bound and needs
// many blocks in flight); above, shared memory limits them anyway.
template <int BQ, int DP>
__host__ __device__ constexpr int forward_min_blocks() {
    return BQ == 64 ? (DP <= 128 ? 2 : 1) : (DP <= 64 ? 8 : 1);
}

template <int BQ, int BK, int DP>
__host__ __device__ constexpr int forward_threads() {
    return BQ / forward_rows_per_thread<BQ, DP>() * 16;
}

template <int BQ, int BK, int DP>
__global__ void __launch_bounds__(forward_threads<BQ, BK, DP>(), forward_min_blocks<BQ, DP>())
    attention_forward_kernel(const FwdParams p) {
    constexpr int RT = forward_rows_per_thread<BQ, DP>();  // rows per thread: RT/4 quads
    constexpr int NTY = BQ / RT;         // row groups
    constexpr int NT = NTY * 16;         // NTY row groups x 16 column groups
    constexpr int NJ = BK / 16;          // score columns per thread: keys tx + 16*jj
    constexpr int OW = DP / 16;          // output columns per thread ...
    constexpr int VW = OW < 4 ? OW : 4;  // ... in NC runs of VW contiguous floats
    constexpr int NC = OW / VW;
    constexpr int LD = DP + 4, LDP = BK + 4;
    static_assert(BQ % (2 * RT) == 0 && RT % 4 == 0 && BK % 16 == 0 && DP % 32 == 0, "tile shape");
    // Row ii of this thread: quad ii/4 of the tile's RT/4 horizontal bands, row ii%4 of the
    // thread's quad in it. With RT = 4 that is simply ty*4 + ii; with RT = 8, rows ty*4 + (0..3)
    // and 32 + ty*4 + (0..3). Either way the two row groups of a warp read rows 4 apart (16
    // banks apart), as the header describes.
    auto row_of = [](int ty, int ii) { return (ii / 4) * (4 * NTY) + ty * 4 + ii % 4; };

    extern __shared__ float4 smem4[];
    float* Qs = reinterpret_cast<float*>(smem4);  // (BQ, LD)  query rows
    float* Ks = Qs + BQ * LD;                     // (BK, LD)  key rows
    float* Vs = Ks + BK * LD;                     // (BK, LD)  value rows
    float* Ps = Vs + BK * LD;                     // (BQ, LDP) probabilities of the tile
    float* Slp = Ps + BQ * LDP;                   // (BQ)      ALiBi slope of each row
    int* Pos = reinterpret_cast<int*>(Slp + BQ);  // (BQ)      key position S - T + i

    const int tid = (int)threadIdx.x, ty = tid / 16, tx = tid % 16;
    const int G = p.G, GT = p.GT, S = p.S, T = p.T, H = p.H, D = p.D;
    const int BHkv = p.B * p.Hkv;

    // blockIdx.x = (tile from the last, batch x kv head, split): the last query tiles see the
    // most keys under causal masking, so they start first.
    int64_t bid = blockIdx.x;
    const int split = (int)(bid % p.nsplit);
    bid /= p.nsplit;
    const int bh = (int)(bid % BHkv);
    const int tile = p.ntiles - 1 - (int)(bid / BHkv);
    const int b = bh / p.Hkv, hk = bh % p.Hkv;
    const int R0 = tile * BQ, nrows = imin(BQ, GT - R0);
    const int off = S - T;  // key position of query 0

    // Keys [0, kend) are visible to some row of the tile; its last row has the largest position.
    const int kend = p.causal ? imin(S, off + (R0 + nrows - 1) / G + 1) : S;
    const int nkt = kend > 0 ? (kend + BK - 1) / BK : 0;
    const int per_split = (nkt + p.nsplit - 1) / p.nsplit;
    const int kt0 = imin(nkt, split * per_split), kt1 = imin(nkt, kt0 + per_split);

    // Key position and ALiBi slope of every row, in shared memory rather than registers (read
    // once per key tile; published by the loop's first barrier). Padding rows borrow the last
    // real row: they compute like it and are never written out.
    for (int r = tid; r < BQ; r += NT) {
        const int R = imin(R0 + r, GT - 1);
        Pos[r] = off + R / G;
        Slp[r] = p.alibi ? p.alibi[hk * G + R % G] : 0.0f;
    }

    const float* qb = p.q + (int64_t)b * p.qs[0];
    const float* kb = p.k + (int64_t)b * p.ks[0] + (int64_t)hk * p.ks[2];
    const float* vb = p.v + (int64_t)b * p.vs[0] + (int64_t)hk * p.vs[2];
    auto q_row = [&](int r) -> const float* {
        const int R = R0 + r;
        if (R >= GT) return nullptr;
        return qb + (int64_t)(R / G) * p.qs[1] + (int64_t)(hk * G + R % G) * p.qs[2];
    };
    // Rows j0.. of K or V (nullptr past S).
    auto key_rows = [S](const float* base, int64_t stride, int j0) {
        return [=](int r) -> const float* {
            return j0 + r < S ? base + (int64_t)(j0 + r) * stride : nullptr;
        };
    };

    float m[RT], l[RT], acc[RT][OW];  // running max, this thread's part of the sum, O
#pragma unroll
    for (int ii = 0; ii < RT; ++ii) {
        m[ii] = -INFINITY;
        l[ii] = 0.0f;
#pragma unroll
        for (int c = 0; c < OW; ++c) acc[ii][c] = 0.0f;
    }

    if (kt0 < kt1) {
        stage_rows<BQ, DP, NT>(Qs, q_row, D, p.vec_in, p.q);
        stage_rows<BK, DP, NT>(Ks, key_rows(kb, p.ks[1], kt0 * BK), D, p.vec_in, p.k);
        cp_async_commit();
    }
    for (int kt = kt0; kt < kt1; ++kt) {
        const int j0 = kt * BK;
        // K(kt) (and Q) have landed; every thread is done with Vs and Ps of the previous tile.
        cp_async_wait_all();
        __syncthreads();
        stage_rows<BK, DP, NT>(Vs, key_rows(vb, p.vs[1], j0), D, p.vec_in, p.v);
        cp_async_commit();

        // S (RT x NJ per thread) = Q K^T over the padded head dimension.
        float s[RT][NJ];
#pragma unroll
        for (int ii = 0; ii < RT; ++ii)
#pragma unroll
            for (int jj = 0; jj < NJ; ++jj) s[ii][jj] = 0.0f;
#pragma unroll 8
        for (int d = 0; d < DP; d += 4) {
            float qv[RT][4], kv[NJ][4];
#pragma unroll
            for (int ii = 0; ii < RT; ++ii) ld4(qv[ii], Qs + row_of(ty, ii) * LD + d);
#pragma unroll
            for (int jj = 0; jj < NJ; ++jj) ld4(kv[jj], Ks + (tx + 16 * jj) * LD + d);
#pragma unroll
            for (int ii = 0; ii < RT; ++ii)
#pragma unroll
                for (int jj = 0; jj < NJ; ++jj)
#pragma unroll
                    for (int u = 0; u < 4; ++u) s[ii][jj] = fmaf(qv[ii][u], kv[jj][u], s[ii][jj]);
        }

        // Scale, ALiBi and the mask (keys past S, and past the row's position when causal), then
        // the online softmax. The mask is a select, so garbage never leaks through arithmetic.
#pragma unroll
        for (int ii = 0; ii < RT; ++ii) {
            const int pos = Pos[row_of(ty, ii)];
            const float slope = Slp[row_of(ty, ii)];
            float mx = -INFINITY;
#pragma unroll
            for (int jj = 0; jj < NJ; ++jj) {
                const int j = j0 + tx + 16 * jj;
                const bool ok = j < S && (!p.causal || j <= pos);
                const float x = ok ? biased_score(s[ii][jj], p.scale, slope, pos - j) : -INFINITY;
                s[ii][jj] = x;
                mx = fmaxf(mx, x);
            }
            mx = group16_max(mx);
            const float mnew = fmaxf(m[ii], mx);
            const float ref = mnew == -INFINITY ? 0.0f : mnew;  // see the header: no -inf - -inf
            const float alpha = expf(m[ii] - ref);               // 0 while the row had nothing
            m[ii] = mnew;
            l[ii] *= alpha;
#pragma unroll
            for (int c = 0; c < OW; ++c) acc[ii][c] *= alpha;
#pragma unroll
            for (int jj = 0; jj < NJ; ++jj) {
                const float e = expf(s[ii][jj] - ref);
                l[ii] += e;
                Ps[row_of(ty, ii) * LDP + tx + 16 * jj] = e;
            }
        }

        // V(kt) has landed and Ps is complete; every thread is done with Ks.
        cp_async_wait_all();
        __syncthreads();
        if (kt + 1 < kt1) {
            stage_rows<BK, DP, NT>(Ks, key_rows(kb, p.ks[1], j0 + BK), D, p.vec_in, p.k);
            cp_async_commit();
        }

        // O (RT x OW per thread) += P V.
#pragma unroll 4
        for (int j = 0; j < BK; j += 4) {
            float pr[RT][4];
#pragma unroll
            for (int ii = 0; ii < RT; ++ii) ld4(pr[ii], Ps + row_of(ty, ii) * LDP + j);
#pragma unroll
            for (int x = 0; x < 4; ++x) {
#pragma unroll
                for (int c = 0; c < NC; ++c) {
                    float vv[VW];
                    ldv<VW>(vv, Vs + (j + x) * LD + c * 16 * VW + tx * VW);
#pragma unroll
                    for (int ii = 0; ii < RT; ++ii)
#pragma unroll
                        for (int u = 0; u < VW; ++u)
                            acc[ii][c * VW + u] = fmaf(pr[ii][x], vv[u], acc[ii][c * VW + u]);
                }
            }
        }
    }

    // Epilogue: the row sums (one shuffle reduction per row for the whole pass), then either the
    // normalised output and lse, or this split's partial (O, m, l) for the combine kernel.
    float lt[RT];
#pragma unroll
    for (int ii = 0; ii < RT; ++ii) lt[ii] = group16_sum(l[ii]);
    const int64_t rows_all = (int64_t)BHkv * GT;
#pragma unroll
    for (int ii = 0; ii < RT; ++ii) {
        const int R = R0 + row_of(ty, ii);
        if (R >= GT) continue;
        if (p.nsplit == 1) {
            const int i = R / G, h = hk * G + R % G;
            const float ref = m[ii] == -INFINITY ? 0.0f : m[ii];
            float* orow = p.out + (((int64_t)b * T + i) * H + h) * D;
            store_cols<VW, NC>(orow, acc[ii], 1.0f / lt[ii], D, tx, p.vec_out);
            if (tx == 0) p.lse[((int64_t)b * H + h) * T + i] = ref + logf(lt[ii]);
        } else {
            const int64_t prow = (int64_t)split * rows_all + (int64_t)bh * GT + R;
            store_cols<VW, NC>(p.part_o + prow * D, acc[ii], 1.0f, D, tx, p.vec_out);
            if (tx == 0) {
                p.part_m[prow] = m[ii];
                p.part_l[prow] = lt[ii];
            }
        }
    }
}

// Combines the nsplit partials of every packed row: one warp per row. Splits whose max is -inf
// saw no key of the row and are skipped (their O is never read).
__global__ void attention_combine_kernel(float* out, float* lse, const float* part_o,
                                         const float* part_m, const float* part_l, int T, int H,
                                         int Hkv, int G, int D, int nsplit, int64_t rows_all) {
    const int lane = (int)threadIdx.x % kWarpSize;
    const int64_t nwarps = (int64_t)gridDim.x * blockDim.x / kWarpSize;
    const int GT = G * T;
    for (int64_t rg = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize; rg < rows_all;
         rg += nwarps) {
        float M = -INFINITY;
        for (int s = lane; s < nsplit; s += kWarpSize) M = fmaxf(M, part_m[s * rows_all + rg]);
        M = warp_max(M);
        float L = 0.0f;
        for (int s = lane; s < nsplit; s += kWarpSize) {
            const float ms = part_m[s * rows_all + rg];
            if (ms != -INFINITY) L += expf(ms - M) * part_l[s * rows_all + rg];
        }
        L = warp_sum(L);
        const int64_t bh = rg / GT;
        const int R = (int)(rg % GT);
        const int64_t b = bh / Hkv;
        const int hk = (int)(bh % Hkv), i = R / G, h = hk * G + R % G;
        float* orow = out + ((b * T + i) * H + h) * D;
        const float inv = 1.0f / L;
        for (int d = lane; d < D; d += kWarpSize) {
            float o = 0.0f;
            for (int s = 0; s < nsplit; ++s) {
                const float ms = part_m[s * rows_all + rg];
                if (ms != -INFINITY) o += expf(ms - M) * part_o[(s * rows_all + rg) * D + d];
            }
            orow[d] = o * inv;
        }
        if (lane == 0) lse[(b * H + h) * T + i] = M + logf(L);
    }
}

__global__ void fill_kernel(float* x, int64_t n, float value) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = value;
}

// ---------------------------------------------------------------------------------------------
// Backward

// delta (B, H, T) = rowsum(dout * out): one warp per row of dout, rows in (b, t, h) order.
__global__ void attention_delta_kernel(float* delta, const float* dout, const float* out,
                                       int64_t rows, int T, int H, int D) {
    const int lane = (int)threadIdx.x % kWarpSize;
    const int64_t nwarps = (int64_t)gridDim.x * blockDim.x / kWarpSize;
    for (int64_t r = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize; r < rows;
         r += nwarps) {
        const float* a = dout + r * D;
        const float* o = out + r * D;
        float sum = 0.0f;
        for (int d = lane; d < D; d += kWarpSize) sum = fmaf(a[d], o[d], sum);
        sum = warp_sum(sum);
        if (lane == 0) {
            const int64_t h = r % H, t = r / H % T, b = r / ((int64_t)H * T);
            delta[(b * H + h) * T + t] = sum;
        }
    }
}

struct BwdParams {
    float *dq, *dk, *dv;  // dq (B,T,H,D) zeroed by the launcher; dk, dv (B,S,Hkv,D)
    const float *dout, *q, *k, *v, *lse, *delta, *alibi;
    int64_t qs[3], ks[3], vs[3];
    int B, T, S, H, Hkv, D, G, GT;
    int nsplit;  // blocks sharing the query tiles of one key tile
    float scale;
    bool causal;
    bool vec_in;      // q, k, v rows 16-byte aligned and D % 4 == 0
    bool vec_do;      // dout rows 16-byte aligned
    bool vec_dkv;     // dk and dv rows 16-byte aligned
    bool atomic_dkv;  // nsplit > 1: dk, dv were zeroed and collect with atomics
};

// Shared memory: Ks, Vs, Qs, dOs (BB x DP+4), Ps, dSs (BB x BB+4), and per query row of the
// tile its lse, delta, ALiBi slope and key position (BB each; the position is an int).
template <int BB, int DP>
constexpr size_t backward_smem_bytes() {
    return sizeof(float) * ((size_t)4 * BB * (DP + 4) + (size_t)2 * BB * (BB + 4) + 4 * BB);
}

// Two 256-thread blocks per SM at BB = 64 (2 x 103 KiB of shared memory, 128 registers each).
template <int BB, int DP>
__global__ void __launch_bounds__(4 * BB, BB == 64 ? 2 : 1)
    attention_backward_kernel(const BwdParams p) {
    constexpr int NT = 4 * BB;           // BB/4 row groups x 16 column groups
    constexpr int NJ = BB / 16;          // score columns per thread: keys tx + 16*jj
    constexpr int OW = DP / 16;          // dK/dV/dQ columns per thread ...
    constexpr int VW = OW < 4 ? OW : 4;  // ... in NC runs of VW contiguous floats
    constexpr int NC = OW / VW;
    constexpr int DQC = NC < 2 ? NC : 2;  // column runs of dQ per pass (bounds registers at DP 256)
    constexpr int LD = DP + 4, LDP = BB + 4;
    static_assert(BB % 16 == 0 && DP % 32 == 0 && NC % DQC == 0, "tile shape");

    extern __shared__ float4 smem4[];
    float* Ks = reinterpret_cast<float*>(smem4);  // (BB, LD)  key rows of the block
    float* Vs = Ks + BB * LD;                     // (BB, LD)  value rows
    float* Qs = Vs + BB * LD;                     // (BB, LD)  query rows of the current tile
    float* dOs = Qs + BB * LD;                    // (BB, LD)  dout rows
    float* Ps = dOs + BB * LD;                    // (BB, LDP) P      [query][key]
    float* dSs = Ps + BB * LDP;                   // (BB, LDP) dS     [query][key]
    float* Ls = dSs + BB * LDP;                   // (BB)      lse of the tile's rows
    float* Dls = Ls + BB;                         // (BB)      delta
    float* Slp = Dls + BB;                        // (BB)      ALiBi slope
    int* Pos = reinterpret_cast<int*>(Slp + BB);  // (BB)      key position S - T + i

    const int tid = (int)threadIdx.x, ty = tid / 16, tx = tid % 16;
    const int G = p.G, GT = p.GT, S = p.S, T = p.T, H = p.H, D = p.D;
    const int BHkv = p.B * p.Hkv;

    // blockIdx.x = (key tile, batch x kv head, split): the first key tiles are seen by the most
    // queries under causal masking, so they start first.
    int64_t bid = blockIdx.x;
    const int split = (int)(bid % p.nsplit);
    bid /= p.nsplit;
    const int bh = (int)(bid % BHkv);
    const int kt = (int)(bid / BHkv);
    const int b = bh / p.Hkv, hk = bh % p.Hkv;
    const int j0 = kt * BB;
    const int off = S - T;

    // The first packed row that sees key j0 is position j0 - off, head 0 of the group; every
    // later row sees it too (positions only grow with R).
    const int nqt = (GT + BB - 1) / BB;
    const int64_t i_first = p.causal ? (int64_t)imax(0, j0 - off) : 0;
    const int64_t r_first = i_first * G;  // may pass GT only for causal S < T (rejected upstream)
    const int qt_first = r_first >= GT ? nqt : (int)(r_first / BB);
    if (p.atomic_dkv && qt_first + split >= nqt) return;  // nothing to add (dk, dv are zeroed)

    const float* qb = p.q + (int64_t)b * p.qs[0];
    const float* kb = p.k + (int64_t)b * p.ks[0] + (int64_t)hk * p.ks[2];
    const float* vb = p.v + (int64_t)b * p.vs[0] + (int64_t)hk * p.vs[2];
    auto key_rows = [S, j0](const float* base, int64_t stride) {
        return [=](int r) -> const float* {
            return j0 + r < S ? base + (int64_t)(j0 + r) * stride : nullptr;
        };
    };
    stage_rows<BB, DP, NT>(Ks, key_rows(kb, p.ks[1]), D, p.vec_in, p.k);
    stage_rows<BB, DP, NT>(Vs, key_rows(vb, p.vs[1]), D, p.vec_in, p.v);
    cp_async_commit();

    float dk_acc[4][OW], dv_acc[4][OW];  // key rows ty*4 + a of the block
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < OW; ++c) dk_acc[a][c] = dv_acc[a][c] = 0.0f;

    for (int qt = qt_first + split; qt < nqt; qt += p.nsplit) {
        const int R0 = qt * BB;
        auto q_row = [&](int r) -> const float* {
            const int R = R0 + r;
            if (R >= GT) return nullptr;
            return qb + (int64_t)(R / G) * p.qs[1] + (int64_t)(hk * G + R % G) * p.qs[2];
        };
        auto do_row = [&](int r) -> const float* {
            const int R = R0 + r;
            if (R >= GT) return nullptr;
            return p.dout + (((int64_t)b * T + R / G) * H + hk * G + R % G) * D;
        };
        stage_rows<BB, DP, NT>(Qs, q_row, D, p.vec_in, p.q);
        stage_rows<BB, DP, NT>(dOs, do_row, D, p.vec_do, p.dout);
        cp_async_commit();
        // Per-row values in shared memory rather than registers, which the dK/dV accumulators
        // need (padding rows borrow the last real row; their P and dS are zeroed below).
        if (tid < BB) {
            const int R = imin(R0 + tid, GT - 1);
            const int i = R / G, h = hk * G + R % G;
            const int64_t idx = ((int64_t)b * H + h) * T + i;
            Ls[tid] = p.lse[idx];
            Dls[tid] = p.delta[idx];
            Slp[tid] = p.alibi ? p.alibi[h] : 0.0f;
            Pos[tid] = off + i;
        }
        // The tile's Q, dO (and at the first tile K, V) have landed; the row values are stored.
        cp_async_wait_all();
        __syncthreads();

        // S = Q K^T and dP = dO V^T (4 x NJ each per thread), the same FMA chains as the forward.
        {
            float s[4][NJ], dp[4][NJ];
#pragma unroll
            for (int ii = 0; ii < 4; ++ii)
#pragma unroll
                for (int jj = 0; jj < NJ; ++jj) s[ii][jj] = dp[ii][jj] = 0.0f;
#pragma unroll 4
            for (int d = 0; d < DP; d += 4) {
                float qv[4][4], kv[NJ][4];
#pragma unroll
                for (int ii = 0; ii < 4; ++ii) ld4(qv[ii], Qs + (ty * 4 + ii) * LD + d);
#pragma unroll
                for (int jj = 0; jj < NJ; ++jj) ld4(kv[jj], Ks + (tx + 16 * jj) * LD + d);
#pragma unroll
                for (int ii = 0; ii < 4; ++ii)
#pragma unroll
                    for (int jj = 0; jj < NJ; ++jj)
#pragma unroll
                        for (int u = 0; u < 4; ++u)
                            s[ii][jj] = fmaf(qv[ii][u], kv[jj][u], s[ii][jj]);
            }
#pragma unroll 4
            for (int d = 0; d < DP; d += 4) {
                float ov[4][4], vv[NJ][4];
#pragma unroll
                for (int ii = 0; ii < 4; ++ii) ld4(ov[ii], dOs + (ty * 4 + ii) * LD + d);
#pragma unroll
                for (int jj = 0; jj < NJ; ++jj) ld4(vv[jj], Vs + (tx + 16 * jj) * LD + d);
#pragma unroll
                for (int ii = 0; ii < 4; ++ii)
#pragma unroll
                    for (int jj = 0; jj < NJ; ++jj)
#pragma unroll
                        for (int u = 0; u < 4; ++u)
                            dp[ii][jj] = fmaf(ov[ii][u], vv[jj][u], dp[ii][jj]);
            }
            // P = exp(score - lse) and dS = P (dP - delta) scale; exact zeros where masked, past
            // S or on padding rows, so the products below need no masks.
#pragma unroll
            for (int ii = 0; ii < 4; ++ii) {
                const int r = ty * 4 + ii, pos = Pos[r];
                const bool live = R0 + r < GT;
                const float lv = Ls[r], dl = Dls[r], slope = Slp[r];
#pragma unroll
                for (int jj = 0; jj < NJ; ++jj) {
                    const int j = j0 + tx + 16 * jj;
                    const bool ok = live && j < S && (!p.causal || j <= pos);
                    const float pv =
                        ok ? expf(biased_score(s[ii][jj], p.scale, slope, pos - j) - lv) : 0.0f;
                    const float ds = ok ? pv * (dp[ii][jj] - dl) * p.scale : 0.0f;
                    Ps[(ty * 4 + ii) * LDP + tx + 16 * jj] = pv;
                    dSs[(ty * 4 + ii) * LDP + tx + 16 * jj] = ds;
                }
            }
        }
        __syncthreads();  // P and dS complete

        // dV += P^T dO and dK += dS^T Q: key rows ty*4 + a, columns c*16*VW + tx*VW + u.
#pragma unroll 2
        for (int r = 0; r < BB; ++r) {
            float pk[4], dsk[4];
            ld4(pk, Ps + r * LDP + ty * 4);
            ld4(dsk, dSs + r * LDP + ty * 4);
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                float ov[VW], qv[VW];
                ldv<VW>(ov, dOs + r * LD + c * 16 * VW + tx * VW);
                ldv<VW>(qv, Qs + r * LD + c * 16 * VW + tx * VW);
#pragma unroll
                for (int a = 0; a < 4; ++a)
#pragma unroll
                    for (int u = 0; u < VW; ++u) {
                        dv_acc[a][c * VW + u] = fmaf(pk[a], ov[u], dv_acc[a][c * VW + u]);
                        dk_acc[a][c * VW + u] = fmaf(dsk[a], qv[u], dk_acc[a][c * VW + u]);
                    }
            }
        }

        // dQ += dS K: query rows ty*4 + ii, DQC column runs at a time, added into dq. Rows whose
        // position is before j0 have dS = 0 on this whole tile and are skipped.
#pragma unroll
        for (int c0 = 0; c0 < NC; c0 += DQC) {
            float dqa[4][DQC * VW];
#pragma unroll
            for (int ii = 0; ii < 4; ++ii)
#pragma unroll
                for (int c = 0; c < DQC * VW; ++c) dqa[ii][c] = 0.0f;
#pragma unroll 2
            for (int j = 0; j < BB; j += 4) {
                float ds4[4][4];
#pragma unroll
                for (int ii = 0; ii < 4; ++ii) ld4(ds4[ii], dSs + (ty * 4 + ii) * LDP + j);
#pragma unroll
                for (int x = 0; x < 4; ++x) {
#pragma unroll
                    for (int cc = 0; cc < DQC; ++cc) {
                        float kv[VW];
                        ldv<VW>(kv, Ks + (j + x) * LD + (c0 + cc) * 16 * VW + tx * VW);
#pragma unroll
                        for (int ii = 0; ii < 4; ++ii)
#pragma unroll
                            for (int u = 0; u < VW; ++u)
                                dqa[ii][cc * VW + u] =
                                    fmaf(ds4[ii][x], kv[u], dqa[ii][cc * VW + u]);
                    }
                }
            }
#pragma unroll
            for (int ii = 0; ii < 4; ++ii) {
                const int R = R0 + ty * 4 + ii;
                if (R >= GT || (p.causal && Pos[ty * 4 + ii] < j0)) continue;
                float* dqrow = p.dq + (((int64_t)b * T + R / G) * H + hk * G + R % G) * D +
                               c0 * 16 * VW;
                atomic_add_cols<VW, DQC>(dqrow, dqa[ii], D - c0 * 16 * VW, tx);
            }
        }
        __syncthreads();  // everyone is done with this tile's Qs, dOs, Ps, dSs and row values
    }
    cp_async_wait_all();  // the K/V copies, if no query tile ran

    // dk, dv rows j0 + ty*4 + a (dS already carries the scale).
#pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int j = j0 + ty * 4 + a;
        if (j >= S) continue;
        const int64_t row = (((int64_t)b * S + j) * p.Hkv + hk) * D;
        if (p.atomic_dkv) {
            atomic_add_cols<VW, NC>(p.dk + row, dk_acc[a], D, tx);
            atomic_add_cols<VW, NC>(p.dv + row, dv_acc[a], D, tx);
        } else {
            store_cols<VW, NC>(p.dk + row, dk_acc[a], 1.0f, D, tx, p.vec_dkv);
            store_cols<VW, NC>(p.dv + row, dv_acc[a], 1.0f, D, tx, p.vec_dkv);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Host side: plans, launches

constexpr int64_t kMaxSplit = 64;

// Streaming multiprocessors of the current device, cached per device id.
int sm_count() {
    int dev = 0;
    LLMCORE_CUDA_CHECK(cudaGetDevice(&dev));
    static std::atomic<int> cache[64];
    if (dev >= 0 && dev < 64) {
        const int n = cache[dev].load(std::memory_order_relaxed);
        if (n > 0) return n;
    }
    int n = 0;
    LLMCORE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    if (n < 1) n = 1;
    if (dev >= 0 && dev < 64) cache[dev].store(n, std::memory_order_relaxed);
    return n;
}

// Opts a kernel into its dynamic shared memory (> 48 KiB needs it) and asks for the largest
// shared-memory carveout, once per kernel and device (bit `dev` of `configured`).
void configure_kernel(const void* fn, size_t smem, std::atomic<uint64_t>& configured) {
    int dev = 0;
    LLMCORE_CUDA_CHECK(cudaGetDevice(&dev));
    const uint64_t bit = dev >= 0 && dev < 64 ? (uint64_t)1 << dev : 0;
    if (bit && (configured.load(std::memory_order_acquire) & bit)) return;
    LLMCORE_CUDA_CHECK(
        cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    LLMCORE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributePreferredSharedMemoryCarveout,
                                            (int)cudaSharedmemCarveoutMaxShared));
    if (bit) configured.fetch_or(bit, std::memory_order_acq_rel);
}

int padded_dim(int64_t D) { return D <= 32 ? 32 : D <= 64 ? 64 : D <= 128 ? 128 : 256; }

int64_t round_up_bytes(int64_t n) { return (n + 255) / 256 * 256; }

// Throws on shapes the kernels cannot take (the Python layer has checked them already).
void check_shape(const AttentionShape& s) {
    if (s.B < 0 || s.T < 0 || s.S < 0 || s.H < 0 || s.Hkv < 0 || s.D < 0)
        throw std::invalid_argument("attention: negative size");
    if (s.D > 256)
        throw std::invalid_argument("attention: head dimension " + std::to_string(s.D) +
                                    " > 256 is not supported by the CUDA core");
    if (s.H > 0 && (s.Hkv == 0 || s.H % s.Hkv != 0))
        throw std::invalid_argument("attention: H must be a multiple of Hkv");
    // The kernels index rows, positions and heads with int; offsets are 64-bit.
    if (s.T > INT_MAX / 2 || s.S > INT_MAX / 2 || s.B * s.H > INT_MAX / 2 ||
        (s.Hkv > 0 && s.H / s.Hkv * s.T > INT_MAX / 2))
        throw std::invalid_argument("attention: sizes too large for the CUDA kernels");
}

bool strides_allow_vec(const int64_t st[3]) {
    return st[0] % 4 == 0 && st[1] % 4 == 0 && st[2] % 4 == 0;
}

// The fields FwdParams and BwdParams share: inputs, strides, sizes, options.
template <typename Params>
void set_common(Params& p, const float* q, const float* k, const float* v, const float* alibi,
                const AttentionShape& s, bool causal, float scale) {
    p.q = q, p.k = k, p.v = v, p.alibi = alibi;
    for (int i = 0; i < 3; ++i) {
        p.qs[i] = s.q_strides[i];
        p.ks[i] = s.k_strides[i];
        p.vs[i] = s.v_strides[i];
    }
    p.B = (int)s.B, p.T = (int)s.T, p.S = (int)s.S, p.H = (int)s.H, p.Hkv = (int)s.Hkv;
    p.D = (int)s.D, p.G = (int)(s.H / s.Hkv), p.GT = (int)(s.H / s.Hkv * s.T);
    p.scale = scale;
    p.causal = causal;
    // 16-byte copies need every row start of q, k and v 16-byte aligned: aligned bases, strides
    // that are multiples of 4 floats (a fused QKV buffer usually qualifies) and D % 4 == 0.
    p.vec_in = s.D % 4 == 0 && aligned16(q) && aligned16(k) && aligned16(v) &&
               strides_allow_vec(s.q_strides) && strides_allow_vec(s.k_strides) &&
               strides_allow_vec(s.v_strides);
}

// The forward's tiling and split, a function of the shape only (the workspace size depends on it).
struct ForwardPlan {
    int DP, BQ, BK;
    int64_t ntiles, nsplit;
};

ForwardPlan plan_forward(const AttentionShape& s) {
    ForwardPlan f{};
    f.DP = padded_dim(s.D);
    const int64_t GT = s.H / s.Hkv * s.T;
    // Decoding against a cache (at most 32 packed rows): 16-row tiles of 64 threads, so one query
    // row per head wastes little, and 32-key tiles, so that many blocks fit on an SM and keep
    // enough K/V bytes in flight. Otherwise 64-row tiles of 256 threads; 32-key tiles at DP >= 128
    // keep the shared memory (75 KiB at DP = 128) small enough for two blocks per SM.
    const bool decode = GT <= 32;
    f.BQ = decode ? 16 : 64;
    f.BK = decode ? 32 : (f.DP <= 64 ? 64 : 32);
    f.ntiles = ceil_div(GT, f.BQ);
    f.nsplit = 1;
    const int64_t blocks = s.B * s.Hkv * f.ntiles;
    const int64_t sms = sm_count();
    // Fewer blocks than two per SM: split the keys so that about four blocks per SM run, each
    // split keeping at least two key tiles (the combine pass costs a read of every partial).
    if (blocks > 0 && blocks < 2 * sms) {
        const int64_t key_tiles = ceil_div(s.S, f.BK);
        f.nsplit = std::min({ceil_div(4 * sms, blocks), key_tiles / 2, kMaxSplit});
        f.nsplit = std::max<int64_t>(f.nsplit, 1);
    }
    return f;
}

struct ForwardWorkspace {
    float *o, *m, *l;
};

ForwardWorkspace forward_workspace(void* ws, const AttentionShape& s, int64_t nsplit) {
    const int64_t rows = s.B * s.H * s.T;
    char* base = static_cast<char*>(ws);
    ForwardWorkspace w;
    w.m = reinterpret_cast<float*>(base);
    w.l = reinterpret_cast<float*>(base + round_up_bytes(nsplit * rows * 4));
    w.o = reinterpret_cast<float*>(base + 2 * round_up_bytes(nsplit * rows * 4));
    return w;
}

template <int BQ, int BK, int DP>
void launch_forward(const FwdParams& p, const ForwardPlan& plan, cudaStream_t stream) {
    if (plan.BQ != BQ || plan.BK != BK || plan.DP != DP)
        throw std::logic_error("attention_forward: plan and kernel disagree");
    constexpr size_t smem = forward_smem_bytes<BQ, BK, DP>();
    static std::atomic<uint64_t> configured{0};
    configure_kernel(reinterpret_cast<const void*>(&attention_forward_kernel<BQ, BK, DP>), smem,
                     configured);
    const int64_t blocks = (int64_t)p.B * p.Hkv * plan.ntiles * plan.nsplit;
    if (blocks > INT_MAX) throw std::invalid_argument("attention_forward: too many blocks");
    constexpr int threads = forward_threads<BQ, BK, DP>();
    attention_forward_kernel<BQ, BK, DP><<<(unsigned)blocks, threads, smem, stream>>>(p);
    LLMCORE_CUDA_CHECK_LAUNCH();
}

struct BackwardPlan {
    int DP, BB;
    int64_t nkb, nsplit;
};

BackwardPlan plan_backward(const AttentionShape& s) {
    BackwardPlan f{};
    f.DP = padded_dim(s.D);
    // 64 x 64 tiles (256 threads, 103 KiB) up to DP = 64; 32 x 32 (128 threads, 77 KiB at
    // DP = 128) above, where the dK and dV accumulators take 2 x 32 registers per thread.
    f.BB = f.DP <= 64 ? 64 : 32;
    f.nkb = ceil_div(s.S, f.BB);
    f.nsplit = 1;
    const int64_t blocks = s.B * s.Hkv * f.nkb;
    const int64_t sms = sm_count();
    // Fewer blocks than two per SM (MQA, batch 1, short sequences): spread the query tiles of
    // every key tile over nsplit blocks, which then add into zeroed dk, dv with atomics.
    if (blocks > 0 && blocks < 2 * sms) {
        const int64_t q_tiles = ceil_div(s.H / s.Hkv * s.T, f.BB);
        f.nsplit = std::min({ceil_div(4 * sms, blocks), q_tiles, kMaxSplit});
        f.nsplit = std::max<int64_t>(f.nsplit, 1);
    }
    return f;
}

template <int BB, int DP>
void launch_backward(const BwdParams& p, const BackwardPlan& plan, cudaStream_t stream) {
    if (plan.BB != BB || plan.DP != DP)
        throw std::logic_error("attention_backward: plan and kernel disagree");
    constexpr size_t smem = backward_smem_bytes<BB, DP>();
    static std::atomic<uint64_t> configured{0};
    configure_kernel(reinterpret_cast<const void*>(&attention_backward_kernel<BB, DP>), smem,
                     configured);
    const int64_t blocks = (int64_t)p.B * p.Hkv * plan.nkb * plan.nsplit;
    if (blocks > INT_MAX) throw std::invalid_argument("attention_backward: too many blocks");
    attention_backward_kernel<BB, DP><<<(unsigned)blocks, 4 * BB, smem, stream>>>(p);
    LLMCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers

size_t attention_forward_workspace_bytes(const AttentionShape& shape) {
    check_shape(shape);
    if (shape.B * shape.T * shape.H == 0 || shape.S == 0) return 0;
    const ForwardPlan plan = plan_forward(shape);
    if (plan.nsplit == 1) return 0;
    const int64_t rows = shape.B * shape.H * shape.T;
    return (size_t)(2 * round_up_bytes(plan.nsplit * rows * 4) +
                    round_up_bytes(plan.nsplit * rows * shape.D * 4));
}

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const AttentionShape& shape, bool causal, float scale,
                       const float* alibi_slopes, void* workspace, cudaStream_t stream) {
    check_shape(shape);
    const AttentionShape& s = shape;
    if (s.B * s.T * s.H == 0) return;
    if (s.S == 0) {  // no keys: an empty sum (the Python layer rejects this case)
        const size_t out_bytes = sizeof(float) * s.B * s.T * s.H * s.D;
        if (out_bytes) LLMCORE_CUDA_CHECK(cudaMemsetAsync(out, 0, out_bytes, stream));
        const int64_t n = s.B * s.H * s.T;
        fill_kernel<<<grid_for(n, 256), 256, 0, stream>>>(lse, n, -INFINITY);
        LLMCORE_CUDA_CHECK_LAUNCH();
        return;
    }
    const ForwardPlan plan = plan_forward(s);

    FwdParams p{};
    set_common(p, q, k, v, alibi_slopes, s, causal, scale);
    p.out = out;
    p.lse = lse;
    p.ntiles = (int)plan.ntiles, p.nsplit = (int)plan.nsplit;
    ForwardWorkspace w{};
    if (plan.nsplit > 1) {
        if (workspace == nullptr)
            throw std::invalid_argument("attention_forward: workspace is null");
        w = forward_workspace(workspace, s, plan.nsplit);
        p.part_o = w.o, p.part_m = w.m, p.part_l = w.l;
        p.vec_out = s.D % 4 == 0 && aligned16(w.o);
    } else {
        p.vec_out = s.D % 4 == 0 && aligned16(out);
    }

    // The instances: <BQ, BK, DP> as chosen by plan_forward (launch_forward checks the match).
    if (plan.BQ == 16) {
        switch (plan.DP) {
            case 32: launch_forward<16, 32, 32>(p, plan, stream); break;
            case 64: launch_forward<16, 32, 64>(p, plan, stream); break;
            case 128: launch_forward<16, 32, 128>(p, plan, stream); break;
            default: launch_forward<16, 32, 256>(p, plan, stream); break;
        }
    } else {
        switch (plan.DP) {
            case 32: launch_forward<64, 64, 32>(p, plan, stream); break;
            case 64: launch_forward<64, 64, 64>(p, plan, stream); break;
            case 128: launch_forward<64, 32, 128>(p, plan, stream); break;
            default: launch_forward<64, 32, 256>(p, plan, stream); break;
        }
    }
    if (plan.nsplit > 1) {
        const int64_t rows = s.B * s.H * s.T;
        attention_combine_kernel<<<grid_for(rows * kWarpSize, 256), 256, 0, stream>>>(
            out, lse, w.o, w.m, w.l, p.T, p.H, p.Hkv, p.G, p.D, p.nsplit, rows);
        LLMCORE_CUDA_CHECK_LAUNCH();
    }
}

size_t attention_backward_workspace_bytes(const AttentionShape& shape) {
    check_shape(shape);
    return (size_t)round_up_bytes(shape.B * shape.H * shape.T * 4);  // delta (B, H, T)
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                        const float* k, const float* v, const float* out, const float* lse,
                        const AttentionShape& shape, bool causal, float scale,
                        const float* alibi_slopes, void* workspace, cudaStream_t stream) {
    check_shape(shape);
    const AttentionShape& s = shape;
    if (s.B == 0 || s.D == 0) return;
    const size_t kv_bytes = sizeof(float) * s.B * s.S * s.Hkv * s.D;
    if (s.T == 0 || s.H == 0) {  // no queries: every key gradient is an empty sum
        if (kv_bytes) {
            LLMCORE_CUDA_CHECK(cudaMemsetAsync(dk, 0, kv_bytes, stream));
            LLMCORE_CUDA_CHECK(cudaMemsetAsync(dv, 0, kv_bytes, stream));
        }
        return;
    }
    // dq collects every key tile's share with atomics.
    LLMCORE_CUDA_CHECK(cudaMemsetAsync(dq, 0, sizeof(float) * s.B * s.T * s.H * s.D, stream));
    if (s.S == 0) return;
    if (workspace == nullptr)
        throw std::invalid_argument("attention_backward: workspace is null");
    float* delta = static_cast<float*>(workspace);  // (B, H, T)

    const int64_t rows = s.B * s.T * s.H;
    attention_delta_kernel<<<grid_for(rows * kWarpSize, 256), 256, 0, stream>>>(
        delta, dout, out, rows, (int)s.T, (int)s.H, (int)s.D);
    LLMCORE_CUDA_CHECK_LAUNCH();

    const BackwardPlan plan = plan_backward(s);
    BwdParams p{};
    set_common(p, q, k, v, alibi_slopes, s, causal, scale);
    p.dq = dq, p.dk = dk, p.dv = dv;
    p.dout = dout, p.lse = lse, p.delta = delta;
    p.nsplit = (int)plan.nsplit;
    p.vec_do = s.D % 4 == 0 && aligned16(dout);
    p.vec_dkv = s.D % 4 == 0 && aligned16(dk) && aligned16(dv);
    p.atomic_dkv = plan.nsplit > 1;
    if (p.atomic_dkv) {
        LLMCORE_CUDA_CHECK(cudaMemsetAsync(dk, 0, kv_bytes, stream));
        LLMCORE_CUDA_CHECK(cudaMemsetAsync(dv, 0, kv_bytes, stream));
    }
    switch (plan.DP) {
        case 32: launch_backward<64, 32>(p, plan, stream); break;
        case 64: launch_backward<64, 64>(p, plan, stream); break;
        case 128: launch_backward<32, 128>(p, plan, stream); break;
        default: launch_backward<32, 256>(p, plan, stream); break;
    }
}

}  // namespace llmcore::cuda
