// Portable SIMD for the CPU kernels: GCC/Clang vector extensions of FASTKD_VEC_BYTES bytes, which the compiler
// lowers to AVX-512, AVX2, SSE2 or NEON by the flags of the translation unit that includes this header (one per
// instruction set, see kd_cpu_avx512.cpp etc.). Everything here has internal linkage in the namespace
// fastkd::FASTKD_ISA, so translation units built for different instruction sets never share a function.
//
// exp and log follow Cephes' single-precision algorithms (range reduction plus a minimax polynomial, about 1 ulp);
// the fp16 and bf16 conversions round to nearest even, as torch's do.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef FASTKD_VEC_BYTES
#error "define FASTKD_VEC_BYTES (16, 32 or 64) before including simd.h"
#endif

namespace fastkd {
namespace FASTKD_ISA {
namespace {

constexpr int kLanes = FASTKD_VEC_BYTES / 4;
typedef float vf __attribute__((vector_size(FASTKD_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(FASTKD_VEC_BYTES)));  // also the type of a comparison's mask
typedef uint32_t vu __attribute__((vector_size(FASTKD_VEC_BYTES)));
typedef uint16_t vh __attribute__((vector_size(FASTKD_VEC_BYTES / 2)));

inline vf splat(float x) { return vf{} + x; }
inline vu splat_u(uint32_t x) { return vu{} + x; }
inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }  // b where either is NaN
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vabs(vf a) { return (vf)((vu)a & 0x7fffffffu); }

inline float hsum(vf v) {
    float s = v[0];
    for (int i = 1; i < kLanes; ++i) s += v[i];
    return s;
}
inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
    return m;
}

constexpr float kInf = __builtin_inff();

// eˣ for x ≤ 0 (or a rounding error above 0), the hot path of every kernel: the polynomial is a degree-5
// minimax fit on [−ln2/2, ln2/2] (relative error 1.7e-7 in float32), and −inf or anything below −88 gives exactly
// 0 (subnormal results flush to 0). NaN is not propagated: callers track it per row.
inline vf exp_polynomial(vf r) {
    vf p = splat(8.312049321830273e-3f);
    p = p * r + 4.189449921250343e-2f;
    p = p * r + 1.6667133569717407e-1f;
    p = p * r + 4.999920129776001e-1f;
    p = p * r + 1.0f;
    return p * r + 1.0f;
}

inline vf vexp_nonpositive(vf x) {
#if defined(__AVX512F__)
    const vf clamped = vmax(x, splat(-110.0f));  // scalef builds 2^n·p directly, underflowing to 0 (n ≤ −159)
#else
    const vf clamped = vmax(x, splat(-88.0f));  // n ≥ −127, and 2^−127 is built as the bit pattern 0: eˣ = 0
#endif
    vf n = clamped * 1.44269504088896341f;
    n = (n + 12582912.0f) - 12582912.0f;  // round to nearest (1.5·2^23)
    const vf r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
#if defined(__AVX512F__)
    return (vf)_mm512_maskz_scalef_ps(0xffff, (__m512)exp_polynomial(r), (__m512)n);
#else
    return exp_polynomial(r) * (vf)((__builtin_convertvector(n, vi) + 127) << 23);
#endif
}

// eˣ for any x: subnormal or 0 below −87, +inf above log(FLT_MAX), NaN stays NaN (the JSD's log-ratio helpers).
inline vf vexp(vf x) {
    const vf clamped = vmin(vmax(x, splat(-104.0f)), splat(89.0f));
    vf n = clamped * 1.44269504088896341f;
    n = (n + 12582912.0f) - 12582912.0f;  // round to nearest (1.5·2^23)
    const vf r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
#if defined(__AVX512F__)
    const vf y = (vf)_mm512_maskz_scalef_ps(0xffff, (__m512)exp_polynomial(r), (__m512)n);
#else
    const vi n_int = __builtin_convertvector(n, vi), half = n_int >> 1;  // 2^n = 2^half · 2^(n − half), both normal
    const vf y = exp_polynomial(r) * (vf)((half + 127) << 23) * (vf)((n_int - half + 127) << 23);
#endif
    return x != x ? x : y;
}

// log x; −inf at 0, NaN below 0 and at NaN, +inf at +inf; subnormal x handled.
inline vf vlog(vf x) {
    const vi subnormal = x < 1.17549435e-38f;
    vf scaled = subnormal ? x * 8388608.0f : x;  // 2^23
    vf e = __builtin_convertvector(((vi)scaled >> 23) & 0xff, vf) - 126.0f;
    e = subnormal ? e - 23.0f : e;
    vf m = (vf)(((vu)scaled & 0x007fffffu) | 0x3f000000u);  // in [0.5, 1)
    const vi small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = (small ? m + m : m) - 1.0f;
    const vf z = m * m;
    vf p = splat(7.0376836292e-2f);
    p = p * m - 1.1514610310e-1f;
    p = p * m + 1.1676998740e-1f;
    p = p * m - 1.2420140846e-1f;
    p = p * m + 1.4249322787e-1f;
    p = p * m - 1.6668057665e-1f;
    p = p * m + 2.0000714765e-1f;
    p = p * m - 2.4999993993e-1f;
    p = p * m + 3.3333331174e-1f;
    vf y = p * m * z + e * -2.12194440e-4f - 0.5f * z;
    y = m + y + e * 0.693359375f;
    y = x == 0.0f ? splat(-kInf) : y;
    y = x == kInf ? splat(kInf) : y;
    return (x < 0.0f) | (x != x) ? splat(__builtin_nanf("")) : y;
}

// log(1 + y) for y > −1, exact to rounding also for tiny y (Kahan's trick).
inline vf vlog1p(vf y) {
    const vf u = y + 1.0f;
    return u == 1.0f ? y : vlog(u) * (y / (u - 1.0f));
}

// eˣ − 1, exact to rounding also for tiny x (Kahan's trick).
inline vf vexpm1(vf x) {
    const vf u = vexp(x);
    const vf um1 = u - 1.0f;
    return u == 1.0f ? x : ((um1 == -1.0f) | (u == kInf) ? um1 : um1 * (x / vlog(u)));
}

// ---- storage formats ----
inline vf bf16_to_f32(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }

inline vh f32_to_bf16(vf x) {
    const vu u = (vu)x;
    const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return __builtin_convertvector((u & 0x7fffffffu) > 0x7f800000u ? splat_u(0x7fc0u) : rounded, vh);
}

inline vf f16_to_f32(vh h) {
    const vu x = __builtin_convertvector(h, vu);
    const vu magnitude = x & 0x7fffu;
    vu bits = (vu)((vf)(magnitude << 13) * 0x1p112f);  // normal and subnormal halves, exactly
    bits = magnitude >= 0x7c00u ? ((magnitude << 13) | 0x7f800000u) : bits;  // inf, NaN
    return (vf)(bits | ((x & 0x8000u) << 16));
}

inline vh f32_to_f16(vf x) {
    vu u = (vu)x;
    const vu sign = u & 0x80000000u;
    u ^= sign;
    const vu inf_or_nan = u > 0x7f800000u ? splat_u(0x7e00u) : splat_u(0x7c00u);
    const vu subnormal = (vu)((vf)u + 0.5f) - (126u << 23);  // the float addition rounds to nearest even
    const vu normal = (u + (uint32_t(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
    const vu h = u >= (143u << 23) ? inf_or_nan : (u < (113u << 23) ? subnormal : normal);
    return __builtin_convertvector(h | (sign >> 16), vh);
}

// Bytes per element of a storage dtype.
inline int64_t element_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// n ≤ kLanes entries of a row of `dtype` as float32; lanes past n hold `fill`.
inline vf load_lanes(const void* row, int dtype, int64_t start, int n, float fill) {
    if (dtype == kFloat32) {
        const float* p = static_cast<const float*>(row) + start;
        if (n == kLanes) return vload(p);
        float tmp[kLanes];
        for (int i = 0; i < kLanes; ++i) tmp[i] = i < n ? p[i] : fill;
        return vload(tmp);
    }
    const uint16_t* p = static_cast<const uint16_t*>(row) + start;
    vh h{};
    if (n == kLanes) {
        std::memcpy(&h, p, sizeof h);
    } else {
        for (int i = 0; i < n; ++i) h[i] = p[i];
    }
    vf v = dtype == kBFloat16 ? bf16_to_f32(h) : f16_to_f32(h);
    if (n < kLanes) {
        for (int i = n; i < kLanes; ++i) v[i] = fill;
    }
    return v;
}

// Stores the first n ≤ kLanes lanes of v into a row of `dtype`; a full float32 vector at a 64-byte boundary
// bypasses the caches with AVX-512 (the caller ends with store_fence()).
inline void store_lanes(void* row, int dtype, int64_t start, int n, vf v) {
    if (dtype == kFloat32) {
        float* p = static_cast<float*>(row) + start;
        if (n == kLanes) {
#if defined(__AVX512F__)
            if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_ps(p, (__m512)v);
#endif
            vstore(p, v);
        } else {
            for (int i = 0; i < n; ++i) p[i] = v[i];
        }
        return;
    }
    const vh h = dtype == kBFloat16 ? f32_to_bf16(v) : f32_to_f16(v);
    uint16_t* p = static_cast<uint16_t*>(row) + start;
    if (n == kLanes) {
        std::memcpy(p, &h, sizeof h);
    } else {
        for (int i = 0; i < n; ++i) p[i] = h[i];
    }
}

// Asks for the cache line holding column `col` of a row of `dtype` (never faults, whatever the address).
inline void prefetch(const void* row, int dtype, int64_t col) {
    __builtin_prefetch(static_cast<const char*>(row) + col * element_size(dtype), 0, 3);
}

// Orders the streaming stores above before anything that follows.
inline void store_fence() {
#if defined(__AVX512F__)
    _mm_sfence();
#endif
}

}  // namespace
}  // namespace FASTKD_ISA
}  // namespace fastkd
