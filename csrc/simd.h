/* Which SIMD path is compiled, and fast fp16 scalar conversion for hot loops. */
#ifndef EDGEKV_SIMD_H
#define EDGEKV_SIMD_H

#include "quant.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EK_AVX2 1
#include <immintrin.h>
#elif defined(__ARM_NEON)
#define EK_NEON 1
#include <arm_neon.h>
#endif

#if defined(EK_AVX2)
static inline float ek_h2f(ek_fp16 h) { return _cvtsh_ss(h); }
static inline float ek_hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
#elif defined(EK_NEON) && defined(__aarch64__)
static inline float ek_h2f(ek_fp16 h) {
    __fp16 x;
    __builtin_memcpy(&x, &h, 2);
    return (float)x;
}
#else
static inline float ek_h2f(ek_fp16 h) { return ek_fp16_to_fp32(h); }
#endif

/* Name of the compiled path, for logs and `edgekv info`. */
static inline const char *ek_simd_name(void) {
#if defined(EK_AVX2) && (defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)))
    return "avx2+vnni"; /* integer dot products use vpdpbusd */
#elif defined(EK_AVX2)
    return "avx2";
#elif defined(EK_NEON)
#if defined(__ARM_FEATURE_DOTPROD)
    return "neon+dotprod";
#else
    return "neon";
#endif
#else
    return "scalar";
#endif
}

#endif
