// matmul: C[b] = op(A[b]) @ op(B[b]) (+ bias) (+ C[b]) on the GPU in three precisions, and the
// bias gradient of linear layers.
//
// Every kernel here computes one square tile of C per block (256 threads) while walking K in
// steps of BK, with a multi-stage cp.async pipeline: tile kt+STAGES-1 is copied global -> shared
// while tile kt is multiplied, so the copies hide behind the math.
//
//   for each (batch z, tile of C):          one block each: blockIdx.z (65535 per launch), blockIdx.x
//     prologue: start the copies of K-tiles 0 .. STAGES-2
//     for kt in K-tiles:
//       wait until this thread's copies of tile kt have landed
//       (TF32 only) round those elements to tf32 in place
//       __syncthreads
//       start the copy of tile kt+STAGES-1 into the stage tile kt-1 used (everyone is done with it)
//       multiply the stage of tile kt into the accumulators (registers)
//     epilogue: C = acc (+ bias) (+ C), guarded stores
//
// Shared memory holds fp32 tiles in the orientation they have in global memory, so every copy is
// a straight cp.async (16 bytes when the pointer and leading dimension allow it, else 4 bytes):
//   "k-contiguous" tile  [BM rows][BK]   -- A when not transposed, B when transposed
//   "mn-contiguous" tile [BK][BM cols]   -- A when transposed, B when not transposed
// The transpose is absorbed by the shared-memory offset functions a_off/b_off, which the math
// uses to read op(A)(m, k) and op(B)(k, n) from either orientation. Ragged edges (M, N, K not
// multiples of the tile) are zero-filled by cp.async's src-size operand, so the math never
// branches on them, and the epilogue's stores are guarded.
//
// TF32 / BF16 (tensor cores, mma.sync): BK = 32, 8 warps as 2 (M) x 4 (N), two tile shapes:
//   Big   128 x 128, 3 stages (108 KiB), warp tile 64 x 32 = 4 x 4 mma tiles, 2 blocks/SM;
//   Small  64 x 64,  4 stages (72 KiB),  warp tile 32 x 16 = 2 x 2 mma tiles, 3 blocks/SM,
// Small only when Big would give fewer than 2 blocks per SM (e.g. the 768 x 768 weight gradient:
// 36 big blocks, 144 small ones on 132 SMs). Operands are rounded to tf32 (cvt.rna.tf32.f32)
// once per element per block: each thread rounds the elements it copied itself, after its
// cp.async group has landed and before the barrier that publishes the tile (a thread sees its
// own completed cp.async writes; nobody else touches them until the barrier), so fragment reads
// are plain loads. BF16 (cvt.rn.bf16x2.f32 = round-to-nearest-even) packs pairs as the
// fragments are read, since packing changes the layout.
// Fragment reads: a k-contiguous tile is read with ldmatrix.x4, which without .trans moves whole
// 32-bit words: lane (g, t) gets word t of row g of each 8 x 4-word matrix, which is exactly the
// tf32 A (rows g, g+8; columns t, t+4) and B fragments; BF16 loads two and packs. mn-contiguous
// tiles are read with scalar loads (ldmatrix cannot transpose 32-bit elements). Padding makes
// every read conflict-free:
//   k-contiguous rows of 36 floats: ldmatrix phase reads 8 rows x 4 words -> banks 4r + w, all
//                                   distinct; scalar lane (g, t) word 36 g + t -> bank 4 g + t
//   mn-contiguous rows of BM + 8:   lane (g, t) reads word (BM + 8) t + g -> bank 8 t + g
// (g = lane / 4, t = lane % 4, the groupID / threadID_in_group of the PTX fragment tables). Both
// paddings keep rows 16-byte aligned for cp.async and ldmatrix.
// BF16 trick: the k16 fragment wants, per thread, the k pair (2t, 2t+1) in one register. Any
// permutation of k that A and B share leaves the dot product unchanged, so we feed logical k
// 2t+i from physical k t+4i (and 8+2t+i from 8+t+4i): every bf16 read then hits the same (g, t)
// pattern as tf32 (and the same ldmatrix matrices), and both precisions share one kernel.
//
// FP32 (CUDA cores, exact fp32 FMA): BK = 8, 4 stages, both tiles stored k-major ([BK][128], rows
// of 132 floats) so each thread reads its 8 rows of A and 8 columns of B as two float4 each per k
// and does 64 FMAs. Thread (ty, tx) owns rows {ty*4 + i, 64 + ty*4 + i} and columns {tx*4 + j,
// 64 + tx*4 + j}; a warp is 4 ty x 8 tx, so each float4 read is one conflict-free wavefront. A
// (not transposed) and B (transposed) are k-contiguous in global memory and are transposed on
// the way in by 4-byte cp.async into [k][m] (padding 132 = 4 mod 32 keeps those stores
// conflict-free).
//
// Indices: row and column numbers of C, A, B are int64 (batch * stride and M * K may exceed
// 2^31); offsets inside a tile are int. Tiles are walked in groups of 8 tile-rows so that the
// blocks running at the same time share A and B panels in L2.
//
// bias_backward: dbias[n] = sum over rows of dy[:, n]. One block per strip of W columns, 1024/W
// threads down the rows, each summing a fixed set of rows in a fixed order, then a fixed-order
// tree over the partials in shared memory: deterministic, no atomics, no workspace.
#include <atomic>
#include <climits>
#include <cstring>
#include <stdexcept>

#include "common.cuh"
#include "kernels.cuh"

namespace llmcore::cuda {
namespace {

// ---- PTX wrappers ---------------------------------------------------------------------------
// The host versions exist only so that a CPU test can drive the index arithmetic below (tile
// copies, fragment reads, epilogue) through the very same functions; kernels use the PTX.

// dst[0..3] = src[0..3], the bytes past src_bytes (0 or 16 in practice) zero-filled; no global read
// when src_bytes == 0. L1 bypassed (.cg): the tile is reused from shared memory, not L1.
__host__ __device__ __forceinline__ void cp_async16(float* dst, const float* src, int src_bytes) {
#ifdef __CUDA_ARCH__
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes)
                 : "memory");
#else
    for (int i = 0; i < 4; ++i) dst[i] = 4 * i < src_bytes ? src[i] : 0.0f;
#endif
}

// dst[0] = src_bytes ? src[0] : 0.
__host__ __device__ __forceinline__ void cp_async4(float* dst, const float* src, int src_bytes) {
#ifdef __CUDA_ARCH__
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes)
                 : "memory");
#else
    dst[0] = src_bytes ? src[0] : 0.0f;
#endif
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// fp32 -> tf32 (round to nearest, ties away from zero), kept in a 32-bit register.
__host__ __device__ __forceinline__ uint32_t to_tf32(float x) {
#ifdef __CUDA_ARCH__
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
#else
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return (u + 0x1000u) & 0xffffe000u;  // finite inputs only (host checks use small integers)
#endif
}

__host__ __device__ __forceinline__ uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
#endif
}

__host__ __device__ __forceinline__ float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float x;
    std::memcpy(&x, &u, 4);
    return x;
#endif
}

// x rounded to tf32 and stored as the fp32 of the same value (low 13 mantissa bits zero).
__host__ __device__ __forceinline__ float tf32_round(float x) { return bits_float(to_tf32(x)); }

// ldmatrix.x4 on 32-bit data: four 8 x 4-word matrices; lanes 8q .. 8q+7 give the rows of matrix
// q (row r at base + lane_off(8q + r), 16-byte aligned), and register q of lane (g, t) receives
// word t of row g of matrix q. Only the b16 form exists, but without .trans it moves pairs of
// b16 as whole 32-bit words, which is exactly a tf32 (or fp32) element. The host version reads
// what the hardware would hand to `lane`, so a CPU test can drive the same fragment code.
template <class LaneOff>
__host__ __device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const float* base, int lane, LaneOff lane_off) {
#ifdef __CUDA_ARCH__
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(base + lane_off(lane)));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
#else
    for (int q = 0; q < 4; ++q) r[q] = float_bits(base[lane_off(8 * q + lane / 4) + lane % 4]);
#endif
}

// Two fp32 -> one register of two bf16 (round to nearest even): `lo` in bits 0-15 (the element
// with the smaller k in a fragment), `hi` in bits 16-31. cvt puts its first source in the upper
// half, hence the swapped operands.
__host__ __device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
#ifdef __CUDA_ARCH__
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    uint32_t l, h;
    std::memcpy(&l, &lo, 4);
    std::memcpy(&h, &hi, 4);
    l = (l + 0x7fffu + ((l >> 16) & 1u)) >> 16;
    h = (h + 0x7fffu + ((h >> 16) & 1u)) >> 16;
    return (h << 16) | l;
#endif
}

// d (16x8, fp32) += a (16x8, tf32, row) @ b (8x8, tf32, col).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d (16x8, fp32) += a (16x16, bf16, row) @ b (16x8, bf16, col).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---- what every kernel is told ---------------------------------------------------------------
struct GemmParams {
    float* c;
    const float* a;
    const float* b;
    const float* bias;  // (N,) or null
    int64_t M, N, K;
    int64_t stride_a, stride_b, stride_c;  // elements between batch entries (0: shared)
    int64_t m_tiles, n_tiles;
    bool accumulate;
    bool vec_a, vec_b;  // 16-byte copies are legal for A / B (see can_vectorize)
    bool vec_c;         // the epilogue may store C in float2 (tensor cores) / float4 (fp32)
};

// Which tile of C the block's `tile`-th item is: column-major inside groups of 8 tile-rows, so
// that consecutive blocks reuse the same few A row-panels and sweep B (better L2 hit rate than
// plain row-major order). Every tile < m_tiles * n_tiles maps to a distinct (tm, tn).
__host__ __device__ __forceinline__ void tile_coords(int64_t tile, int64_t m_tiles, int64_t n_tiles,
                                                     int64_t& tm, int64_t& tn) {
    constexpr int64_t kGroup = 8;
    const int64_t per_group = kGroup * n_tiles;
    const int64_t group = tile / per_group;
    const int64_t first_m = group * kGroup;
    const int64_t group_m = m_tiles - first_m < kGroup ? m_tiles - first_m : kGroup;
    const int64_t local = tile - group * per_group;  // < group_m * n_tiles
    tm = first_m + local % group_m;
    tn = local / group_m;
}

// Copies the TR x TC tile whose top-left element is (r0, c0) of the row-major matrix g (rows x
// cols, row stride ld) into shared memory s: s[r * LDS + c], or s[c * LDS + r] when TRANSPOSED.
// Elements outside the matrix become zeros. Each of the NT threads owns a chunk of 4 columns
// (c .. c+3) in every (NT / (TC/4))-th row (see Chunks), so a warp covers whole rows, and copies
// it with one 16-byte cp.async when `vec` (the caller guarantees that g, ld and c0 are multiples
// of 4 floats, so a chunk lies wholly inside or wholly outside the matrix; the byte count is still
// clamped to `cols` whatever happens), else with four 4-byte ones. TRANSPOSED always copies 4
// bytes at a time, since the four floats of a chunk land in four different shared rows.
template <int TR, int TC, int NT>
struct Chunks {  // which 4-column chunks of a TR x TC tile thread `tid` copies
    static constexpr int kPerRow = TC / 4;
    static constexpr int kRowsPerPass = NT / kPerRow;
    static constexpr int kPasses = TR / kRowsPerPass;
    static_assert(TC % 4 == 0 && NT % kPerRow == 0 && TR % kRowsPerPass == 0, "tile shape");
    __host__ __device__ static constexpr int col(int tid) { return (tid % kPerRow) * 4; }
    __host__ __device__ static constexpr int row(int tid, int pass) { return tid / kPerRow + pass * kRowsPerPass; }
};

template <int TR, int TC, int LDS, bool TRANSPOSED, int NT>
__host__ __device__ __forceinline__ void load_tile(float* s, const float* g, int64_t ld, int64_t rows,
                                                   int64_t cols, int64_t r0, int64_t c0, bool vec,
                                                   int tid) {
    using Ch = Chunks<TR, TC, NT>;
    const int c = Ch::col(tid);
    const int64_t col = c0 + c;
    const int64_t left = cols - col;  // matrix columns from col on
    const int col_bytes = left <= 0 ? 0 : left >= 4 ? 16 : static_cast<int>(left) * 4;
    for (int i = 0; i < Ch::kPasses; ++i) {
        const int r = Ch::row(tid, i);
        const int64_t row = r0 + r;
        const int bytes = row < rows ? col_bytes : 0;
        const float* src = g + (bytes > 0 ? row * ld + col : 0);  // never an address outside g
        if (!TRANSPOSED && vec) {
            cp_async16(s + r * LDS + c, src, bytes);
        } else {
            for (int j = 0; j < 4; ++j) {
                const bool ok = 4 * j < bytes;
                float* dst = TRANSPOSED ? s + (c + j) * LDS + r : s + r * LDS + c + j;
                cp_async4(dst, src + (ok ? j : 0), ok ? 4 : 0);
            }
        }
    }
}

// Rounds to tf32, in place, exactly the elements that load_tile<TR, TC, LDS, false, NT> made
// thread `tid` copy (chunks are 16-byte aligned: LDS and c are multiples of 4). Called after
// that thread's cp.async group has landed (cp.async.wait_group) and before the barrier that
// publishes the tile: a thread sees its own completed cp.async writes, and nobody else touches
// its chunks in between.
template <int TR, int TC, int LDS, int NT>
__host__ __device__ __forceinline__ void round_tile_tf32(float* s, int tid) {
    using Ch = Chunks<TR, TC, NT>;
    for (int i = 0; i < Ch::kPasses; ++i) {
        float4* p = reinterpret_cast<float4*>(s + Ch::row(tid, i) * LDS + Ch::col(tid));
        float4 v = *p;
        v.x = tf32_round(v.x), v.y = tf32_round(v.y), v.z = tf32_round(v.z), v.w = tf32_round(v.w);
        *p = v;
    }
}

// C[row, col + j] = v[j] (+ bias[col + j]) (+ C[row, col + j] if accumulate) for j < W, skipping
// whatever lies outside the M x N matrix. vec: C, N and the batch stride allow W-float stores,
// and col is a multiple of W.
template <int W>
__host__ __device__ __forceinline__ void store_segment(const GemmParams& p, float* C, int64_t row,
                                                       int64_t col, const float (&v)[W], bool vec) {
    if (row >= p.M || col >= p.N) return;
    float* dst = C + row * p.N + col;
    if (vec && col + W <= p.N) {
        float out[W];
        for (int j = 0; j < W; ++j) out[j] = p.bias ? v[j] + p.bias[col + j] : v[j];
        if constexpr (W == 4) {
            if (p.accumulate) {
                const float4 old = *reinterpret_cast<const float4*>(dst);
                out[0] += old.x, out[1] += old.y, out[2] += old.z, out[3] += old.w;
            }
            *reinterpret_cast<float4*>(dst) = make_float4(out[0], out[1], out[2], out[3]);
        } else {
            static_assert(W == 2, "float2 or float4 stores");
            if (p.accumulate) {
                const float2 old = *reinterpret_cast<const float2*>(dst);
                out[0] += old.x, out[1] += old.y;
            }
            *reinterpret_cast<float2*>(dst) = make_float2(out[0], out[1]);
        }
        return;
    }
    for (int j = 0; j < W; ++j) {
        if (col + j < p.N) {
            float out = p.bias ? v[j] + p.bias[col + j] : v[j];
            if (p.accumulate) out += dst[j];
            dst[j] = out;
        }
    }
}

// ---- tensor-core kernel (TF32, BF16) ---------------------------------------------------------
namespace tc {
constexpr int BK = 32;
constexpr int kThreads = 256;  // 8 warps as 2 (M) x 4 (N)
constexpr int LDK = BK + 4;    // row stride of a k-contiguous tile [BM][36]

// A block-tile shape (square, so both operands share one layout). Warp tiles are WM x WN =
// MI x NJ mma tiles of 16 x 8.
template <int BM_, int STAGES, int MIN_BLOCKS>
struct Tile {
    static constexpr int BM = BM_, BN = BM_;
    static constexpr int kStages = STAGES, kMinBlocks = MIN_BLOCKS;
    static constexpr int WM = BM / 2, WN = BN / 4;
    static constexpr int MI = WM / 16, NJ = WN / 8;
    static constexpr int LDMN = BM + 8;  // row stride of an mn-contiguous tile [32][BM + 8]
    static constexpr int kTileFloats = BM * LDK > BK * LDMN ? BM * LDK : BK * LDMN;  // one operand
    static constexpr int kSmemBytes = kStages * 2 * kTileFloats * (int)sizeof(float);
    static_assert(NJ % 2 == 0, "TF32 B fragments are loaded for pairs of n8 tiles");
    static_assert((LDMN * 4) % 16 == 0 && (kTileFloats * 4) % 16 == 0, "16-byte rows");

    // Offset of op(A)(m, k) in a stage's A tile and of op(B)(k, n) in its B tile. Both are
    // linear: off(m0 + m, k0 + k) = off(m0, k0) + off(m, k).
    template <bool TA>
    __host__ __device__ static constexpr int a_off(int m, int k) { return TA ? k * LDMN + m : m * LDK + k; }
    template <bool TB>
    __host__ __device__ static constexpr int b_off(int k, int n) { return TB ? n * LDK + k : k * LDMN + n; }
};
using Big = Tile<128, 3, 2>;   // warp tile 64 x 32; 110592 bytes of shared memory
using Small = Tile<64, 4, 3>;  // warp tile 32 x 16; 73728 bytes

// The A fragment of one mma: the 16 tile rows from m, the k step from k.
// TF32 (m16n8k8): a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4). BF16 (m16n8k16): register
// r holds logical columns 2t, 2t+1 (+8 for r >= 2) of row g (+8 for odd r), read from physical
// columns t, t+4 (+8) -- see the header.
// k-contiguous A: one ldmatrix.x4 (matrix q: rows + 8 (q % 2), columns + 4 (q / 2)) is exactly
// a TF32 fragment; BF16 takes two (k, k + 8) and packs them. mn-contiguous A: scalar loads
// (ldmatrix cannot transpose 32-bit elements). The tile holds tf32-rounded values in TF32 mode
// (round_stage), so TF32 registers are the raw bits; BF16 rounds here, as it packs.
template <class T, MatmulPrecision P, bool TA>
__host__ __device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const float* sA, int m, int k, int lane) {
    const float* base = sA + T::template a_off<TA>(m, k);
    if constexpr (!TA) {
        const auto row = [](int l) { return T::template a_off<false>(l % 8 + (l / 8 % 2) * 8, (l / 16) * 4); };
        if constexpr (P == MatmulPrecision::TF32) {
            ldsm_x4(a, base, lane, row);
        } else {
            uint32_t x[4], y[4];  // (g, t), (g+8, t), (g, t+4), (g+8, t+4); y: 8 columns on
            ldsm_x4(x, base, lane, row);
            ldsm_x4(y, base + T::template a_off<false>(0, 8), lane, row);
            a[0] = pack_bf16x2(bits_float(x[0]), bits_float(x[2]));
            a[1] = pack_bf16x2(bits_float(x[1]), bits_float(x[3]));
            a[2] = pack_bf16x2(bits_float(y[0]), bits_float(y[2]));
            a[3] = pack_bf16x2(bits_float(y[1]), bits_float(y[3]));
        }
    } else {
        const int g = lane / 4, t = lane % 4;
        const auto at = [&](int dm, int dk) { return base[T::template a_off<true>(g + dm, t + dk)]; };
        if constexpr (P == MatmulPrecision::TF32) {
            a[0] = float_bits(at(0, 0)), a[1] = float_bits(at(8, 0));
            a[2] = float_bits(at(0, 4)), a[3] = float_bits(at(8, 4));
        } else {
            a[0] = pack_bf16x2(at(0, 0), at(0, 4)), a[1] = pack_bf16x2(at(8, 0), at(8, 4));
            a[2] = pack_bf16x2(at(0, 8), at(0, 12)), a[3] = pack_bf16x2(at(8, 8), at(8, 12));
        }
    }
}

// The B fragments of the NJ n8 tiles from tile column n, k step from k. TF32: b0 (k = t, n = g),
// b1 (k = t+4). BF16: register r holds logical rows 2t, 2t+1 (+8 for r = 1) from physical rows
// t, t+4 (+8). k-contiguous B ([n][k]): one ldmatrix.x4 per pair of TF32 n8 tiles (matrix q:
// columns + 4 (q % 2), rows + 8 (q / 2)) or per BF16 n8 tile (matrix q: columns + 4q).
template <class T, MatmulPrecision P, bool TB>
__host__ __device__ __forceinline__ void load_b_frags(uint32_t (&b)[T::NJ][2], const float* sB, int k, int n,
                                                      int lane) {
    if constexpr (TB) {
        if constexpr (P == MatmulPrecision::TF32) {
            const auto row = [](int l) { return T::template b_off<true>((l / 8 % 2) * 4, l % 8 + (l / 16) * 8); };
            for (int j = 0; j < T::NJ; j += 2) {
                uint32_t r[4];
                ldsm_x4(r, sB + T::template b_off<true>(k, n + j * 8), lane, row);
                b[j][0] = r[0], b[j][1] = r[1], b[j + 1][0] = r[2], b[j + 1][1] = r[3];
            }
        } else {
            const auto row = [](int l) { return T::template b_off<true>((l / 8) * 4, l % 8); };
            for (int j = 0; j < T::NJ; ++j) {
                uint32_t r[4];  // k = t, t+4, t+8, t+12
                ldsm_x4(r, sB + T::template b_off<true>(k, n + j * 8), lane, row);
                b[j][0] = pack_bf16x2(bits_float(r[0]), bits_float(r[1]));
                b[j][1] = pack_bf16x2(bits_float(r[2]), bits_float(r[3]));
            }
        }
    } else {
        const int g = lane / 4, t = lane % 4;
        const float* base = sB + T::template b_off<false>(k + t, n + g);
        const auto at = [&](int dk, int dn) { return base[T::template b_off<false>(dk, dn)]; };
        for (int j = 0; j < T::NJ; ++j) {
            if constexpr (P == MatmulPrecision::TF32) {
                b[j][0] = float_bits(at(0, j * 8)), b[j][1] = float_bits(at(4, j * 8));
            } else {
                b[j][0] = pack_bf16x2(at(0, j * 8), at(4, j * 8));
                b[j][1] = pack_bf16x2(at(8, j * 8), at(12, j * 8));
            }
        }
    }
}

// Starts the copies of K-tile kt (k0 = kt * BK) of A and B into one stage.
template <class T, bool TA, bool TB>
__host__ __device__ __forceinline__ void load_stage(float* sA, float* sB, const float* A, const float* B,
                                                    const GemmParams& p, int64_t m0, int64_t n0, int64_t k0,
                                                    int tid) {
    if constexpr (TA)  // A stored (K, M): rows k, columns m
        load_tile<BK, T::BM, T::LDMN, false, kThreads>(sA, A, p.M, p.K, p.M, k0, m0, p.vec_a, tid);
    else  // A stored (M, K)
        load_tile<T::BM, BK, LDK, false, kThreads>(sA, A, p.K, p.M, p.K, m0, k0, p.vec_a, tid);
    if constexpr (TB)  // B stored (N, K)
        load_tile<T::BN, BK, LDK, false, kThreads>(sB, B, p.K, p.N, p.K, n0, k0, p.vec_b, tid);
    else  // B stored (K, N)
        load_tile<BK, T::BN, T::LDMN, false, kThreads>(sB, B, p.N, p.K, p.N, k0, n0, p.vec_b, tid);
}

// TF32: rounds, in place, the elements of a stage that load_stage made thread `tid` copy.
template <class T, bool TA, bool TB>
__host__ __device__ __forceinline__ void round_stage(float* sA, float* sB, int tid) {
    if constexpr (TA) round_tile_tf32<BK, T::BM, T::LDMN, kThreads>(sA, tid);
    else round_tile_tf32<T::BM, BK, LDK, kThreads>(sA, tid);
    if constexpr (TB) round_tile_tf32<T::BN, BK, LDK, kThreads>(sB, tid);
    else round_tile_tf32<BK, T::BN, T::LDMN, kThreads>(sB, tid);
}

template <class T, MatmulPrecision P, bool TA, bool TB>
__global__ void __launch_bounds__(kThreads, T::kMinBlocks) gemm_kernel(const GemmParams p) {
    extern __shared__ __align__(16) float smem[];  // kStages x {A tile, B tile}
    constexpr int kStages = T::kStages, MI = T::MI, NJ = T::NJ;
    constexpr int kStep = P == MatmulPrecision::TF32 ? 8 : 16;  // k of one mma
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int wm = warp / 4, wn = warp % 4;  // this warp's WM x WN piece of the tile
    const int k_tiles = static_cast<int>((p.K + BK - 1) / BK);  // the host checks that it fits
    const int64_t z = blockIdx.z;  // batch entry; one (z, tile) per block
    const float* A = p.a + z * p.stride_a;
    const float* B = p.b + z * p.stride_b;
    float* C = p.c + z * p.stride_c;
    int64_t tm, tn;
    tile_coords(blockIdx.x, p.m_tiles, p.n_tiles, tm, tn);
    const int64_t m0 = tm * T::BM, n0 = tn * T::BN;
    const auto stage_a = [&](int s) { return smem + s * 2 * T::kTileFloats; };  // B follows A

    float acc[MI][NJ][4];  // [m16 tile][n8 tile][c0..c3]
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // One commit group per K-tile (empty past the end) keeps the wait count uniform:
    // before the wait in iteration kt, STAGES-1+kt groups exist, and allowing STAGES-2
    // pending means groups 0..kt, i.e. tile kt, are complete.
#pragma unroll 1
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < k_tiles)
            load_stage<T, TA, TB>(stage_a(s), stage_a(s) + T::kTileFloats, A, B, p, m0, n0, s * (int64_t)BK, tid);
        cp_async_commit();
    }
    int read = 0, write = kStages - 1;  // stage of tile kt, stage of tile kt + STAGES - 1
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<kStages - 2>();  // this thread's copies of tile kt have landed
        if constexpr (P == MatmulPrecision::TF32)
            round_stage<T, TA, TB>(stage_a(read), stage_a(read) + T::kTileFloats, tid);
        __syncthreads();  // tile kt visible to all; everyone is done with tile kt-1's stage
        if (kt + kStages - 1 < k_tiles)
            load_stage<T, TA, TB>(stage_a(write), stage_a(write) + T::kTileFloats, A, B, p, m0, n0,
                                  (kt + kStages - 1) * (int64_t)BK, tid);
        cp_async_commit();

        const float* sA = stage_a(read);
        const float* sB = sA + T::kTileFloats;
        // Not unrolled: with the k steps unrolled, ptxas hoists the next step's fragment loads and
        // the big tile's 64 accumulators no longer fit in 128 registers without spills.
#pragma unroll 1
        for (int kk = 0; kk < BK; kk += kStep) {
            // The warp's NJ B fragments, then one A fragment at a time: fewer live registers.
            uint32_t bf[NJ][2];
            load_b_frags<T, P, TB>(bf, sB, kk, wn * T::WN, lane);
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                uint32_t af[4];
                load_a_frag<T, P, TA>(af, sA, wm * T::WM + i * 16, kk, lane);
#pragma unroll
                for (int j = 0; j < NJ; ++j) {
                    if constexpr (P == MatmulPrecision::TF32) mma_tf32(acc[i][j], af, bf[j]);
                    else mma_bf16(acc[i][j], af, bf[j]);
                }
            }
        }
        read = read == kStages - 1 ? 0 : read + 1;
        write = write == kStages - 1 ? 0 : write + 1;
    }
    cp_async_wait<0>();  // only empty groups are left; drain them anyway

    // c0, c1 at (g, 2t), (g, 2t+1); c2, c3 at (g+8, 2t), (g+8, 2t+1) of each 16 x 8 tile.
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float v[2] = {acc[i][j][2 * h], acc[i][j][2 * h + 1]};
                store_segment<2>(p, C, m0 + wm * T::WM + i * 16 + h * 8 + g, n0 + wn * T::WN + j * 8 + 2 * t,
                                 v, p.vec_c);
            }
}
}  // namespace tc

// ---- fp32 SIMT kernel -------------------------------------------------------------------------
namespace simt {
constexpr int BM = 128, BN = 128, BK = 8;
constexpr int kThreads = 256, kStages = 4;
constexpr int LD = BM + 4;  // [BK][132]: float4 rows stay 16-byte aligned; see the header
static_assert(BM == BN && (LD * 4) % 16 == 0, "tile shape");

// Row (column) of the tile held by thread row ty (column tx) in its i-th accumulator row (column).
__host__ __device__ constexpr int owned(int tyx, int i) { return (i / 4) * 64 + tyx * 4 + i % 4; }

template <bool TA, bool TB>
__host__ __device__ __forceinline__ void load_stage(float* sA, float* sB, const float* A, const float* B,
                                                    const GemmParams& p, int64_t m0, int64_t n0, int64_t k0,
                                                    int tid) {
    // Both tiles end up k-major: sA[k][m], sB[k][n].
    if constexpr (TA)  // A stored (K, M): already k-major
        load_tile<BK, BM, LD, false, kThreads>(sA, A, p.M, p.K, p.M, k0, m0, p.vec_a, tid);
    else  // A stored (M, K): transposed on the way in
        load_tile<BM, BK, LD, true, kThreads>(sA, A, p.K, p.M, p.K, m0, k0, false, tid);
    if constexpr (TB)  // B stored (N, K): transposed on the way in
        load_tile<BN, BK, LD, true, kThreads>(sB, B, p.K, p.N, p.K, n0, k0, false, tid);
    else  // B stored (K, N)
        load_tile<BK, BN, LD, false, kThreads>(sB, B, p.N, p.K, p.N, k0, n0, p.vec_b, tid);
}

template <bool TA, bool TB>
__global__ void __launch_bounds__(kThreads, 2) gemm_kernel(const GemmParams p) {
    __shared__ __align__(16) float smem[kStages][2][BK * LD];  // 33 KiB
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int ty = (warp / 2) * 4 + lane / 8;  // 0..15
    const int tx = (warp % 2) * 8 + lane % 8;  // 0..15
    const int k_tiles = static_cast<int>((p.K + BK - 1) / BK);  // the host checks that it fits
    const int64_t z = blockIdx.z;  // batch entry; one (z, tile) per block
    const float* A = p.a + z * p.stride_a;
    const float* B = p.b + z * p.stride_b;
    float* C = p.c + z * p.stride_c;
    int64_t tm, tn;
    tile_coords(blockIdx.x, p.m_tiles, p.n_tiles, tm, tn);
    const int64_t m0 = tm * BM, n0 = tn * BN;

    float acc[8][8];  // [owned row][owned column]
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    // The same pipeline as the tensor-core kernel (see the comment there).
#pragma unroll 1
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < k_tiles) load_stage<TA, TB>(smem[s][0], smem[s][1], A, B, p, m0, n0, s * (int64_t)BK, tid);
        cp_async_commit();
    }
    int read = 0, write = kStages - 1;
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<kStages - 2>();
        __syncthreads();
        if (kt + kStages - 1 < k_tiles)
            load_stage<TA, TB>(smem[write][0], smem[write][1], A, B, p, m0, n0,
                               (kt + kStages - 1) * (int64_t)BK, tid);
        cp_async_commit();

        const float* sA = smem[read][0];
        const float* sB = smem[read][1];
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            const float4 a0 = *reinterpret_cast<const float4*>(sA + k * LD + owned(ty, 0));
            const float4 a1 = *reinterpret_cast<const float4*>(sA + k * LD + owned(ty, 4));
            const float4 b0 = *reinterpret_cast<const float4*>(sB + k * LD + owned(tx, 0));
            const float4 b1 = *reinterpret_cast<const float4*>(sB + k * LD + owned(tx, 4));
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        read = read == kStages - 1 ? 0 : read + 1;
        write = write == kStages - 1 ? 0 : write + 1;
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float v[4] = {acc[i][4 * h], acc[i][4 * h + 1], acc[i][4 * h + 2], acc[i][4 * h + 3]};
            store_segment<4>(p, C, m0 + owned(ty, i), n0 + owned(tx, 4 * h), v, p.vec_c);
        }
}
}  // namespace simt

// ---- bias gradient ------------------------------------------------------------------------------
// Block: W columns x R = 1024 / W row lanes. Row lane r sums rows r, r + R, r + 2R, ... in that
// order (eight loads in flight per step: with N = 768 there are only 96 blocks, so each thread
// must keep many loads in flight to approach HBM bandwidth), then a fixed-order tree adds the R
// partials of each column in shared memory.
constexpr int kBiasThreads = 1024;

template <int W>
__global__ void __launch_bounds__(kBiasThreads) bias_backward_kernel(float* dbias, const float* dy, int64_t M,
                                                                     int64_t N) {
    constexpr int R = kBiasThreads / W;
    static_assert((R & (R - 1)) == 0, "the tree needs a power-of-two number of row lanes");
    __shared__ float partial[R][W];
    const int cx = threadIdx.x % W, ry = threadIdx.x / W;
    const int64_t col = blockIdx.x * (int64_t)W + cx;
    float sum = 0.0f;
    if (col < N) {
        const int64_t step = R * N;  // elements between the rows one thread visits
        const float* p = dy + ry * N + col;
        int64_t row = ry;
        for (; row + 7 * R < M; row += 8 * R, p += 8 * step) {
            float v[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) v[u] = p[u * step];
#pragma unroll
            for (int u = 0; u < 8; ++u) sum += v[u];
        }
        for (; row < M; row += R, p += step) sum += p[0];
    }
    partial[ry][cx] = sum;
    __syncthreads();
#pragma unroll
    for (int s = R / 2; s > 0; s /= 2) {
        if (ry < s) partial[ry][cx] += partial[ry + s][cx];
        __syncthreads();
    }
    if (ry == 0 && col < N) dbias[col] = partial[0][cx];
}

// ---- host side ----------------------------------------------------------------------------------

// True when W-float vector access to every row of every batch entry is legal: the base pointer
// aligned to W floats, and the leading dimension and batch stride multiples of W.
bool can_vectorize(const void* ptr, int64_t ld, int64_t stride, int64_t batch, int W) {
    const uintptr_t bytes = static_cast<uintptr_t>(W) * sizeof(float);
    return reinterpret_cast<uintptr_t>(ptr) % bytes == 0 && ld % W == 0 && (batch == 1 || stride % W == 0);
}

template <bool TA, bool TB>
void launch_simt(GemmParams p, int64_t batch, dim3 grid, cudaStream_t stream) {
    p.vec_c = can_vectorize(p.c, p.N, p.stride_c, batch, 4);
    simt::gemm_kernel<TA, TB><<<grid, simt::kThreads, 0, stream>>>(p);
    LLMCORE_CUDA_CHECK_LAUNCH();
}

template <class T, MatmulPrecision P, bool TA, bool TB>
void launch_tc(GemmParams p, int64_t batch, dim3 grid, cudaStream_t stream) {
    // More than 48 KiB of dynamic shared memory needs an opt-in, once per kernel and device.
    static std::atomic<uint64_t> opted_in{0};  // bit d: done on device d (d < 64)
    int device = 0;
    LLMCORE_CUDA_CHECK(cudaGetDevice(&device));
    const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
    if (!bit || !(opted_in.load(std::memory_order_acquire) & bit)) {
        LLMCORE_CUDA_CHECK(cudaFuncSetAttribute(tc::gemm_kernel<T, P, TA, TB>,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes));
        opted_in.fetch_or(bit, std::memory_order_release);
    }
    p.vec_c = can_vectorize(p.c, p.N, p.stride_c, batch, 2);
    tc::gemm_kernel<T, P, TA, TB><<<grid, tc::kThreads, T::kSmemBytes, stream>>>(p);
    LLMCORE_CUDA_CHECK_LAUNCH();
}

template <MatmulPrecision P, bool TA, bool TB>
void launch(const GemmParams& p, int64_t batch, int tile, dim3 grid, cudaStream_t stream) {
    if constexpr (P == MatmulPrecision::FP32) launch_simt<TA, TB>(p, batch, grid, stream);
    else if (tile == tc::Small::BM) launch_tc<tc::Small, P, TA, TB>(p, batch, grid, stream);
    else launch_tc<tc::Big, P, TA, TB>(p, batch, grid, stream);
}

template <MatmulPrecision P>
void launch_any(const GemmParams& p, int64_t batch, bool trans_a, bool trans_b, int tile, dim3 grid,
                cudaStream_t stream) {
    if (trans_a && trans_b) launch<P, true, true>(p, batch, tile, grid, stream);
    else if (trans_a) launch<P, true, false>(p, batch, tile, grid, stream);
    else if (trans_b) launch<P, false, true>(p, batch, tile, grid, stream);
    else launch<P, false, false>(p, batch, tile, grid, stream);
}

// Streaming multiprocessors of the current device, queried once per device.
int sm_count() {
    static std::atomic<int> cached[64] = {};  // 0: not queried yet
    int device = 0;
    LLMCORE_CUDA_CHECK(cudaGetDevice(&device));
    int n = device < 64 ? cached[device].load(std::memory_order_relaxed) : 0;
    if (n == 0) {
        LLMCORE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
        if (device < 64) cached[device].store(n, std::memory_order_relaxed);
    }
    return n;
}

// Edge of the square block tile: the fp32 kernel always uses 128; the tensor-core kernels use
// 128 unless that gives fewer than two blocks per SM (the big tile's occupancy) -- e.g. the
// weight gradients of GPT-2 (768 x 768 and 768 x 2304 outputs, K = 8192) -- and then 64, which
// makes 4x the blocks at some cost in operand reuse.
int choose_tile(MatmulPrecision precision, int64_t batch, int64_t M, int64_t N) {
    if (precision == MatmulPrecision::FP32) return 128;
    const int64_t big_blocks = ceil_div(M, tc::Big::BM) * ceil_div(N, tc::Big::BN) * batch;
    return big_blocks < int64_t(tc::Big::kMinBlocks) * sm_count() ? tc::Small::BM : tc::Big::BM;
}

// ---- split-K for weight gradients ---------------------------------------------------------------
//
// dW (M,N) = dy^T (M,K, stored (K,M)) @ x (K,N) has a small output and K = batch x tokens: with
// 128 x 128 tiles GPT-2's 768 x 768 dW is 36 blocks on 132 SMs (measured on the H100: the 4 dW
// GEMMs per layer took 30 of the step's 109 GPU ms at ~46 TFLOP/s, against ~95 for the other
// GEMMs). In this layout a chunk of K is simply a batch entry (A advances Kc*M elements, B Kc*N;
// the leading dimensions stay M and N), so the batched kernel computes `splits` partial products
// into the workspace and split_k_sum_kernel adds them in a fixed order, then bias and C.

// How many K-chunks: a power of two, so the chunks are equal for the usual K = 2^n tokens, enough
// for two big-tile blocks per SM, each chunk at least 512 deep and a multiple of the K-tile.
int split_k_count(int64_t batch, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b) {
    if (batch != 1 || !trans_a || trans_b) return 1;
    const int64_t tiles = ceil_div(M, tc::Big::BM) * ceil_div(N, tc::Big::BN);
    const int64_t want = int64_t(tc::Big::kMinBlocks) * sm_count();
    int s = 1;
    while (s < 16 && tiles * s < want) s *= 2;
    while (s > 1 && (K % (int64_t(s) * 32) != 0 || K / s < 512)) s /= 2;
    return s;
}

// c[i] = (accumulate ? c[i] : 0) + sum over s of parts[s][i] (+ bias[i % N]), i < M*N.
__global__ void split_k_sum_kernel(float* __restrict__ c, const float* __restrict__ parts,
                                   const float* __restrict__ bias, int64_t MN, int64_t N, int splits,
                                   bool accumulate) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < MN; i += stride) {
        float sum = accumulate ? c[i] : 0.0f;
        float part = 0.0f;
        for (int s = 0; s < splits; ++s) part += parts[s * MN + i];
        sum += part;
        if (bias) sum += bias[i % N];
        c[i] = sum;
    }
}

}  // namespace

size_t gemm_workspace_bytes(int64_t batch, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b) {
    if (batch <= 0 || M <= 0 || N <= 0 || K <= 0) return 0;
    const int s = split_k_count(batch, M, N, K, trans_a, trans_b);
    return s > 1 ? size_t(s) * size_t(M) * size_t(N) * sizeof(float) : 0;
}

void gemm(float* c, const float* a, const float* b, const float* bias, int64_t batch, int64_t M, int64_t N,
          int64_t K, bool trans_a, bool trans_b, int64_t batch_stride_a, int64_t batch_stride_b,
          int64_t batch_stride_c, bool accumulate, MatmulPrecision precision, void* workspace,
          size_t workspace_bytes, cudaStream_t stream) {
    if (batch < 0 || M < 0 || N < 0 || K < 0)
        throw std::invalid_argument("gemm: sizes must be >= 0, got batch=" + std::to_string(batch) +
                                    " M=" + std::to_string(M) + " N=" + std::to_string(N) +
                                    " K=" + std::to_string(K));
    if (batch == 0 || M == 0 || N == 0) return;  // nothing to write; K == 0 still writes bias (+ C)
    const size_t split_bytes = gemm_workspace_bytes(batch, M, N, K, trans_a, trans_b);
    if (workspace && split_bytes && workspace_bytes >= split_bytes) {
        const int splits = split_k_count(batch, M, N, K, trans_a, trans_b);
        const int64_t Kc = K / splits;
        float* parts = static_cast<float*>(workspace);
        gemm(parts, a, b, nullptr, splits, M, N, Kc, true, false, Kc * M, Kc * N, M * N, false, precision,
             nullptr, 0, stream);
        split_k_sum_kernel<<<grid_for(M * N, 256), 256, 0, stream>>>(c, parts, bias, M * N, N, splits, accumulate);
        LLMCORE_CUDA_CHECK_LAUNCH();
        return;
    }

    GemmParams p{};
    p.bias = bias;
    p.M = M, p.N = N, p.K = K;
    p.stride_a = batch_stride_a, p.stride_b = batch_stride_b, p.stride_c = batch_stride_c;
    const int tile = choose_tile(precision, batch, M, N);  // square block tiles of C
    p.m_tiles = ceil_div(M, tile), p.n_tiles = ceil_div(N, tile);
    p.accumulate = accumulate;
    // One block per (tile, batch entry): tiles along x (at most 2^31 - 1, i.e. far more than any
    // matrix that fits in memory), batch entries along z in launches of at most 65535.
    const int64_t tiles = p.m_tiles * p.n_tiles;
    if (tiles > INT_MAX || K / 8 >= INT_MAX)  // grid.x; the kernels count K-tiles in an int
        throw std::invalid_argument("gemm: M=" + std::to_string(M) + ", N=" + std::to_string(N) +
                                    ", K=" + std::to_string(K) + " is too large");
    constexpr int64_t kMaxZ = 65535;
    for (int64_t z0 = 0; z0 < batch; z0 += kMaxZ) {
        const int64_t nz = batch - z0 < kMaxZ ? batch - z0 : kMaxZ;
        p.a = a + z0 * batch_stride_a, p.b = b + z0 * batch_stride_b, p.c = c + z0 * batch_stride_c;
        // Leading dimensions: A is (M, K) or (K, M); B is (K, N) or (N, K).
        p.vec_a = can_vectorize(p.a, trans_a ? M : K, batch_stride_a, nz, 4);
        p.vec_b = can_vectorize(p.b, trans_b ? K : N, batch_stride_b, nz, 4);
        const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(nz));
        if (precision == MatmulPrecision::TF32)
            launch_any<MatmulPrecision::TF32>(p, nz, trans_a, trans_b, tile, grid, stream);
        else if (precision == MatmulPrecision::BF16)
            launch_any<MatmulPrecision::BF16>(p, nz, trans_a, trans_b, tile, grid, stream);
        else
            launch_any<MatmulPrecision::FP32>(p, nz, trans_a, trans_b, tile, grid, stream);
    }
}

void bias_backward(float* dbias, const float* dy, int64_t M, int64_t N, cudaStream_t stream) {
    if (M < 0 || N < 0)
        throw std::invalid_argument("bias_backward: sizes must be >= 0, got M=" + std::to_string(M) +
                                    " N=" + std::to_string(N));
    if (N == 0) return;  // M == 0 still writes zeros
    // Wide strips read 128 contiguous bytes per row; narrow strips make more blocks when N is
    // small (N = 768: 96 blocks instead of 24). Either way the order of the sum is fixed by (M, N).
    const int width = N >= 8192 ? 32 : 8;
    const int64_t blocks = ceil_div(N, width);
    if (blocks > INT_MAX)
        throw std::invalid_argument("bias_backward: N=" + std::to_string(N) + " is too large");
    const dim3 grid(static_cast<unsigned>(blocks));
    if (width == 32) bias_backward_kernel<32><<<grid, kBiasThreads, 0, stream>>>(dbias, dy, M, N);
    else bias_backward_kernel<8><<<grid, kBiasThreads, 0, stream>>>(dbias, dy, M, N);
    LLMCORE_CUDA_CHECK_LAUNCH();
}

}  // namespace llmcore::cuda
