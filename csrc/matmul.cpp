// matmul: a packed, cache-blocked GEMM around a register-tiled micro-kernel (the BLIS/GotoBLAS
// structure), plus the bias gradient of linear layers.
//
//   for jc in N by NC:
//     for kk in K by KCHUNK:      B panel (KCHUNK x NC; all of K unless K is huge) packed once,
//                                 shared by all threads (L3)
//       for ic in M by MC:        one task per row block (x group of columns)     <- parallel
//         for pc in KCHUNK by KC: A block (MC x KC) packed per task (L2)
//         for jr in NC by NR:     B micro-panel (KC x NR) reused across ir (L1)
//           for ir in MC by MR:   MR x NR accumulators in registers
//
// The micro-kernel is written with GCC vector extensions, so one source gives SSE, AVX2 and
// AVX-512 code depending on the translation unit's flags: VEC floats per register, an MR x 2VEC
// tile in 2*MR registers (sizes below). Packing turns every transpose combination into the same
// contiguous layout, and zero-pads ragged edges so the micro-kernel never branches on them.
#include <algorithm>

#include "aligned_buffer.h"
#include "common.h"
#include "kernels.h"
#include "transpose8.h"

namespace llmcore {
namespace LLMCORE_ISA {
namespace {

// AVX-512 has 32 registers: a 12 x 32 tile is 24 accumulators plus two B rows and a broadcast.
// Measured on the 2-core Xeon VM, one thread, 2048^3: 12 x 32 ran at 164 GFLOP/s against 132 for
// 6 x 32 (the C tile is loaded and stored once per KC block either way; the bigger tile does twice
// the FMAs per broadcast). AVX2 and SSE have 16 registers: 6 x 2VEC (12 accumulators).
constexpr int MR = VEC == 16 ? 12 : 6;
constexpr int NR = 2 * VEC;
// A KC x NR micro-panel of B stays in L1 (32 KiB at AVX-512, 16 KiB at AVX2) while the MC/MR
// A micro-panels stream past it from L2.
constexpr int64_t KC = 256;
// Rows of A per task: a MC x KC block of A (up to 288 KiB) in L2. Where the packed B panel fits
// in L2, small row blocks of MC_SMALL rows make many tasks (22 for the 2048 tokens of a cpu-small
// batch), so the dynamic schedule evens out the threads at each GEMM's end barrier; with 24 * MR
// rows (8 tasks) a thread sat idle for up to half a task per GEMM in the training step (its GEMMs:
// 140.5 ms at 8 * MR against 145.6 at 24 * MR, alternating builds; 142 at 6 and 12, 143 at 4).
// A larger B panel streams from L3 once per task, so there fewer, larger tasks win: the vocabulary
// projection 512 x 768 -> 50257 took 170 ms with 8 * MR rows against 149 with 24 * MR.
constexpr int64_t MC = MR * 24;
constexpr int64_t MC_SMALL = MR * 8;
constexpr int64_t kSmallPackedB = 1 << 18;  // floats (1 MiB): "fits in L2" for MC_SMALL
constexpr int64_t NC = 4096;  // the widest B panel
constexpr int64_t kPackedB = 1 << 21;  // floats of packed B (8 MiB), shared in L3
constexpr int64_t kInPlaceMaxN = 512;  // the widest C for which A is read without packing


thread_local AlignedBuffer tls_packed_a, tls_packed_b;

// How the tile of C is written: the first K block overwrites (plus bias and residual), later
// ones add.
struct Epilogue {
    bool add;                // C += tile, else C = tile
    const float* bias;       // added to every row (first K block only), or null
    const float* residual;   // the tile's place in an array laid out as C, added (first K block
                             // only), or null
};

// Where the micro-kernel reads its MR x kc slice of op(A):
//   PackedA: op(A)(r, k) at ap[k * MR + r], a packed micro-panel;
//   RowsA:   op(A)(r, k) at a[r * lda + k], a row-major A read in place.
// Reading A in place skips packing it: packing costs one pass over the A block per task, which
// next to the 2 * N FLOPs per element of the task is ~10% at N = 256 (measured: the 12 x 32
// kernel runs at the same 191-195 GFLOP/s on an L2-resident A either way, one core).
struct PackedA {
    const float* ap;
    float operator()(int64_t k, int r) const { return ap[k * MR + r]; }
};
struct RowsA {
    const float* a;
    int64_t lda;
    // Rows in groups of four from one base pointer (x86 addressing reaches base + index * 1..8,
    // so four offsets 0, lda, 2 lda, 3 lda in registers cover a group).
    float operator()(int64_t k, int r) const { return a[(r / 4) * 4 * lda + (r % 4) * lda + k]; }
};

// acc (MR x NR) = sum over k < kc of op(A)[:, k] (MR) outer Bp[k] (NR), then written to C.
template <class A>
inline void micro_kernel(int64_t kc, A a, const float* __restrict bp, float* __restrict c,
                         int64_t ldc, int mr, int nr, Epilogue ep) {
    vfloat acc[MR][2] = {};
    // The C tile is read (after the first K block) and written once per KC block; start its
    // lines on their way now so the epilogue does not wait on them (~+5% at 4096 x 768 x 3072).
    for (int r = 0; r < mr; ++r) {
        __builtin_prefetch(c + r * ldc, 1, 3);
        __builtin_prefetch(c + r * ldc + NR - 1, 1, 3);
    }
    for (int64_t k = 0; k < kc; ++k) {
        const vfloat b0 = load(bp + k * NR), b1 = load(bp + k * NR + VEC);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
            const float ak = a(k, r);
            acc[r][0] += ak * b0;
            acc[r][1] += ak * b1;
        }
    }
    if (ep.bias && nr == NR) {
        const vfloat bias0 = load(ep.bias), bias1 = load(ep.bias + VEC);
        for (int r = 0; r < MR; ++r) { acc[r][0] += bias0; acc[r][1] += bias1; }
    }
    if (mr == MR && nr == NR) {
        for (int r = 0; r < MR; ++r) {
            float* row = c + r * ldc;
            if (ep.residual) {
                acc[r][0] += load(ep.residual + r * ldc);
                acc[r][1] += load(ep.residual + r * ldc + VEC);
            }
            if (ep.add) {
                store(row, load(row) + acc[r][0]);
                store(row + VEC, load(row + VEC) + acc[r][1]);
            } else {
                store(row, acc[r][0]);
                store(row + VEC, acc[r][1]);
            }
        }
        return;
    }
    // Ragged edge: spill the tile and copy the part that exists.
    alignas(64) float tile[MR][NR];
    for (int r = 0; r < MR; ++r) { store(tile[r], acc[r][0]); store(tile[r] + VEC, acc[r][1]); }
    for (int r = 0; r < mr; ++r) {
        float* row = c + r * ldc;
        for (int j = 0; j < nr; ++j) {
            float t = tile[r][j] + (ep.bias && nr != NR ? ep.bias[j] : 0.0f);
            if (ep.residual) t += ep.residual[r * ldc + j];
            row[j] = ep.add ? row[j] + t : t;
        }
    }
}

// Packs op(A)[i0:i0+mc, p0:p0+kc] into MR-row micro-panels: ap[panel][k][r], zero-padded rows.
void pack_a(float* ap, const float* a, bool trans, int64_t M, int64_t K, int64_t i0, int64_t mc,
            int64_t p0, int64_t kc) {
    if (trans) {
        // op(A)(i, k) = a[k * M + i]: source row k holds the block's mc values of i in a row.
        // Take kChunk source rows at a time and deal each panel its MR floats of every one of
        // them, so each panel receives kChunk * MR contiguous floats and each source row is read
        // left to right. (One panel's 12 floats walked down all kc rows, 4 KiB apart, stalled on
        // loads; dealing one row at a time to every panel, 12 KiB apart, on 4K-aliased stores:
        // each cost ~10% of a weight-gradient GEMM, perf at 2048 x 1024 x 256.)
        constexpr int64_t kChunk = 8;
        for (int64_t k0 = 0; k0 < kc; k0 += kChunk) {
            const int64_t k1 = std::min(kc, k0 + kChunk);
            for (int64_t ir = 0; ir < mc; ir += MR) {
                const int rows = (int)std::min<int64_t>(MR, mc - ir);
                for (int64_t k = k0; k < k1; ++k) {
                    const float* src = a + (p0 + k) * M + i0 + ir;
                    float* dst = ap + ir * kc + k * MR;
                    if (rows == MR) {
                        std::memcpy(dst, src, MR * sizeof(float));
                    } else {
                        for (int r = 0; r < MR; ++r) dst[r] = r < rows ? src[r] : 0.0f;
                    }
                }
            }
        }
        return;
    }
    // op(A)(i, k) = a[i * K + k]: each full panel transposed in 8 x 8 blocks (rows 0-7, then the
    // MR - 8 left), the k tail and a ragged last panel element by element.
    for (int64_t ir = 0; ir < mc; ir += MR) {
        const int rows = (int)std::min<int64_t>(MR, mc - ir);
        float* dst = ap + ir * kc;
        const float* src = a + (i0 + ir) * K + p0;
        int64_t k = 0;
        if (rows == MR) {
            for (; k + 8 <= kc; k += 8) {
                transpose_block8<std::min(MR, 8)>(dst + k * MR, MR, src + k, K);
                if constexpr (MR > 8) transpose_block8<MR - 8>(dst + k * MR + 8, MR, src + 8 * K + k, K);
            }
        }
        for (; k < kc; ++k)
            for (int r = 0; r < MR; ++r) dst[k * MR + r] = r < rows ? src[r * K + k] : 0.0f;
    }
}

// Packs one NR-column micro-panel op(B)[p0:p0+kc, j0:j0+NR] into bp[k][j], zero-padded columns.
void pack_b_panel(float* bp, const float* b, bool trans, int64_t N, int64_t K, int64_t j0,
                  int64_t p0, int64_t kc) {
    const int cols = (int)std::min<int64_t>(NR, N - j0);
    if (!trans) {  // op(B)(k, j) = b[k * N + j]: rows are contiguous
        for (int64_t k = 0; k < kc; ++k) {
            const float* src = b + (p0 + k) * N + j0;
            float* dst = bp + k * NR;
            if (cols == NR) {
                store(dst, load(src));
                store(dst + VEC, load(src + VEC));
            } else {
                for (int j = 0; j < cols; ++j) dst[j] = src[j];
                for (int j = cols; j < NR; ++j) dst[j] = 0.0f;
            }
        }
    } else {  // op(B)(k, j) = b[j * K + k]: 8 x 8 blocks transposed, then the ragged rest
        const float* src = b + j0 * K + p0;
        const int full_cols = cols / 8 * 8;
        const int64_t full_k = kc / 8 * 8;
        for (int j = 0; j < full_cols; j += 8)
            for (int64_t k = 0; k < full_k; k += 8) transpose_block8<8>(bp + k * NR + j, NR, src + j * K + k, K);
        for (int j = 0; j < NR; ++j)
            for (int64_t k = (j < full_cols ? full_k : 0); k < kc; ++k) bp[k * NR + j] = j < cols ? src[j * K + k] : 0.0f;
    }
}


// One C (M,N) = op(A) @ op(B); threads split the work when `parallel` (otherwise the caller is
// already running one GEMM per thread).
void gemm_one(float* c, const float* a, const float* b, const float* bias, const float* residual,
              int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, bool accumulate,
              bool parallel) {
    if (K == 0) {  // C = bias + residual (or 0), plus C when accumulating
        for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < N; ++j)
                c[i * N + j] = (accumulate ? c[i * N + j] : 0.0f) + (bias ? bias[j] : 0.0f) +
                               (residual ? residual[i * N + j] : 0.0f);
        return;
    }
    // The B panel holds every K block of its columns, packed before any product starts: one
    // barrier per panel instead of two per K block (a weight gradient, K = 2048 tokens, had 16),
    // and each task then runs its whole K loop alone with its C block warm in L2. Where all of
    // K does not fit in kPackedB floats, the panel keeps its width and takes K in chunks of whole
    // KC blocks (narrowing it instead re-read A once per micro-panel: the dx of a 50257-word
    // vocabulary projection, K = 50257, ran at a third of the speed).
    const int64_t nc_max = std::min(NC, ceil_div(N, NR) * NR);
    const int64_t kchunk = std::min(K, std::max<int64_t>(KC, kPackedB / nc_max / KC * KC));
    float* packed_b = tls_packed_b.get(kchunk * nc_max);
    const int threads = parallel ? max_threads() : 1;
    // Packing an A block costs one pass over it per task, against 2 * N FLOPs per element of
    // work: ~10% at N = 256, noise at N = 3072. Read in place, A's rows are KC-float pieces a
    // whole row apart, which at wide K cost more than packing saves. Measured on the 2-core VM,
    // in place vs packed: 2048 x 256 -> 256 302 vs 286 GFLOP/s; 2048^3 267 vs 294.
    // A transposed is always packed: read in place, each k step would touch a new line 4 KiB
    // (M floats) from the last, and a weight-gradient GEMM ran at 90 GFLOP/s instead of 154.
    const bool in_place_a = !trans_a && N <= kInPlaceMaxN;

#pragma omp parallel num_threads(threads)
    {
        float* packed_a = tls_packed_a.get(MC * std::min(KC, K));
        // One step per (panel of columns, chunk of K): pack it, then every task's products.
        const int64_t chunks = ceil_div(K, kchunk);
        for (int64_t step = 0; step < ceil_div(N, nc_max) * chunks; ++step) {
            const int64_t jc = step / chunks * nc_max, k0 = step % chunks * kchunk;
            const int64_t nc = std::min(nc_max, N - jc), k1 = std::min(K, k0 + kchunk);
            const int64_t panels = ceil_div(nc, NR);
            // K block p of the chunk (rows pc = k0 + p KC .. pc + kc) of micro-panel jr at
            // packed_b[(pc - k0) * panels NR + jr * kc * NR]: each block's panels in a row.
#pragma omp for schedule(static)
            for (int64_t t = 0; t < ceil_div(k1 - k0, KC) * panels; ++t) {
                const int64_t pc = k0 + t / panels * KC, jr = t % panels, kc = std::min(KC, k1 - pc);
                pack_b_panel(packed_b + (pc - k0) * panels * NR + jr * kc * NR, b, trans_b, N, K,
                             jc + jr * NR, pc, kc);
            }

            // Tasks: row blocks x groups of B micro-panels, as equal as MR-row granularity
            // allows and a multiple of the thread count, so no thread waits at the barrier
            // for a straggler (2048 rows as 7 blocks of 288 and one of 32 left one of two
            // threads idle 12% of the time).
            const int64_t units = ceil_div(M, MR);  // MR-row micro-panels of A
            const int64_t mc_units = ((k1 - k0) * nc <= kSmallPackedB ? MC_SMALL : MC) / MR;
            const int64_t row_blocks = std::min(units, ceil_div(ceil_div(units, mc_units), threads) * threads);
            const int64_t groups = std::min(panels, ceil_div(2 * threads, row_blocks));
#pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < row_blocks * groups; ++task) {
                const int64_t rb = task / groups, g = task % groups;
                const int64_t ic = units * rb / row_blocks * MR;
                const int64_t mc = std::min(M, units * (rb + 1) / row_blocks * MR) - ic;
                const int64_t jr_begin = panels * g / groups, jr_end = panels * (g + 1) / groups;
                // A row-major next to a narrow C is read in place, all but a ragged last
                // micro-panel, which is packed zero-padded; otherwise the block is packed.
                const int64_t full = in_place_a ? mc / MR * MR : 0;
                for (int64_t pc = k0; pc < k1; pc += KC) {
                    const int64_t kc = std::min(KC, k1 - pc);
                    if (full < mc) pack_a(packed_a, a, trans_a, M, K, ic + full, mc - full, pc, kc);
                    for (int64_t jr = jr_begin; jr < jr_end; ++jr) {
                        const int64_t j0 = jc + jr * NR;
                        const int nr = (int)std::min<int64_t>(NR, N - j0);
                        const float* bp = packed_b + (pc - k0) * panels * NR + jr * kc * NR;
                        float* cp = c + ic * N + j0;
                        // The first K block overwrites (plus bias and residual), later ones add.
                        const bool first = pc == 0;
                        const float* rp = first && residual ? residual + ic * N + j0 : nullptr;
                        auto epilogue = [&](int64_t ir) {
                            return Epilogue{accumulate || !first, first && bias ? bias + j0 : nullptr,
                                            rp ? rp + ir * N : nullptr};
                        };
                        for (int64_t ir = 0; ir < full; ir += MR)
                            micro_kernel(kc, RowsA{a + (ic + ir) * K + pc, K}, bp, cp + ir * N, N, MR, nr,
                                         epilogue(ir));
                        for (int64_t ir = full; ir < mc; ir += MR)
                            micro_kernel(kc, PackedA{packed_a + (ir - full) * kc}, bp, cp + ir * N, N,
                                         (int)std::min<int64_t>(MR, mc - ir), nr, epilogue(ir));
                    }
                }
            }
        }
    }
}

// Split-K, for a linear layer's weight gradient dW (out, in) = dy^T (out, tokens) @ x (tokens,
// in): C is small and K (the tokens of a batch) long. Split by rows or columns, every task
// streams its share of the packed B from L3 once per row block, and each thread packed an A
// block per task: at 256 x 256 x 2048 the threads moved ~6 MB each for 67 MFLOP and ran at
// 250 GFLOP/s against 350 for the other GEMMs of the same layers (measured on the 2-core VM).
// Cut K instead into pieces of kSplitK, one whole single-thread GEMM each: its B (kSplitK x N)
// stays in L2 with its C, and only the pieces' partial C (at most kSplitKMaxC floats) are added
// afterwards. Pieces are fixed by the shape alone and summed in piece order, so the result does
// not depend on the thread count (nor does the choice of this path). Only for trans_a &&
// !trans_b, where a piece of K is a contiguous block of both operands (rows k0..k1 of the stored
// a and b). Measured against the split by rows and columns, both threads, the four weight
// gradients of a cpu-small layer (K = 2048): 2.67 -> 2.47 ms (768 x 256), 1.11 -> 0.92
// (256 x 256), 3.41 -> 3.14 (1024 x 256), 3.48 -> 3.42 (256 x 1024).
constexpr int64_t kSplitK = 1024;
constexpr int64_t kSplitKMaxC = int64_t(1) << 18;  // 1 MiB of partial C per piece
thread_local AlignedBuffer tls_split_k;

bool use_split_k(int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b) {
    return trans_a && !trans_b && M * N <= kSplitKMaxC && K >= 2 * kSplitK;
}

void gemm_split_k(float* c, const float* a, const float* b, const float* bias, const float* residual,
                  int64_t M, int64_t N, int64_t K, bool accumulate) {
    const int64_t pieces = ceil_div(K, kSplitK);
    // Piece 0 writes C itself, with the caller's bias, residual and accumulate; piece p > 0 its
    // own partial, added below.
    float* partials = tls_split_k.get((pieces - 1) * M * N);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t p = 0; p < pieces; ++p) {
        const int64_t k0 = p * kSplitK, kc = std::min(kSplitK, K - k0);
        const bool first = p == 0;
        gemm_one(first ? c : partials + (p - 1) * M * N, a + k0 * M, b + k0 * N, first ? bias : nullptr,
                 first ? residual : nullptr, M, N, kc, true, false, first && accumulate, false);
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; ++i)
        for (int64_t p = 1; p < pieces; ++p) add_row(c + i * N, partials + ((p - 1) * M + i) * N, N);
}

}  // namespace

void gemm(float* c, const float* a, const float* b, const float* bias, const float* residual,
          int64_t batch, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b,
          int64_t batch_stride_a, int64_t batch_stride_b, int64_t batch_stride_c, bool accumulate) {
    if (batch <= 0 || M <= 0 || N <= 0) return;
    if (batch == 1 && use_split_k(M, N, K, trans_a, trans_b))
        return gemm_split_k(c, a, b, bias, residual, M, N, K, accumulate);
    auto product = [&](int64_t i, bool parallel) {
        gemm_one(c + i * batch_stride_c, a + i * batch_stride_a, b + i * batch_stride_b, bias,
                 residual ? residual + i * batch_stride_c : nullptr, M, N, K, trans_a, trans_b,
                 accumulate, parallel);
    };
    // Many small products: one whole GEMM per thread beats splitting each one.
    const bool per_thread = batch >= 2 * max_threads() || (batch > 1 && M * N * K < (int64_t)1 << 18);
    if (per_thread) {
#pragma omp parallel for schedule(dynamic, 1)
        for (int64_t i = 0; i < batch; ++i) product(i, false);
    } else {
        for (int64_t i = 0; i < batch; ++i) product(i, true);
    }
}

void bias_backward(float* dbias, const float* dy, int64_t M, int64_t N, bool accumulate) {
    // Threads own column ranges, so the sum over rows is race-free and the same for any thread
    // count; within a range the row loop is outermost so each row of dy streams contiguously.
    constexpr int64_t kCols = 256;
#pragma omp parallel for schedule(static)
    for (int64_t j0 = 0; j0 < N; j0 += kCols) {
        const int64_t j1 = std::min(N, j0 + kCols);
        if (!accumulate)
            for (int64_t j = j0; j < j1; ++j) dbias[j] = 0.0f;
        for (int64_t i = 0; i < M; ++i) {
            const float* row = dy + i * N;
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) dbias[j] += row[j];
        }
    }
}

}  // namespace LLMCORE_ISA
}  // namespace llmcore
