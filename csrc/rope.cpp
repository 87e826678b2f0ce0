// RoPE: rotates each pair (x[2i], x[2i+1]) of every (batch, position, head) row by the angle of its
// position, out = x * e^{i theta} read as complex numbers (conjugate: e^{-i theta}, the inverse
// rotation, which is also the backward). One pass, reading x and writing out through their strides,
// so q and k are rotated straight out of the fused QKV buffer and their gradients straight into the
// fused gradient buffer.
#include "common.h"
#include "kernels.h"

namespace llmcore {
namespace LLMCORE_ISA {

void rope(float* out, const float* x, const float* rot, const RopeShape& s, bool conjugate) {
    const int64_t pairs = s.D / 2;
    const float sign = conjugate ? -1.0f : 1.0f;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < s.B; ++b) {
        for (int64_t t = 0; t < s.T; ++t) {
            const float* r = rot + t * 2 * pairs;  // (cos, sin) of each pair at position t
            for (int64_t h = 0; h < s.H; ++h) {
                const float* xr = x + b * s.x_strides[0] + t * s.x_strides[1] + h * s.x_strides[2];
                float* orow = out + b * s.out_strides[0] + t * s.out_strides[1] + h * s.out_strides[2];
                rope_row(orow, xr, r, pairs, sign);
            }
        }
    }
}

}  // namespace LLMCORE_ISA
}  // namespace llmcore
