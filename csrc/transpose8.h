// 8 x 8 float transposes in registers, for the kernels that reorder small blocks: attention's Q/K/V
// tiles and the GEMM's packing of a row-major A and a transposed B. A scalar transpose of the same
// blocks cost 10-13% of attention (perf at T = 512) and ~3% of a training step's GEMMs.
#pragma once

#include <cstring>

#include "common.h"

namespace llmcore {
namespace LLMCORE_ISA {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// (Vectors move through memcpy, never as function arguments or results: the generic build has no
// 32-byte registers, and GCC warns about such an ABI.)

// Rows r[0..7] become columns. Stage s swaps bit s of the row index with bit s of the column
// index between rows x and x + 2^s (unpck, shuf and perm2f128 on AVX).
inline void transpose8(v8f r[8]) {
    const v8i lo[3] = {{0, 8, 2, 10, 4, 12, 6, 14}, {0, 1, 8, 9, 4, 5, 12, 13}, {0, 1, 2, 3, 8, 9, 10, 11}};
    const v8i hi[3] = {{1, 9, 3, 11, 5, 13, 7, 15}, {2, 3, 10, 11, 6, 7, 14, 15}, {4, 5, 6, 7, 12, 13, 14, 15}};
#pragma GCC unroll 3
    for (int st = 0; st < 3; ++st) {
        const int step = 1 << st;
#pragma GCC unroll 8
        for (int x = 0; x < 8; ++x) {
            if (x & step) continue;
            const v8f a = r[x], b = r[x + step];
            r[x] = __builtin_shuffle(a, b, lo[st]);
            r[x + step] = __builtin_shuffle(a, b, hi[st]);
        }
    }
}

// dst[c * ldd + u] = src[u * lds + c] for u < kRows (at most 8 source rows), c < 8.
template <int kRows>
inline void transpose_block8(float* dst, int64_t ldd, const float* src, int64_t lds) {
    static_assert(kRows >= 1 && kRows <= 8, "one 8 x 8 block");
    v8f r[8] = {};
#pragma GCC unroll 8
    for (int u = 0; u < kRows; ++u) std::memcpy(&r[u], src + u * lds, sizeof(v8f));
    transpose8(r);
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) std::memcpy(dst + c * ldd, &r[c], kRows * sizeof(float));
}

}  // namespace LLMCORE_ISA
}  // namespace llmcore
