// Helpers shared by every kernel translation unit.
//
// Each kernel file is compiled once per instruction set (generic x86-64/portable, AVX2+FMA,
// AVX-512), with LLMCORE_ISA naming the namespace and LLMCORE_VEC the float32 lanes of one
// vector register. Everything defined in a header included by kernel files must therefore live in
// the LLMCORE_ISA namespace: an inline function outside it would be emitted by every variant and
// the linker would keep one of them, possibly the AVX-512 one, on a machine without AVX-512.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef LLMCORE_ISA
#define LLMCORE_ISA generic
#endif
#ifndef LLMCORE_VEC
#define LLMCORE_VEC 4
#endif

namespace llmcore {
namespace LLMCORE_ISA {

// Row-wise kernels (softmax, the norms, cross-entropy) give each thread one contiguous range of
// rows (schedule(static)). Chunks of 8 rows dealt out in turn made each thread's reads jump over
// the other's every 8 rows, which the hardware prefetcher follows worse: RMSNorm's forward took
// 1.71 instead of 1.59 ms of the cpu-small training step (in-step, alternating builds).

// One vector register of float32 lanes (GCC vector extensions: SSE, AVX2 or AVX-512 code from
// the same source, by the translation unit's flags), with unaligned loads and stores.
constexpr int VEC = LLMCORE_VEC;
typedef float vfloat __attribute__((vector_size(VEC * sizeof(float))));

inline vfloat load(const float* p) {
    vfloat v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The sum (hsum) or max (hmax, of lanes that are not NaN: the running maxima m = x > m ? x : m
// that callers keep never are) of a vector's lanes, halves combined until one lane is left.
// GCC 12 ends an `omp simd reduction` by storing the vector and adding its lanes one at a time
// from the stack: 16 dependent adds per row (LayerNorm's forward, two sums per row, at
// 8192 x 768: 1.17-1.23 ms with them, 0.95 with row_sum).
inline float hsum(vfloat v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float t[VEC];
    std::memcpy(t, &v, sizeof v);
    for (int w = VEC / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) t[l] += t[l + w];
    return t[0];
#endif
}
inline float hmax(vfloat v) {
    float t[VEC];
    std::memcpy(t, &v, sizeof v);
    for (int w = VEC / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) t[l] = t[l + w] > t[l] ? t[l + w] : t[l];
    return t[0];
}

// sum over i < n of a row's terms: vec(i) gives the VEC terms i .. i + VEC - 1 as a vfloat,
// one(i) the term i alone (the tail). Two vector accumulators for two independent add chains,
// then hsum. vec and one may also store (a pass that writes as it sums).
template <class Vec, class One>
inline float row_sum(int64_t n, Vec vec, One one) {
    vfloat a0{}, a1{};
    int64_t i = 0;
    for (; i + 2 * VEC <= n; i += 2 * VEC) {
        a0 += vec(i);
        a1 += vec(i + VEC);
    }
    if (i + VEC <= n) a0 += vec(i), i += VEC;
    float sum = hsum(a0 + a1);
    for (; i < n; ++i) sum += one(i);
    return sum;
}

// Two sums over one pass of a row, as row_sum: vec(i) gives both sums' VEC terms as a pair of
// vfloats, one(i) both terms of element i as a pair of floats. (Not one row_sums<N> over
// std::array that row_sum would call with N = 1: GCC 12 then stopped inlining RMSNorm's backward
// rows into their parallel loop, and that backward took 76 us against 70 at 256 x 1024.)
template <class Vec, class One>
inline std::pair<float, float> row_sum2(int64_t n, Vec vec, One one) {
    vfloat a0{}, a1{}, b0{}, b1{};
    int64_t i = 0;
    for (; i + 2 * VEC <= n; i += 2 * VEC) {
        const auto [x0, y0] = vec(i);
        const auto [x1, y1] = vec(i + VEC);
        a0 += x0, b0 += y0, a1 += x1, b1 += y1;
    }
    if (i + VEC <= n) {
        const auto [x0, y0] = vec(i);
        a0 += x0, b0 += y0, i += VEC;
    }
    float sa = hsum(a0 + a1), sb = hsum(b0 + b1);
    for (; i < n; ++i) {
        const auto [x, y] = one(i);
        sa += x, sb += y;
    }
    return {sa, sb};
}

// max over x[0..n): a NaN never wins; -inf for n = 0.
inline float row_max(const float* x, int64_t n) {
    vfloat m = vfloat{} - INFINITY;
    int64_t i = 0;
    for (; i + VEC <= n; i += VEC) {
        const vfloat v = load(x + i);
        m = v > m ? v : m;
    }
    float mx = hmax(m);
    for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
    return mx;
}

// dst[i] += src[i] for i < n (a row still in L1 from the loop that wrote it).
inline void add_row(float* __restrict dst, const float* __restrict src, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// RoPE of one row of D = 2 * pairs floats: out pair i = x pair i * (rot[2i] + i sign rot[2i+1]),
// pairs read as complex numbers, rot the row of (cos, sin) of the row's position; sign -1 is the
// inverse rotation (the backward). out may be x itself. Used by rope.cpp and by attention, which
// rotates q and k as it reads them.
inline void rope_row(float* out, const float* x, const float* rot, int64_t pairs, float sign) {
#pragma omp simd
    for (int64_t i = 0; i < pairs; ++i) {
        const float c = rot[2 * i], sn = sign * rot[2 * i + 1];
        const float re = x[2 * i], im = x[2 * i + 1];
        out[2 * i] = re * c - im * sn;
        out[2 * i + 1] = re * sn + im * c;
    }
}

inline int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// The polynomial part of exp: e^r for |r| <= ln2/2, degree 6 (Cephes expf coefficients), about
// 1 ulp. T is float or vfloat, so that fast_exp and vexp share it.
template <class T>
inline T exp_poly(T r) {
    T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return p * r * r + r + 1.0f;
}

// exp(x) for float32 that the compiler vectorises inside `#pragma omp simd` loops (libm's expf
// is a call it cannot vectorise without -ffast-math, which would also break NaN/inf handling).
// Cody-Waite range reduction x = n*ln2 + r, |r| <= ln2/2, then exp_poly. IEEE special cases as
// expf: exp(-inf) = 0, exp(+inf) = inf, exp(NaN) = NaN; overflow to inf above 88.72, underflow
// to 0 below -103.97. Inputs below that (a causal mask's -inf above all) are computed on 0 and
// replaced: an underflowing multiply costs a microcode assist of ~100 cycles on Intel cores,
// measured as a third of attention's forward when every masked score paid one.
inline float fast_exp(float x) {
    const float hi = 88.7228394f, lo = -103.972084f;
    float xc = x > hi ? hi : x;
    xc = (xc < lo || xc != xc) ? 0.0f : xc;  // (NaN: no NaN-to-int cast either)
    float n = std::floor(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float p = exp_poly(r);
    // Scale by 2^n in two steps so that n down to -150 (subnormal results) stays exact.
    int32_t ni = (int32_t)n;
    int32_t n1 = ni / 2, n2 = ni - n1;
    float s1, s2;
    int32_t b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
    std::memcpy(&s1, &b1, 4);
    std::memcpy(&s2, &b2, 4);
    float y = p * s1 * s2;
    y = x > hi ? INFINITY : y;
    y = x < lo ? 0.0f : y;
    return x == x ? y : x;
}

// fast_exp of a whole vector, for loops written in vfloat: the same results, fewer instructions.
// x is clamped above at 89, just past the overflow, so that the scaling by 2^n itself gives inf;
// the scaling is one vscalefps on AVX-512 (which also rounds subnormals once), two exponent
// multiplications elsewhere (n1 + n2 = n, each a normal power of two). Below -103.97 the lanes
// are computed on 0 and replaced by 0, as in fast_exp. NaN survives the clamp (comparisons with
// it are false) and every step after it.
inline vfloat vexp(vfloat x) {
    const float hi = 89.0f, lo = -103.972084f;
    const auto underflow = x < lo;
    vfloat xc = hi < x ? vfloat{} + hi : x;
    xc = underflow ? vfloat{} : xc;
    const float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to nearest
    const vfloat n = (xc * 1.44269504088896341f + kRound) - kRound;
    vfloat r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const vfloat p = exp_poly(r);
#ifdef __AVX512F__
    const vfloat y = (vfloat)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
    typedef int32_t vint __attribute__((vector_size(sizeof(vfloat))));
    const vint ni = __builtin_convertvector(n == n ? n : vfloat{}, vint);  // no NaN-to-int cast
    const vint n1 = ni >> 1, n2 = ni - n1;
    const vint b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
    vfloat s1, s2;
    std::memcpy(&s1, &b1, sizeof s1);
    std::memcpy(&s2, &b2, sizeof s2);
    const vfloat y = p * s1 * s2;
#endif
    return underflow ? vfloat{} : y;
}

// y[i] = exp(x[i] - shift) for i < n (y may be x), and their sum: whole vectors through vexp,
// the tail through fast_exp (the two agree bitwise).
inline float exp_and_sum(float* y, const float* x, int64_t n, float shift) {
    return row_sum(
        n,
        [&](int64_t i) {
            const vfloat e = vexp(load(x + i) - shift);
            store(y + i, e);
            return e;
        },
        [&](int64_t i) { return y[i] = fast_exp(x[i] - shift); });
}

}  // namespace LLMCORE_ISA
}  // namespace llmcore
