/* Which SIMD path is compiled, and fast fp16 scalar conversion for hot loops. */
#ifndef EDGEKV_SIMD_H
#define EDGEKV_SIMD_H

#include "common.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EK_AVX2 1
#include <immintrin.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__AVX512VBMI__)
#define EK_AVX512 1 /* 512-bit integer attention paths (kv_attention_x512.c) */
#endif
#elif defined(__ARM_NEON)
#define EK_NEON 1
#include <arm_neon.h>
#endif

/* exp(x) for x <= 0: 2^n * p(r), relative error < 2e-7 (Cephes polynomial); the constants, shared by
 * the 4-, 8- and 16-lane forms (NEON, AVX2, AVX-512): the clamp, log2(e), ln(2) in two parts, and p's coefficients */
#define EK_EXP_MIN (-87.0f)
#define EK_EXP_LOG2E 1.44269504088896341f
#define EK_EXP_LN2_HI 0.693359375f
#define EK_EXP_LN2_LO (-2.12194440e-4f)
#define EK_EXP_P0 1.9875691500e-4f
#define EK_EXP_P1 1.3981999507e-3f
#define EK_EXP_P2 8.3334519073e-3f
#define EK_EXP_P3 4.1665795894e-2f
#define EK_EXP_P4 1.6666665459e-1f
#define EK_EXP_P5 5.0000001201e-1f

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
static inline float ek_hmax256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}
/* every cache line of bytes [p, p + n) into L1 */
static inline void ek_prefetch_bytes(const void *p, size_t n) {
    for (size_t b = 0; b < n; b += 64) _mm_prefetch((const char *)p + b, _MM_HINT_T0);
}
static inline __m256 ek_exp_neg256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(EK_EXP_MIN));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EK_EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EK_EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EK_EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(EK_EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EK_EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EK_EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EK_EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EK_EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EK_EXP_P5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#if defined(EK_AVX512)
/* ek_exp_neg256 on 16 lanes: the same reduction and polynomial, 2^n applied by vscalefps */
static inline __m512 ek_exp_neg512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(EK_EXP_MIN));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EK_EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EK_EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EK_EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(EK_EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EK_EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EK_EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EK_EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EK_EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EK_EXP_P5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

static inline int32_t ek_hsum256_epi32(__m256i v) {
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4e));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xb1));
    return _mm_cvtsi128_si32(x);
}
/* acc + u8 x s8 products summed in groups of 4 (int32 lanes): vpdpbusd where compiled in, else
 * vpmaddubsw + vpmaddwd, exact while each pair of products fits int16 (callers guarantee it) */
static inline __m256i ek_dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
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

#if defined(EK_NEON) && defined(__aarch64__)
/* ek_exp_neg256 on 4 lanes: the same clamp, reduction (round to nearest even, fused ln 2 steps) and
 * polynomial, so each lane gives the AVX2 lane's bits */
static inline float32x4_t ek_exp_neg128(float32x4_t x) {
    x = vmaxq_f32(x, vdupq_n_f32(EK_EXP_MIN));
    const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, EK_EXP_LOG2E));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(EK_EXP_LN2_HI));
    r = vfmsq_f32(r, n, vdupq_n_f32(EK_EXP_LN2_LO));
    float32x4_t p = vdupq_n_f32(EK_EXP_P0);
    p = vfmaq_f32(vdupq_n_f32(EK_EXP_P1), p, r);
    p = vfmaq_f32(vdupq_n_f32(EK_EXP_P2), p, r);
    p = vfmaq_f32(vdupq_n_f32(EK_EXP_P3), p, r);
    p = vfmaq_f32(vdupq_n_f32(EK_EXP_P4), p, r);
    p = vfmaq_f32(vdupq_n_f32(EK_EXP_P5), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}
/* silu(x) = x * sigmoid(x), the sigmoid from e = exp(-|x|) <= 1 (no overflow) as 1/(1+e) for x >= 0
 * and e/(1+e) below: the FFN's AVX2 form (model.c), lane for lane */
static inline float32x4_t ek_silu128(float32x4_t x) {
    const float32x4_t one = vdupq_n_f32(1.0f);
    const float32x4_t e = ek_exp_neg128(vnegq_f32(vabsq_f32(x)));
    const float32x4_t r = vdivq_f32(one, vaddq_f32(one, e));
    const uint32x4_t neg = vreinterpretq_u32_s32(vshrq_n_s32(vreinterpretq_s32_f32(x), 31)); /* sign bit */
    return vmulq_f32(x, vbslq_f32(neg, vmulq_f32(e, r), r));
}
/* x[i] = exp(x[i] - m) (x <= m) and their sum, 4 at a time; the tail through the same polynomial,
 * so results do not depend on where a row ends (the softmax's NEON form) */
static inline float ek_exp_shift_neon(float *x, int n, float m) {
    const float32x4_t vm = vdupq_n_f32(m);
    float32x4_t acc = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t e = ek_exp_neg128(vsubq_f32(vld1q_f32(x + i), vm));
        vst1q_f32(x + i, e);
        acc = vaddq_f32(acc, e);
    }
    float sum = vaddvq_f32(acc);
    for (; i < n; i++) {
        x[i] = vgetq_lane_f32(ek_exp_neg128(vdupq_n_f32(x[i] - m)), 0);
        sum += x[i];
    }
    return sum;
}
#endif

/* Name of the compiled path, for logs and `edgekv info`. */
static inline const char *ek_simd_name(void) {
#if defined(EK_AVX512)
    return "avx2+vnni+avx512"; /* and the 512-bit attention paths */
#elif defined(EK_AVX2) && (defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)))
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
