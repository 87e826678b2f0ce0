// attention: fused scaled-dot-product attention on the CPU, forward and backward, causal or not,
// MHA/GQA/MQA, ALiBi, q/k/v read through their strides (FlashAttention-2's algorithm in CPU tiles).
//
// Nothing of size T x S is ever stored: keys are visited in blocks of BK, the softmax is computed
// online (a running max m and sum l per query row) and the backward recomputes each tile's
// probabilities from the saved lse = m + log(l).
//
// Every matrix product is one routine, tile_gemm: C (rows x lanes) (+)= A (rows x kdim) B (kdim x
// lanes), B and C row-major with `lanes` (a multiple of the vector width) contiguous floats per
// row, A read one broadcast scalar at a time through arbitrary strides. So A needs no packing:
// the forward reads K and V in place; the backward copies rows that it reads as B into
// contiguous blocks (below), and transposes only the K and V blocks, once per task.
//
// Forward, one task per (batch, head, block of BQ queries), queries along the vector lanes:
//   Qt (D x W)  = the query block, transposed                       once per task
//   for each key block the block can see (blocks past the causal diagonal are skipped):
//     St (nk x W) = K Qt                                             K read in place
//     St = St scale - slope |pos_i - j|, -inf where j > pos_i; new column max m
//     Pt = exp(St - m), l = l alpha + colsum(Pt), alpha = exp(m_old - m)
//     Ot (D x W)  = Ot alpha + V^T Pt                                V read in place
//   out = Ot^T / l, lse = m + log l
// With fewer than VEC/2 queries per head (decoding) those tiles would leave most lanes empty, so
// each query row then runs alone, vectorised along D.
//
// Backward, with Delta_i = rowsum(dout * out) and dS = P (dP - Delta) scale:
//   kv pass, one task per (batch, kv head, key block), keys along the lanes. The task loops over
//   the G query heads of its group and over every query block that sees its keys:
//     S (nq x kl) = Q Kt,  P = exp(S scale + bias - lse),  dP = dO Vt,  dS
//     dV (nk x D) += P^T dO,  dK (nk x D) += dS^T Q
//   so the GQA/MQA reduction over the group happens inside the tile, and each dk/dv row has one
//   owner (no races, no per-query-head buffers, no expanded K/V).
//   dq: dQ (nq x D) += dS K needs every key block of a query row. When there are enough (batch,
//   kv head) pairs to keep the threads busy, one task owns a whole pair and adds it into dq inside
//   the kv pass; otherwise a second pass, one task per (batch, head, query block) with queries
//   along the lanes, recomputes S and dP (7 tile products per tile pair instead of 5) to expose
//   more parallelism. Either way every sum has a fixed order: deterministic for a thread count.
#include <algorithm>

#include "aligned_buffer.h"
#include "common.h"
#include "kernels.h"
#include "task_ranges.h"
#include "transpose8.h"

namespace llmcore {
namespace LLMCORE_ISA {
namespace {

// Queries per block and keys per block. A 64 x 64 score tile is 16 KiB and the Q/O tiles
// 16-32 KiB at D = 64-128: the working set of one tile pair stays in L2, and the per-block
// costs (rescaling O, loading/storing the C tiles) are 1/64 of the products. Measured on one
// AVX-512 core at B=4, H=8, D=64, causal, alternating builds: keys in blocks of 128 leave the
// forward unchanged (within 1%) and slow the backward by 10% at T=512 (4% at T=2048); query
// blocks of 32 slow the forward by 20% at T=2048.
constexpr int64_t BQ = 64;
constexpr int64_t BK = 64;
// Register tile of tile_gemm: MR rows x NV vectors of accumulators. AVX-512 has 32 registers:
// 6 x 4 = 24 accumulators + 4 B vectors + the broadcast; AVX2/SSE have 16: 4 x 2 = 8 accumulators
// + 2 B vectors (8 independent FMA chains cover the 4-cycle FMA latency on two ports). Row counts
// of 64 run as 10 tiles of 6 and one of 4. Measured on one AVX-512 core, B=4 H=8 T=512 D=64 causal,
// forward + backward: 6 x 4 42 ms against 47 ms for 4 x 4 (6 x 4 once measured 30% slower, when
// its row loops were only unrolled 4 times and the accumulators lived on the stack). MR = 5 with
// AVX2 is no faster.
constexpr int MR = VEC == 16 ? 6 : 4;
constexpr int NV = VEC == 16 ? 4 : 2;


inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// One thread's scratch (tiles of a task), reused across calls.
thread_local AlignedBuffer tls_scratch;

// ---------------------------------------------------------------------------------------------
// tile_gemm

// R rows x NVr vectors of C: C[r][l] = (accumulate ? C[r][l] (* cscale[l]) : 0)
//                                       + sum over kk of A[r*ars + kk*aks] * B[kk*ldb + l].
template <int R, int NVr>
inline void micro_tile(float* __restrict c, int64_t ldc, const float* __restrict a, int64_t ars,
                       int64_t aks, const float* __restrict b, int64_t ldb, int64_t kdim,
                       bool accumulate, const float* cscale) {
    vfloat acc[R][NVr];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NVr; ++v) {
            acc[r][v] = accumulate ? load(c + r * ldc + v * VEC) : vfloat{};
            if (accumulate && cscale) acc[r][v] *= load(cscale + v * VEC);
        }
    for (int64_t kk = 0; kk < kdim; ++kk) {
        const float* bk = b + kk * ldb;
        const float* ak = a + kk * aks;
        vfloat bv[NVr];
#pragma GCC unroll 4
        for (int v = 0; v < NVr; ++v) bv[v] = load(bk + v * VEC);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
            const float s = ak[r * ars];
#pragma GCC unroll 4
            for (int v = 0; v < NVr; ++v) acc[r][v] += s * bv[v];
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NVr; ++v) store(c + r * ldc + v * VEC, acc[r][v]);
}

template <int R>
inline void micro_tile_nv(int nv, float* c, int64_t ldc, const float* a, int64_t ars, int64_t aks,
                          const float* b, int64_t ldb, int64_t kdim, bool accumulate,
                          const float* cscale) {
    if constexpr (NV == 4) {
        if (nv == 4) return micro_tile<R, 4>(c, ldc, a, ars, aks, b, ldb, kdim, accumulate, cscale);
        if (nv == 3) return micro_tile<R, 3>(c, ldc, a, ars, aks, b, ldb, kdim, accumulate, cscale);
    }
    if (nv == 2) return micro_tile<R, 2>(c, ldc, a, ars, aks, b, ldb, kdim, accumulate, cscale);
    micro_tile<R, 1>(c, ldc, a, ars, aks, b, ldb, kdim, accumulate, cscale);
}

// The part of a tile product that a causal mask leaves, for tiles on the diagonal (about half of
// each): row r of C needs only
//   kLanesBelow: lanes j < r + 1 + diag    (backward S and dP: rows are queries, lanes keys)
//   kLanesFrom:  lanes i >= r - diag       (forward St: rows are keys, lanes queries)
//   kStepsBelow: steps kk < r + 1 + diag   (backward dQ = dS K: the dS terms past it are 0)
//   kStepsFrom:  steps kk >= r - diag      (backward dK = dS^T Q, dV = P^T dO: rows are keys,
//                                           steps queries; the terms before it are 0)
// Skipped lanes are left as they were (the caller masks them before reading); skipped steps add
// zeros, so the result is bitwise the same. At T = 128 two of the three tile pairs of a head lie
// on the diagonal.
struct Band {
    enum Kind { kAll, kLanesBelow, kLanesFrom, kStepsBelow, kStepsFrom };
    Kind kind = kAll;
    int64_t diag = 0;
};

// C (rows x lanes, row stride ldc) = or += A (rows x kdim; element (r, kk) at a[r*ars + kk*aks])
// times B (kdim x lanes, row stride ldb). lanes must be a multiple of VEC; rows and kdim are free.
// When accumulating, cscale (lanes,) if given first scales every row of C lane by lane (the online
// softmax's rescaling of O, done here instead of in a pass of its own). band limits the work to
// what a causal mask keeps (above).
// Lane groups outermost, so one group's B panel (kdim x NV*VEC) stays in L1 while all rows of
// A stream past it.
template <int R>
void band_tile(float* c, int64_t ldc, const float* a, int64_t ars, int64_t aks, const float* b,
               int64_t ldb, int64_t r, int64_t l0, int nv, int64_t kdim, bool accumulate,
               const float* cscale, Band band) {
    int64_t lo = l0, hi = l0 + nv * VEC, first = 0, steps = kdim;
    if (band.kind == Band::kLanesBelow) hi = std::min(hi, round_up(r + R + band.diag, VEC));
    if (band.kind == Band::kLanesFrom) lo = std::max(lo, (r - band.diag) / VEC * VEC);
    if (band.kind == Band::kStepsBelow) steps = std::clamp<int64_t>(r + R + band.diag, 0, kdim);
    if (band.kind == Band::kStepsFrom) first = std::clamp<int64_t>(r - band.diag, 0, kdim);
    if (hi <= lo) return;
    if (steps == first && accumulate) return;  // nothing to add (an overwrite still writes zeros)
    micro_tile_nv<R>((int)((hi - lo) / VEC), c + r * ldc + lo, ldc, a + r * ars + first * aks, ars,
                     aks, b + first * ldb + lo, ldb, steps - first, accumulate,
                     cscale ? cscale + lo : nullptr);
}

void tile_gemm(float* c, int64_t ldc, const float* a, int64_t ars, int64_t aks, const float* b,
               int64_t ldb, int64_t rows, int64_t kdim, int64_t lanes, bool accumulate,
               const float* cscale = nullptr, Band band = {}) {
    for (int64_t l0 = 0; l0 < lanes; l0 += NV * VEC) {
        const int nv = (int)std::min<int64_t>(NV, (lanes - l0) / VEC);
        int64_t r = 0;
        for (; r + MR <= rows; r += MR)
            band_tile<MR>(c, ldc, a, ars, aks, b, ldb, r, l0, nv, kdim, accumulate, cscale, band);
        if constexpr (MR > 4) {
            for (; r + 4 <= rows; r += 4)
                band_tile<4>(c, ldc, a, ars, aks, b, ldb, r, l0, nv, kdim, accumulate, cscale, band);
        }
        for (; r < rows; ++r)
            band_tile<1>(c, ldc, a, ars, aks, b, ldb, r, l0, nv, kdim, accumulate, cscale, band);
    }
}

// dst (D x lanes) = the transpose of n rows of D floats (row i at src + i*stride); lanes past n
// are zero, so the products on them stay finite and are simply never written out.
void transpose_in(float* dst, int64_t lanes, const float* src, int64_t stride, int64_t n,
                  int64_t D) {
    const int64_t n8 = n / 8 * 8, D8 = D / 8 * 8;
    for (int64_t i = 0; i < n8; i += 8) {
        for (int64_t d = 0; d < D8; d += 8) transpose_block8<8>(dst + d * lanes + i, lanes, src + i * stride + d, stride);
        for (int64_t d = D8; d < D; ++d)
            for (int u = 0; u < 8; ++u) dst[d * lanes + i + u] = src[(i + u) * stride + d];
    }
    for (int64_t i = n8; i < n; ++i)
        for (int64_t d = 0; d < D; ++d) dst[d * lanes + i] = src[i * stride + d];
    if (n < lanes)
        for (int64_t d = 0; d < D; ++d) std::fill(dst + d * lanes + n, dst + (d + 1) * lanes, 0.0f);
}

// n rows of D floats (row i at dst + i*stride) = the transpose of src (D x lanes), row i times
// factor[i] (or 1).
void transpose_out(float* dst, int64_t stride, const float* src, int64_t lanes, int64_t n,
                   int64_t D, const float* factor) {
    const int64_t n8 = n / 8 * 8, D8 = D / 8 * 8;
    for (int64_t i = 0; i < n8; i += 8) {
        for (int64_t d = 0; d < D8; d += 8) {
            v8f r[8];
            for (int u = 0; u < 8; ++u) std::memcpy(&r[u], src + (d + u) * lanes + i, sizeof(v8f));
            transpose8(r);
            for (int u = 0; u < 8; ++u) {
                const v8f x = factor ? r[u] * factor[i + u] : r[u];
                std::memcpy(dst + (i + u) * stride + d, &x, sizeof x);
            }
        }
        for (int64_t d = D8; d < D; ++d)
            for (int u = 0; u < 8; ++u)
                dst[(i + u) * stride + d] = src[d * lanes + i + u] * (factor ? factor[i + u] : 1.0f);
    }
    for (int64_t i = n8; i < n; ++i)
        for (int64_t d = 0; d < D; ++d)
            dst[i * stride + d] = src[d * lanes + i] * (factor ? factor[i] : 1.0f);
}

// Asks for n rows of D floats (row i at row0 + i*stride) to be brought into cache, for reading
// into L1 (the rows a task touches first) or L2 (later ones), or for writing.
enum class Prefetch { kReadL1, kReadL2, kWrite };
template <Prefetch kind>
inline void prefetch_rows(const float* row0, int64_t stride, int64_t n, int64_t D) {
    for (int64_t i = 0; i < n; ++i) {
        for (int64_t d = 0; d < D; d += 64 / sizeof(float)) {
            const float* p = row0 + i * stride + d;
            if constexpr (kind == Prefetch::kReadL1) __builtin_prefetch(p, 0, 3);
            if constexpr (kind == Prefetch::kReadL2) __builtin_prefetch(p, 0, 2);
            if constexpr (kind == Prefetch::kWrite) __builtin_prefetch(p, 1, 2);
        }
    }
}

// dst[0..n) = src[0..n) for a short row (one head's D floats), in vector moves inline: std::copy
// made a library memmove call per 256-byte row, 20% of the backward at B16 H4 T128 D64 (perf).
inline void copy_row(float* __restrict dst, const float* __restrict src, int64_t n) {
    int64_t i = 0;
    for (; i + VEC <= n; i += VEC) store(dst + i, load(src + i));
    for (; i < n; ++i) dst[i] = src[i];
}

// Lanes D..ld of n rows (row stride ld) set to zero: the padding of rows copied into scratch.
inline void zero_lanes(float* dst, int64_t ld, int64_t n, int64_t D) {
    if (ld > D)
        for (int64_t i = 0; i < n; ++i) std::fill(dst + i * ld + D, dst + (i + 1) * ld, 0.0f);
}

// n rows of D floats (row i at src + i*stride) into dst (row stride ld >= D), lanes D..ld zeroed.
inline void copy_rows_padded(float* dst, int64_t ld, const float* src, int64_t stride, int64_t n, int64_t D) {
    for (int64_t i = 0; i < n; ++i) copy_row(dst + i * ld, src + i * stride, D);
    zero_lanes(dst, ld, n, D);
}

// Row (b, i, h) of a (B, L, heads, D) view with the given (batch, seq, head) strides.
template <class T>
inline T* row_at(T* base, const int64_t (&strides)[3], int64_t b, int64_t i, int64_t h) {
    return base + b * strides[0] + i * strides[1] + h * strides[2];
}

// Everything a task needs to find its rows.
struct Problem {
    const AttentionShape& s;
    const float *q, *k, *v;
    bool causal;
    float scale;
    const float* alibi;  // (H,) or null
    int64_t G;           // query heads per kv head
    int64_t off;         // key position of query 0: S - T
    const float* rot;    // (S, D/2) RoPE (cos, sin) by position, or null

    const float* q_row(int64_t b, int64_t i, int64_t h) const { return row_at(q, s.q_strides, b, i, h); }
    const float* k_row(int64_t b, int64_t j, int64_t hk) const { return row_at(k, s.k_strides, b, j, hk); }
    const float* v_row(int64_t b, int64_t j, int64_t hk) const { return row_at(v, s.v_strides, b, j, hk); }
    float slope(int64_t h) const { return alibi ? alibi[h] : 0.0f; }
    // n rows of q or k (row i at src + i*stride, at position pos0 + i) into scratch dst (row
    // stride ld >= D, lanes D..ld zeroed): rotated by RoPE when the problem has a table, else copied.
    void load_rows(float* dst, int64_t ld, const float* src, int64_t stride, int64_t n, int64_t pos0) const {
        if (!rot) return copy_rows_padded(dst, ld, src, stride, n, s.D);
        for (int64_t i = 0; i < n; ++i)
            rope_row(dst + i * ld, src + i * stride, rot + (pos0 + i) * s.D, s.D / 2, 1.0f);
        zero_lanes(dst, ld, n, s.D);
    }
    // Rows [i0, i0 + n) of query head h / keys [j0, j0 + n) of kv head hk as a product reads
    // them: in place, or rotated into `scratch` (n x D) with RoPE. Sets *stride to their row stride.
    const float* q_rows(int64_t b, int64_t i0, int64_t n, int64_t h, float* scratch, int64_t* stride) const {
        return rows_for_product(q_row(b, i0, h), s.q_strides[1], n, off + i0, scratch, stride);
    }
    const float* k_rows(int64_t b, int64_t j0, int64_t n, int64_t hk, float* scratch, int64_t* stride) const {
        return rows_for_product(k_row(b, j0, hk), s.k_strides[1], n, j0, scratch, stride);
    }
    // n rows in place (row i at rows + i*stride, position pos0 + i) rotated back by RoPE: the
    // backward of a rotation the kernels applied as they read q or k. Nothing without a table.
    void rotate_back(float* rows, int64_t stride, int64_t n, int64_t pos0) const {
        if (!rot) return;
        for (int64_t i = 0; i < n; ++i)
            rope_row(rows + i * stride, rows + i * stride, rot + (pos0 + i) * s.D, s.D / 2, -1.0f);
    }
    const float* rows_for_product(const float* src, int64_t src_stride, int64_t n, int64_t pos0,
                                  float* scratch, int64_t* stride) const {
        if (!rot) return *stride = src_stride, src;
        load_rows(scratch, s.D, src, src_stride, n, pos0);
        return *stride = s.D, scratch;
    }
    // Keys [0, key_end) are visible to at least one query of rows [i0, i0 + n).
    int64_t key_end(int64_t i0, int64_t n) const {
        return causal ? std::min(s.S, off + i0 + n) : s.S;
    }
};

// The scaled, ALiBi-biased score of one query/key pair (rel = pos_i - j), written once and used
// by the forward and both backward passes. Their tile products add the same terms in the same
// order (d = 0, 1, ...), so with this the backward's exp(score - lse) sees bitwise the forward's
// score: with logits in the hundreds a rounding difference of one ulp in the score would
// otherwise show as a 1e-5..1e-4 relative error in P (measured 3.7e-5 on dv at scale 20 when the
// forward pre-scaled Q and the backward scaled the products).
inline float magnitude(float x) { return std::fabs(x); }
inline vfloat magnitude(vfloat x) { return x < vfloat{} ? -x : x; }
template <class T>
inline T biased_score(T qk, float scale, float slope, T rel) {
    return qk * scale - slope * magnitude(rel);
}

// {0, 1, ..., VEC - 1}: the lane offsets within one vector.
inline vfloat lane_index() {
    vfloat v;
    for (int l = 0; l < VEC; ++l) v[l] = (float)l;
    return v;
}

// ---------------------------------------------------------------------------------------------
// forward

// One block of queries of one head: the tiled online softmax described at the top.
// Floats of scratch forward_block lays out (below); dq_block_scratch and kv_block_scratch likewise.
int64_t forward_block_scratch(int64_t D) { return 2 * D * BQ + BK * BQ + (BQ + BK) * D; }
void forward_block(float* out, float* lse, const Problem& P, int64_t b, int64_t h, int64_t i0,
                   bool kv_cached, float* scratch) {
    const AttentionShape& s = P.s;
    const int64_t D = s.D, nq = std::min(BQ, s.T - i0), W = round_up(nq, VEC);
    const int64_t hk = h / P.G, p0 = P.off + i0;  // p0: key position of the block's first query
    const float slope = P.slope(h);
    float* qt = scratch;      // (D, W)  Q^T
    float* ot = qt + D * BQ;  // (D, W)  O^T, unnormalised
    float* st = ot + D * BQ;  // (BK, W) scores, then probabilities
    float* qrot = st + BK * BQ;  // (nq, D) rotated Q rows (RoPE only)
    float* krot = qrot + BQ * D;  // (nk, D) rotated K rows of the current block (RoPE only)
    // m: running max; mu: the reference the exponentials use, m except while a row has seen only
    // -inf (then 0, so that exp(-inf - mu) = 0, not NaN); l: running sum of exp(score - mu).
    alignas(64) float m[BQ], mu[BQ], l[BQ], alpha[BQ], mx[BQ], lsum[BQ];

    // Everything the task reads, requested up front: in a training step q, k and v were just
    // written, partly by the other core, and the first touches of each row otherwise wait on it
    // one by one (the forward took 1.5x its time on the same arrays repeated; these prefetches
    // recover about a sixth of the difference, measured in the cpu-small step). K and V are
    // skipped when this thread's previous block, a later one of the same head, read them all
    // (kv_cached): one request per line of every visible key then only finds it in L2 (perf put
    // a fifth of forward_block's own samples on them at T = 512), or at long T, where K and V
    // outgrow L2, evicts what the block is about to use. Alternating builds, two threads,
    // causal, B = 1 H = 8: T = 4096 D = 128 172-173 -> 149-159 ms, T = 2048 D = 64 19.9-21.3 ->
    // 18.9-20.3 ms; the cpu-small step's four forward calls 4.86-4.97 -> 4.81-4.84 ms.
    const int64_t kend = P.key_end(i0, nq);
    float* out_rows = out + ((b * s.T + i0) * s.H + h) * D;
    prefetch_rows<Prefetch::kReadL1>(P.q_row(b, i0, h), s.q_strides[1], nq, D);
    prefetch_rows<Prefetch::kWrite>(out_rows, s.H * D, nq, D);
    if (!kv_cached) {
        prefetch_rows<Prefetch::kReadL2>(P.k_row(b, 0, hk), s.k_strides[1], kend, D);
        prefetch_rows<Prefetch::kReadL2>(P.v_row(b, 0, hk), s.v_strides[1], kend, D);
    }
    int64_t qstride;
    const float* qrows = P.q_rows(b, i0, nq, h, qrot, &qstride);
    transpose_in(qt, W, qrows, qstride, nq, D);
    std::fill(m, m + W, -INFINITY);
    std::fill(mu, mu + W, 0.0f);
    std::fill(l, l + W, 0.0f);

    if (kend <= 0) std::fill(ot, ot + D * W, 0.0f);  // no key at all (causal S < T, unchecked)
    for (int64_t j0 = 0; j0 < kend; j0 += BK) {
        const int64_t nk = std::min(BK, kend - j0);
        const bool mask = P.causal && j0 + nk - 1 > p0;  // the tile crosses the diagonal
        // St (nk x W) = K Qt, on a diagonal tile only where key j0 + j <= query p0 + i. K is read
        // in place, or from a rotated copy of the block with RoPE.
        int64_t kstride;
        const float* krows = P.k_rows(b, j0, nk, hk, krot, &kstride);
        tile_gemm(st, W, krows, kstride, 1, qt, W, nk, D, W, false, nullptr,
                  mask ? Band{Band::kLanesFrom, p0 - j0} : Band{});

        // Scale, ALiBi and the causal mask (only on tiles that cross the diagonal), fused with
        // the column max. A NaN score never wins the max but comes back through exp(NaN - mu).
        std::copy(m, m + W, mx);
        for (int64_t j = 0; j < nk; ++j) {
            float* row = st + j * W;
            const float rel0 = (float)(p0 - (j0 + j));  // pos - key at lane 0 (exact below 2^24)
            for (int64_t i = 0; i < W; i += VEC) {
                const vfloat rel = lane_index() + (float)i + rel0;
                vfloat x = biased_score(load(row + i), P.scale, slope, rel);
                if (mask) x = rel < vfloat{} ? vfloat{} - INFINITY : x;
                store(row + i, x);
                const vfloat mxi = load(mx + i);
                store(mx + i, x > mxi ? x : mxi);
            }
        }
        for (int64_t i = 0; i < W; i += VEC) {
            const vfloat mxi = load(mx + i);
            const vfloat mnew = mxi == vfloat{} - INFINITY ? vfloat{} : mxi;
            store(alpha + i, vexp(load(m + i) - mnew));  // 0 while the row had nothing (m = -inf)
            store(mu + i, mnew);
            store(m + i, mxi);
            store(lsum + i, vfloat{});
        }
        for (int64_t j = 0; j < nk; ++j) {
            float* row = st + j * W;
            for (int64_t i = 0; i < W; i += VEC) {
                const vfloat p = vexp(load(row + i) - load(mu + i));
                store(row + i, p);
                store(lsum + i, load(lsum + i) + p);
            }
        }
        for (int64_t i = 0; i < W; i += VEC)
            store(l + i, load(l + i) * load(alpha + i) + load(lsum + i));
        // Ot (D x W) = Ot alpha + V^T Pt; the first block starts from zero.
        tile_gemm(ot, W, P.v_row(b, j0, hk), 1, s.v_strides[1], st, W, D, nk, W, j0 > 0, alpha);
    }

    float inv[BQ];
    for (int64_t i = 0; i < nq; ++i) {
        inv[i] = 1.0f / l[i];
        lse[(b * s.H + h) * s.T + i0 + i] = mu[i] + std::log(l[i]);
    }
    transpose_out(out_rows, s.H * D, ot, W, nq, D, inv);
}

// Decoding (T < VEC/2): a query-lane tile would be mostly empty lanes, so each query row runs
// alone, vectorised along D. One task takes the T rows of several query heads that share a kv
// head and walks the keys block by block, every row of the task consuming a K/V block while it
// sits in L2: K and V stream from memory once per task instead of once per query head (GQA
// decoding at B=1, H=32, Hkv=8, S=2048, D=128: 0.8 ms with one row per task, measured).

// The online-softmax state of one query row.
struct RowState {
    float m, mu, l;  // running max, the exponentials' reference (see forward_block), sum
    float* o;        // (D,) unnormalised output
    const float* q;  // (D,) the query row (rotated with RoPE)
};

// Adds keys [j0, j0 + nk) (all visible) to one query row: scores four keys at a time (four
// independent dot-product chains), then the same online softmax as forward_block.
void row_update(RowState& r, const float* qr, const float* kb, int64_t ks, const float* vb,
                int64_t vs, int64_t D, int64_t nk, float scale, float slope, float rel0) {
    alignas(64) float sc[BK];
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4) {
        const float *k0 = kb + j * ks, *k1 = k0 + ks, *k2 = k1 + ks, *k3 = k2 + ks;
        vfloat a0{}, a1{}, a2{}, a3{};
        int64_t d = 0;
        for (; d + VEC <= D; d += VEC) {
            const vfloat q = load(qr + d);
            a0 += q * load(k0 + d);
            a1 += q * load(k1 + d);
            a2 += q * load(k2 + d);
            a3 += q * load(k3 + d);
        }
        float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
        for (; d < D; ++d) {
            s0 += qr[d] * k0[d];
            s1 += qr[d] * k1[d];
            s2 += qr[d] * k2[d];
            s3 += qr[d] * k3[d];
        }
        sc[j] = s0, sc[j + 1] = s1, sc[j + 2] = s2, sc[j + 3] = s3;
    }
    for (; j < nk; ++j) {
        const float* kr = kb + j * ks;
        sc[j] = row_sum(D, [&](int64_t d) { return load(qr + d) * load(kr + d); },
                        [&](int64_t d) { return qr[d] * kr[d]; });
    }
    // Scores biased and scaled in place, and their max (a NaN never wins).
    vfloat vmx = vfloat{} - INFINITY;
    int64_t jj = 0;
    for (; jj + VEC <= nk; jj += VEC) {
        const vfloat x = biased_score(load(sc + jj), scale, slope, rel0 - (lane_index() + (float)jj));
        store(sc + jj, x);
        vmx = x > vmx ? x : vmx;
    }
    float mx = hmax(vmx);
    mx = mx > r.m ? mx : r.m;
    for (; jj < nk; ++jj) {
        const float x = biased_score(sc[jj], scale, slope, rel0 - (float)jj);
        sc[jj] = x;
        mx = x > mx ? x : mx;
    }
    const float mnew = mx == -INFINITY ? 0.0f : mx;
    const float alpha = fast_exp(r.m - mnew);
    r.m = mx;
    r.mu = mnew;
    const float lsum = exp_and_sum(sc, sc, nk, mnew);
    r.l = r.l * alpha + lsum;
    float* o = r.o;
    if (alpha != 1.0f) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
    }
    for (int64_t jj = 0; jj < nk; ++jj) {
        const float p = sc[jj];
        const float* vr = vb + jj * vs;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += p * vr[d];
    }
}

// All T query rows of heads [h0, h1), which share kv head hk. scratch: forward_rows_scratch
// floats: the rows' outputs, and with RoPE their rotated queries and one rotated block of keys.
int64_t forward_rows_scratch(int64_t rows, int64_t D) { return (2 * rows + BK) * D; }
void forward_rows(float* out, float* lse, const Problem& P, int64_t b, int64_t hk, int64_t h0,
                  int64_t h1, float* scratch) {
    const AttentionShape& s = P.s;
    const int64_t D = s.D, T = s.T, R = (h1 - h0) * T;  // row r: head h0 + r / T, query r % T
    float* qrot = scratch + R * D;                      // (R, D) rotated queries (RoPE only)
    float* krot = qrot + R * D;                         // (BK, D) rotated keys (RoPE only)
    RowState rows[LLMCORE_VEC / 2 * 64];               // R <= G * T < 64 * VEC/2 (G <= 64 below)
    for (int64_t r = 0; r < R; ++r) {
        rows[r] = RowState{-INFINITY, 0.0f, 0.0f, scratch + r * D, nullptr};
        std::fill(rows[r].o, rows[r].o + D, 0.0f);
        int64_t unused;
        rows[r].q = P.q_rows(b, r % T, 1, h0 + r / T, qrot + r * D, &unused);
    }
    const int64_t kend = P.key_end(0, T);
    for (int64_t j0 = 0; j0 < kend; j0 += BK) {
        int64_t ks;  // (with RoPE the block's keys are rotated once, for every row of the task)
        const float* kb = P.k_rows(b, j0, std::min(BK, kend - j0), hk, krot, &ks);
        const float* vb = P.v_row(b, j0, hk);
        for (int64_t r = 0; r < R; ++r) {
            const int64_t h = h0 + r / T, i = r % T;
            // Each row stops at its own causal diagonal: no mask needed.
            const int64_t nk = std::min(BK, P.key_end(i, 1) - j0);
            if (nk > 0)
                row_update(rows[r], rows[r].q, kb, ks, vb, s.v_strides[1], D, nk, P.scale, P.slope(h),
                           (float)(P.off + i - j0));
        }
    }
    for (int64_t r = 0; r < R; ++r) {
        const int64_t h = h0 + r / T, i = r % T;
        const float inv = 1.0f / rows[r].l;
        float* orow = out + ((b * T + i) * s.H + h) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = rows[r].o[d] * inv;
        lse[(b * s.H + h) * T + i] = rows[r].mu + std::log(rows[r].l);
    }
}

// ---------------------------------------------------------------------------------------------
// backward

struct Grads {
    const AttentionShape& s;
    float *dq, *dk, *dv;
    const float *dout, *lse, *delta;  // delta: (B, H, T), rowsum(dout * out)

    float* dq_row(int64_t b, int64_t i, int64_t h) const { return row_at(dq, s.dq_strides, b, i, h); }
    float* dk_row(int64_t b, int64_t j, int64_t hk) const { return row_at(dk, s.dk_strides, b, j, hk); }
    float* dv_row(int64_t b, int64_t j, int64_t hk) const { return row_at(dv, s.dv_strides, b, j, hk); }
};

// Queries [i0, i0 + n) of head h as the backward's products read them: their Q rows (rotated
// with RoPE) into q and their dout rows into d, both with row stride Dp >= D, zero lanes past D.
void load_query_rows(float* q, float* d, int64_t Dp, const Problem& P, const Grads& g, int64_t b,
                     int64_t h, int64_t i0, int64_t n) {
    const AttentionShape& s = P.s;
    P.load_rows(q, Dp, P.q_row(b, i0, h), s.q_strides[1], n, P.off + i0);
    copy_rows_padded(d, Dp, g.dout + ((b * s.T + i0) * s.H + h) * s.D, s.H * s.D, n, s.D);
}

// The Q rows (rotated with RoPE) and dout rows of every query head of kv head hk, copied once for
// all its key blocks: pair[((h - hk G) T + i) Dp + d] for q, the same G T Dp floats later for
// dout (zero lanes past D). Copied per tile pair instead, a query block's rows were copied again
// by every key block that sees it: 36 times instead of 8 per head at T = 512, 20% of the backward.
int64_t pair_rows_floats(const AttentionShape& s, int64_t G) { return 2 * G * s.T * round_up(s.D, VEC); }
constexpr int64_t kPairRowsMax = int64_t(1) << 17;  // floats: 512 KiB
void copy_pair_rows(float* pair, const Problem& P, const Grads& g, int64_t b, int64_t hk) {
    const int64_t T = P.s.T, Dp = round_up(P.s.D, VEC);
    for (int64_t h = hk * P.G; h < (hk + 1) * P.G; ++h) {
        float* q = pair + (h - hk * P.G) * T * Dp;
        load_query_rows(q, q + P.G * T * Dp, Dp, P, g, b, h, 0, T);
    }
}

// dK and dV of keys [j0, j0 + nk) of kv head hk (all G query heads, every query block that sees
// them), written to dk/dv; with_dq also adds dS K into dq (the caller owns those dq rows). pair:
// copy_pair_rows's rows, or null to copy each query block's rows here. scratch: kv_block_scratch.
int64_t kv_block_scratch(int64_t D) { return 2 * D * BK + 2 * BQ * BK + (3 * BK + 3 * BQ) * round_up(D, VEC); }
void kv_block(const Problem& P, const Grads& g, int64_t b, int64_t hk, int64_t j0, bool with_dq,
              const float* pair, float* scratch) {
    const AttentionShape& s = P.s;
    const int64_t D = s.D, T = s.T, H = s.H, nk = std::min(BK, s.S - j0), kl = round_up(nk, VEC);
    const int64_t ks = s.k_strides[1];
    const float scale = P.scale;
    // Rows that a product reads as B (or writes as C) go through contiguous, zero-padded copies
    // of Dp floats: read in place, a whole (T, H, D) row apart (2 KiB at H = 8, D = 64), the 64
    // rows of a block fall into a few L1 sets and are fetched from L2 again for every 6-row tile
    // (the dq product ran at half the speed of the others before K was copied). dK and dV
    // accumulate as rows (keys x D), so they leave with a row copy, not a transpose (the
    // transposes of dK^T and dV^T cost 7% of the backward at B4 H8 T512 D64, perf).
    const bool dq_direct = D % VEC == 0;
    const int64_t Dp = round_up(D, VEC);
    float* kt = scratch;           // (D, kl)   K^T of the block, zero lanes past nk
    float* vt = kt + D * BK;       // (D, kl)   V^T
    float* dkb = vt + D * BK;      // (nk, Dp)  dK accumulator
    float* dvb = dkb + BK * Dp;    // (nk, Dp)  dV accumulator
    float* pb = dvb + BK * Dp;     // (nq, kl)  P
    float* dsb = pb + BQ * BK;     // (nq, kl)  dP, then dS
    float* kpad = dsb + BQ * BK;   // (nk, Dp)  K rows
    float* qc = kpad + BK * Dp;    // (nq, Dp)  Q rows of the query block
    float* dc = qc + BQ * Dp;      // (nq, Dp)  dout rows
    float* dqpad = dc + BQ * Dp;   // (nq, Dp)  dq rows (odd D only)

    const float* kb = P.k_row(b, j0, hk);
    if (P.rot) {  // K^T from the rotated rows
        P.load_rows(kpad, Dp, kb, ks, nk, j0);
        transpose_in(kt, kl, kpad, Dp, nk, D);
    } else {
        transpose_in(kt, kl, kb, ks, nk, D);
        if (with_dq) copy_rows_padded(kpad, Dp, kb, ks, nk, D);
    }
    transpose_in(vt, kl, P.v_row(b, j0, hk), s.v_strides[1], nk, D);

    // The first query that sees key j0 is j0 - off; earlier query blocks are skipped.
    const int64_t i_first = P.causal ? std::max<int64_t>(0, j0 - P.off) : 0;
    bool first = true;  // the first tile pair writes dK and dV, later ones add
    for (int64_t h = hk * P.G; h < (hk + 1) * P.G; ++h) {
        const float slope = P.slope(h);
        for (int64_t i0 = i_first / BQ * BQ; i0 < T; i0 += BQ) {
            const int64_t nq = std::min(BQ, T - i0), p0 = P.off + i0;
            const float* lp = g.lse + (b * H + h) * T + i0;
            const float* dlp = g.delta + (b * H + h) * T + i0;
            const float *qrows = qc, *drows = dc;
            if (pair) {
                qrows = pair + ((h - hk * P.G) * T + i0) * Dp;
                drows = qrows + P.G * T * Dp;
            } else {
                load_query_rows(qc, dc, Dp, P, g, b, h, i0, nq);
            }

            // S (nq x kl) = Q Kt and dP (nq x kl) = dO Vt; then in one pass over both tiles
            // P = exp(S scale + bias - lse) (0 where masked or past the last key) and
            // dS = P (dP - delta) scale.
            // On a diagonal tile only keys j0 + j <= p0 + i are computed; the rest is masked below.
            const bool mask = P.causal && j0 + nk - 1 > p0;
            const Band below = mask ? Band{Band::kLanesBelow, p0 - j0} : Band{};
            tile_gemm(pb, kl, qrows, Dp, 1, kt, kl, nq, D, kl, false, nullptr, below);
            tile_gemm(dsb, kl, drows, Dp, 1, vt, kl, nq, D, kl, false, nullptr, below);
            for (int64_t i = 0; i < nq; ++i) {
                float* prow = pb + i * kl;
                float* drow = dsb + i * kl;
                const float rel0 = (float)(p0 + i - j0), li = lp[i], di = dlp[i];
                for (int64_t j = 0; j < kl; j += VEC) {
                    const vfloat key = lane_index() + (float)j;
                    const vfloat rel = rel0 - key;
                    const vfloat p = vexp(biased_score(load(prow + j), scale, slope, rel) - li);
                    auto masked = key >= (float)nk;  // (never computed)
                    if (mask) masked |= rel < vfloat{};
                    store(prow + j, masked ? vfloat{} : p);
                    store(drow + j, masked ? vfloat{} : p * (load(drow + j) - di) * scale);
                }
            }
            // dV (nk x Dp) += P^T dO;  dK (nk x Dp) += dS^T Q. On a diagonal tile key j sees
            // only queries i >= j - (p0 - j0): the terms before are zeros and are skipped.
            const Band from = mask ? Band{Band::kStepsFrom, p0 - j0} : Band{};
            tile_gemm(dvb, Dp, pb, 1, kl, drows, Dp, nk, nq, Dp, !first, nullptr, from);
            tile_gemm(dkb, Dp, dsb, 1, kl, qrows, Dp, nk, nq, Dp, !first, nullptr, from);
            first = false;
            if (with_dq) {
                // dQ (nq x D) += dS (nq x nk) K (nk x D), lanes along D.
                float* dqp = g.dq_row(b, i0, h);
                const int64_t dqs = s.dq_strides[1];
                // The first key block is seen by every query: it writes dq, later ones add.
                const bool add = j0 > 0;
                const Band steps = mask ? Band{Band::kStepsBelow, p0 - j0} : Band{};
                if (dq_direct) {
                    tile_gemm(dqp, dqs, dsb, kl, 1, kpad, Dp, nq, nk, D, add, nullptr, steps);
                } else {
                    if (add) copy_rows_padded(dqpad, Dp, dqp, dqs, nq, D);  // (an overwrite writes every lane)
                    tile_gemm(dqpad, Dp, dsb, kl, 1, kpad, Dp, nq, nk, Dp, add, nullptr, steps);
                    for (int64_t i = 0; i < nq; ++i)
                        copy_row(dqp + i * dqs, dqpad + i * Dp, D);
                }
            }
        }
    }
    for (int64_t j = 0; j < nk; ++j) {
        float* dkr = g.dk_row(b, j0 + j, hk);
        float* dvr = g.dv_row(b, j0 + j, hk);
        if (first) {  // no query sees these keys: their gradients are empty sums
            std::fill(dkr, dkr + D, 0.0f);
            std::fill(dvr, dvr + D, 0.0f);
        } else {
            copy_row(dkr, dkb + j * Dp, D);
            copy_row(dvr, dvb + j * Dp, D);
            P.rotate_back(dkr, D, 1, j0 + j);
        }
    }
}

// dq of one block of queries of one head, queries along the lanes (like the forward):
// St = K Qt, dPt = V dOt, Pt and dSt in one pass, dQt (D x W) += K^T dSt.
int64_t dq_block_scratch(int64_t D) { return 3 * D * BQ + 2 * BK * BQ + (BQ + BK) * D; }
void dq_block(const Problem& P, const Grads& g, int64_t b, int64_t h, int64_t i0, float* scratch) {
    const AttentionShape& s = P.s;
    const int64_t D = s.D, T = s.T, H = s.H, nq = std::min(BQ, T - i0), W = round_up(nq, VEC);
    const int64_t hk = h / P.G, p0 = P.off + i0;
    const float slope = P.slope(h), scale = P.scale;
    float* qt = scratch;        // (D, W)  Q^T
    float* dot = qt + D * BQ;   // (D, W)  dout^T
    float* dqt = dot + D * BQ;  // (D, W)  dq^T accumulator
    float* st = dqt + D * BQ;   // (BK, W) scores
    float* dst = st + BK * BQ;  // (BK, W) dP, then dS
    float* qrot = dst + BK * BQ;  // (nq, D) rotated Q rows (RoPE only)
    float* krot = qrot + BQ * D;  // (nk, D) rotated K rows of the current block (RoPE only)
    alignas(64) float lv[BQ] = {}, dlv[BQ] = {};  // lse and delta; zero on padding lanes

    int64_t qstride;
    const float* qrows = P.q_rows(b, i0, nq, h, qrot, &qstride);
    transpose_in(qt, W, qrows, qstride, nq, D);
    transpose_in(dot, W, g.dout + ((b * T + i0) * H + h) * D, H * D, nq, D);
    std::fill(dqt, dqt + D * W, 0.0f);
    std::copy(g.lse + (b * H + h) * T + i0, g.lse + (b * H + h) * T + i0 + nq, lv);
    std::copy(g.delta + (b * H + h) * T + i0, g.delta + (b * H + h) * T + i0 + nq, dlv);

    const int64_t kend = P.key_end(i0, nq);
    for (int64_t j0 = 0; j0 < kend; j0 += BK) {
        const int64_t nk = std::min(BK, kend - j0);
        int64_t ks;
        const float* kb = P.k_rows(b, j0, nk, hk, krot, &ks);
        tile_gemm(st, W, kb, ks, 1, qt, W, nk, D, W, false);
        tile_gemm(dst, W, P.v_row(b, j0, hk), s.v_strides[1], 1, dot, W, nk, D, W, false);
        const bool mask = P.causal && j0 + nk - 1 > p0;
        for (int64_t j = 0; j < nk; ++j) {
            const float* srow = st + j * W;
            float* drow = dst + j * W;
            const float rel0 = (float)(p0 - (j0 + j));
            for (int64_t i = 0; i < W; i += VEC) {
                const vfloat rel = lane_index() + (float)i + rel0;
                vfloat p = vexp(biased_score(load(srow + i), scale, slope, rel) - load(lv + i));
                if (mask) p = rel < vfloat{} ? vfloat{} : p;
                store(drow + i, p * (load(drow + i) - load(dlv + i)) * scale);
            }
        }
        tile_gemm(dqt, W, kb, 1, ks, dst, W, D, nk, W, true);
    }
    transpose_out(g.dq_row(b, i0, h), s.dq_strides[1], dqt, W, nq, D, nullptr);
    P.rotate_back(g.dq_row(b, i0, h), s.dq_strides[1], nq, p0);
}

}  // namespace

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const AttentionShape& shape, bool causal, float scale,
                       const float* alibi_slopes, const float* rope) {
    const int64_t B = shape.B, T = shape.T, S = shape.S, H = shape.H, D = shape.D;
    if (B == 0 || T == 0 || H == 0 || shape.Hkv == 0) return;
    if (S == 0) {  // no keys: an empty sum (the Python layer rejects this case)
        std::fill(out, out + B * T * H * D, 0.0f);
        std::fill(lse, lse + B * H * T, -INFINITY);
        return;
    }
    const Problem P{shape, q, k, v, causal, scale, alibi_slopes, H / shape.Hkv, S - T, rope};

    if (2 * T < VEC) {
        // Decoding: a task per (batch, kv head, chunk of its query heads). Chunks of at most 64
        // heads, and small enough to give every thread two tasks where the heads allow it.
        const int64_t G = P.G, pairs = B * shape.Hkv;
        const int64_t chunks = std::max(ceil_div(G, 64), std::min(G, ceil_div(2 * max_threads(), pairs)));
        const int64_t per_chunk = ceil_div(G, chunks);
#pragma omp parallel
        {
            float* scratch = tls_scratch.get(forward_rows_scratch(per_chunk * T, D));
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < pairs * chunks; ++t) {
                const int64_t b = t / (shape.Hkv * chunks), hk = t / chunks % shape.Hkv;
                const int64_t h0 = hk * G + t % chunks * per_chunk;
                const int64_t h1 = std::min(h0 + per_chunk, (hk + 1) * G);
                if (h0 < h1) forward_rows(out, lse, P, b, hk, h0, h1, scratch);
            }
        }
        return;
    }
    // Tasks in (batch, head, query block) order, one contiguous range of them per thread
    // (task_ranges.h). One head's query blocks one after another, so that its K and V (256 KiB
    // at T = 512, D = 64) are read from L2 by every block after the first (head-minor order: 4%
    // slower at B=4 H=8 T=512). Within a head the last blocks, which see the most keys (causal),
    // go first: the tasks a thread steals from the back of another's range are the lightest,
    // and the threads finish together.
    const int64_t nqb = ceil_div(T, BQ), BH = B * H;
    TaskRanges tasks(BH * nqb, max_threads());
#pragma omp parallel
    {
        float* scratch = tls_scratch.get(forward_block_scratch(D));
        for (int64_t t, prev = -1; (t = tasks.next(thread_id())) >= 0; prev = t) {
            const int64_t qb = nqb - 1 - t % nqb, b = t / nqb / H, h = t / nqb % H;
            // The task before it, a later block of the same head, read every key it can see.
            const bool kv_cached = prev == t - 1 && t % nqb > 0;
            forward_block(out, lse, P, b, h, qb * BQ, kv_cached, scratch);
        }
    }
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                        const float* k, const float* v, const float* out, const float* lse,
                        const AttentionShape& shape, bool causal, float scale,
                        const float* alibi_slopes, const float* rope) {
    const int64_t B = shape.B, T = shape.T, S = shape.S, H = shape.H, Hkv = shape.Hkv, D = shape.D;
    if (B == 0 || Hkv == 0) return;
    if (S == 0) {  // no keys: every gradient is an empty sum (the Python layer rejects this case)
        for (int64_t b = 0; b < B; ++b)
            for (int64_t t = 0; t < T; ++t)
                for (int64_t h = 0; h < H; ++h) {
                    float* row = row_at(dq, shape.dq_strides, b, t, h);
                    std::fill(row, row + D, 0.0f);
                }
        return;
    }
    const Problem P{shape, q, k, v, causal, scale, alibi_slopes, H / Hkv, S - T, rope};

    // delta (B, H, T) = rowsum(dout * out): the softmax backward's per-row term, once per row.
    AlignedBuffer delta_buf;
    float* delta = delta_buf.get(std::max<int64_t>(1, B * H * T));
    // (Loops over b, t, h rather than one flat row index: three integer divisions per 64-float
    // row to recover them cost ~8% of the backward at B16 H4 T128 D64, perf.)
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t)
            for (int64_t h = 0; h < H; ++h) {  // (b, t, h): the row order of dout and out
                const float* a = dout + ((b * T + t) * H + h) * D;
                const float* o = out + ((b * T + t) * H + h) * D;
                delta[(b * H + h) * T + t] = row_sum(
                    D, [&](int64_t d) { return load(a + d) * load(o + d); },
                    [&](int64_t d) { return a[d] * o[d]; });
            }
    const Grads g{shape, dq, dk, dv, dout, lse, delta};

    const int64_t nkb = ceil_div(S, BK), nqb = ceil_div(T, BQ), pairs = B * Hkv;
    const int64_t scratch_floats = kv_block_scratch(D);
    // One task per (batch, kv head) does 5 tile products per tile pair; the two-pass scheme does
    // 7 but has nkb times more tasks. Pick the one pass when whole rounds of it keep the
    // threads at least 5/7 busy.
    const int64_t threads = max_threads();
    const bool one_pass = 5 * ceil_div(pairs, threads) * threads <= 7 * pairs;
    if (one_pass) {
        // The pair's Q and dout rows are copied once per task while they fit in a quarter of
        // L2 (G T <= 1024 at D = 64) and there are more than two key blocks; longer sequences
        // copy them per tile pair, and so do two key blocks (T <= 128), where copying up front
        // saves one copy in three and was 2% slower in the cpu-small training step, measured.
        const int64_t pair_floats = pair_rows_floats(shape, P.G);
        const bool copy_pair = pair_floats <= kPairRowsMax && nkb > 2;
        TaskRanges tasks(pairs, threads);  // (batch, kv head) order, a range per thread
#pragma omp parallel
        {
            float* scratch = tls_scratch.get(scratch_floats + (copy_pair ? pair_floats : 0));
            float* pair = copy_pair ? scratch + scratch_floats : nullptr;
            for (int64_t t; (t = tasks.next(thread_id())) >= 0;) {
                const int64_t b = t / Hkv, hk = t % Hkv;
                if (pair) copy_pair_rows(pair, P, g, b, hk);
                // Key block 0 writes this pair's dq rows (every query sees key 0), the rest add.
                for (int64_t kb = 0; kb < nkb; ++kb) kv_block(P, g, b, hk, kb * BK, true, pair, scratch);
                // The pair's finished dq rows, rotated back (RoPE) while they are in cache.
                for (int64_t h = hk * P.G; h < (hk + 1) * P.G; ++h)
                    P.rotate_back(g.dq_row(b, 0, h), shape.dq_strides[1], T, P.off);
            }
        }
        return;
    }
#pragma omp parallel
    {
        float* scratch = tls_scratch.get(std::max(scratch_floats, dq_block_scratch(D)));
        // Causal: the first key blocks are seen by the most queries; the last query blocks see
        // the most keys. Both loops hand out their heaviest tasks first.
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < pairs * nkb; ++t) {
            const int64_t kb = t / pairs, b = t % pairs / Hkv, hk = t % Hkv;
            kv_block(P, g, b, hk, kb * BK, false, nullptr, scratch);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < B * H * nqb; ++t) {
            const int64_t qb = nqb - 1 - t / (B * H), b = t % (B * H) / H, h = t % H;
            dq_block(P, g, b, h, qb * BQ, scratch);
        }
    }
}

}  // namespace LLMCORE_ISA
}  // namespace llmcore
