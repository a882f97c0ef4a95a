/* Weight kernels: fp16 conversion, activation quantization, and per-type dot
 * products (plain C reference + AVX2 + NEON), collected in one traits table.
 *
 * Every SIMD kernel computes the same sums as its *_ref twin; tests compare
 * them with an explicit error bound (tests/test_kernels.c, tests/test_kernels.py).
 */
#include "quant.h"

#include <math.h>
#include <string.h>

#include "simd.h"

/* ------------------------------------------------------------------------- */
/* fp16                                                                       */
/* ------------------------------------------------------------------------- */

float ek_fp16_to_fp32(ek_fp16 h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24 is exact in fp32 */
        float f = (float)mant * (1.0f / 16777216.0f);
        return sign ? -f : f;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

ek_fp16 ek_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffffu;
    if (absx > 0x7f800000u) return (ek_fp16)(sign | 0x7e00); /* NaN stays NaN */
    if (absx >= 0x477ff000u) return (ek_fp16)(sign | 0x7c00); /* rounds past 65504: inf */
    if (absx < 0x38800000u) {
        /* below the smallest normal half (2^-14): subnormal, round to nearest even */
        float a;
        memcpy(&a, &absx, 4);
        return (ek_fp16)(sign | (uint32_t)lrintf(a * 16777216.0f));
    }
    uint32_t r = absx + 0xfffu + ((absx >> 13) & 1u); /* round to nearest even */
    return (ek_fp16)(sign | ((r - 0x38000000u) >> 13));
}

void ek_fp16_to_fp32_row(const ek_fp16 *x, float *y, int n) {
    int i = 0;
#if defined(EK_AVX2)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
#elif defined(EK_NEON) && defined(__aarch64__)
    for (; i + 8 <= n; i += 8) {
        const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(x + i));
        vst1q_f32(y + i, vcvt_f32_f16(vget_low_f16(h)));
        vst1q_f32(y + i + 4, vcvt_high_f32_f16(h));
    }
#endif
    for (; i < n; i++) y[i] = ek_fp16_to_fp32(x[i]);
}

void ek_fp32_to_fp16_row(const float *x, ek_fp16 *y, int n) {
    for (int i = 0; i < n; i++) y[i] = ek_fp32_to_fp16(x[i]);
}

/* ------------------------------------------------------------------------- */
/* activation quantization                                                    */
/* ------------------------------------------------------------------------- */

void ek_quantize_row_q8a_ref(const float *x, block_q8a *y, int n) {
    const int nb = n / QK;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.0f;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int q = (int)lrintf(xb[j] * id);
            y[b].qs[j] = (int8_t)q;
            sum += q;
        }
        y[b].d = d;
        y[b].s = d * (float)sum;
    }
}

#if defined(EK_AVX2)
/* The same blocks as the reference for finite inputs (max is exact in any order, cvtps2dq rounds
 * to nearest even as lrintf does), without its libm calls: batches quantize every token's matmul
 * inputs (docs/decisions.md). */
static void quantize_row_q8a_avx2(const float *x, block_q8a *y, int n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(xb + 8 * k);
            m = _mm256_max_ps(_mm256_andnot_ps(sign, v[k]), m); /* a NaN lane keeps m, as fmaxf does */
        }
        const float d = ek_hmax256(m) / 127.0f;
        const __m256 id = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        __m256i q[4];
        for (int k = 0; k < 4; k++) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], id));
        const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        /* int32 -> int8 (|q| <= 127: the saturating packs are exact), then the 4-byte groups the
         * two packs interleaved across 128-bit lanes put back in order */
        const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)y[b].qs, _mm256_permutevar8x32_epi32(p8, order));
        y[b].d = d;
        y[b].s = d * (float)ek_hsum256_epi32(sum);
    }
}
#elif defined(EK_NEON) && defined(__aarch64__)
/* The same blocks as the reference for finite inputs: vmaxnm skips a NaN lane as fmaxf does,
 * vcvtnq rounds to nearest even as lrintf does, and the saturating narrows are exact (|q| <= 127). */
static void quantize_row_q8a_neon(const float *x, block_q8a *y, int n) {
    for (int b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float32x4_t v[8], m = vdupq_n_f32(0.0f);
        for (int k = 0; k < 8; k++) {
            v[k] = vld1q_f32(xb + 4 * k);
            m = vmaxnmq_f32(m, vabsq_f32(v[k]));
        }
        const float d = vmaxnmvq_f32(m) / 127.0f;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        int32x4_t q[8], sum = vdupq_n_s32(0);
        for (int k = 0; k < 8; k++) {
            q[k] = vcvtnq_s32_f32(vmulq_n_f32(v[k], id));
            sum = vaddq_s32(sum, q[k]);
        }
        for (int k = 0; k < 2; k++) {
            const int16x8_t h0 = vcombine_s16(vqmovn_s32(q[4 * k]), vqmovn_s32(q[4 * k + 1]));
            const int16x8_t h1 = vcombine_s16(vqmovn_s32(q[4 * k + 2]), vqmovn_s32(q[4 * k + 3]));
            vst1q_s8(y[b].qs + 16 * k, vcombine_s8(vqmovn_s16(h0), vqmovn_s16(h1)));
        }
        y[b].d = d;
        y[b].s = d * (float)vaddvq_s32(sum);
    }
}
#endif

void ek_quantize_row_q8a(const float *x, block_q8a *y, int n) {
#if defined(EK_AVX2)
    quantize_row_q8a_avx2(x, y, n);
#elif defined(EK_NEON) && defined(__aarch64__)
    quantize_row_q8a_neon(x, y, n);
#else
    ek_quantize_row_q8a_ref(x, y, n);
#endif
}

/* ------------------------------------------------------------------------- */
/* dequantization (embedding lookup, tests)                                   */
/* ------------------------------------------------------------------------- */

static void to_float_f32(const void *row, float *y, int n) { memcpy(y, row, (size_t)n * sizeof(float)); }

static void to_float_f16(const void *row, float *y, int n) { ek_fp16_to_fp32_row((const ek_fp16 *)row, y, n); }

static void to_float_q4_0(const void *row, float *y, int n) {
    const block_q4_0 *b = (const block_q4_0 *)row;
    for (int i = 0; i < n / QK; i++) {
        const float d = ek_fp16_to_fp32(b[i].d);
        for (int j = 0; j < QK / 2; j++) {
            y[i * QK + j] = ((int)(b[i].qs[j] & 0x0f) - 8) * d;
            y[i * QK + j + QK / 2] = ((int)(b[i].qs[j] >> 4) - 8) * d;
        }
    }
}

static void to_float_q4_1(const void *row, float *y, int n) {
    const block_q4_1 *b = (const block_q4_1 *)row;
    for (int i = 0; i < n / QK; i++) {
        const float d = ek_fp16_to_fp32(b[i].d), m = ek_fp16_to_fp32(b[i].m);
        for (int j = 0; j < QK / 2; j++) {
            y[i * QK + j] = (b[i].qs[j] & 0x0f) * d + m;
            y[i * QK + j + QK / 2] = (b[i].qs[j] >> 4) * d + m;
        }
    }
}

static void to_float_q8_0(const void *row, float *y, int n) {
    const block_q8_0 *b = (const block_q8_0 *)row;
    for (int i = 0; i < n / QK; i++) {
        const float d = ek_fp16_to_fp32(b[i].d);
        for (int j = 0; j < QK; j++) y[i * QK + j] = b[i].qs[j] * d;
    }
}

/* ------------------------------------------------------------------------- */
/* reference dot products: one weight row against nx activation rows          */
/* ------------------------------------------------------------------------- */

static void dot_f32_ref(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    const float *wr = (const float *)w;
    for (int r = 0; r < nx; r++) {
        const float *x = (const float *)EK_ACT_ROW(act, stride, r);
        double s = 0.0;
        for (int i = 0; i < n; i++) s += (double)wr[i] * x[i];
        out[r] = (float)s;
    }
}

static void dot_f16_ref(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    const ek_fp16 *wr = (const ek_fp16 *)w;
    for (int r = 0; r < nx; r++) {
        const float *x = (const float *)EK_ACT_ROW(act, stride, r);
        double s = 0.0;
        for (int i = 0; i < n; i++) s += (double)ek_fp16_to_fp32(wr[i]) * x[i];
        out[r] = (float)s;
    }
}

/* sum of unsigned 4-bit codes (Q4 nibble order) times int8 activations, one block */
static inline int nibble_dot(const uint8_t *qs, const int8_t *a) {
    int isum = 0;
    for (int j = 0; j < QK / 2; j++) isum += (qs[j] & 0x0f) * a[j] + (qs[j] >> 4) * a[j + QK / 2];
    return isum;
}

/* Q4_0: sum (q-8)*dw * a*da = dw * (da * sum(q*a) - 8 * s_a) */
static void dot_q4_0_ref(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    const block_q4_0 *wb = (const block_q4_0 *)w;
    for (int r = 0; r < nx; r++) {
        const block_q8a *a = (const block_q8a *)EK_ACT_ROW(act, stride, r);
        float s = 0.0f;
        for (int b = 0; b < n / QK; b++) {
            const int isum = nibble_dot(wb[b].qs, a[b].qs);
            s += ek_fp16_to_fp32(wb[b].d) * (a[b].d * (float)isum - 8.0f * a[b].s);
        }
        out[r] = s;
    }
}

/* Q4_1: sum (q*dw + m) * a*da = dw*da*sum(q*a) + m * s_a */
static void dot_q4_1_ref(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    const block_q4_1 *wb = (const block_q4_1 *)w;
    for (int r = 0; r < nx; r++) {
        const block_q8a *a = (const block_q8a *)EK_ACT_ROW(act, stride, r);
        float s = 0.0f;
        for (int b = 0; b < n / QK; b++) {
            const int isum = nibble_dot(wb[b].qs, a[b].qs);
            s += ek_fp16_to_fp32(wb[b].d) * a[b].d * (float)isum + ek_fp16_to_fp32(wb[b].m) * a[b].s;
        }
        out[r] = s;
    }
}

static void dot_q8_0_ref(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    const block_q8_0 *wb = (const block_q8_0 *)w;
    for (int r = 0; r < nx; r++) {
        const block_q8a *a = (const block_q8a *)EK_ACT_ROW(act, stride, r);
        float s = 0.0f;
        for (int b = 0; b < n / QK; b++) {
            int isum = 0;
            for (int j = 0; j < QK; j++) isum += wb[b].qs[j] * a[b].qs[j];
            s += ek_fp16_to_fp32(wb[b].d) * a[b].d * (float)isum;
        }
        out[r] = s;
    }
}

/* ------------------------------------------------------------------------- */
/* AVX2 kernels                                                               */
/* ------------------------------------------------------------------------- */
#if defined(EK_AVX2)

/* 32 nibbles -> 32 bytes in [0,15]: low nibbles are elements 0..15, high nibbles 16..31 */
static inline __m256i unpack_nibbles(const uint8_t *qs) {
    __m128i t = _mm_loadu_si128((const __m128i *)qs);
    __m256i both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

/* one weight block (u8: Q4 codes or |Q8 weights|) against one int8 activation block: products
 * summed in groups of 4, as 8 floats */
static inline __m256 block_dot_act(__m256i u, __m256i s) {
    return _mm256_cvtepi32_ps(ek_dpbusd(_mm256_setzero_si256(), u, s));
}

/* nx is a compile-time constant at each call site below, so the r-loops unroll. */
EK_INLINE void dot_q4_avx2(int n, const void *w, int has_min, const void *act, size_t stride, int nx,
                           float *out) {
    const int nb = n / QK;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float off[4] = {0, 0, 0, 0};
    const block_q8a *a[4];
    for (int r = 0; r < nx; r++) a[r] = (const block_q8a *)EK_ACT_ROW(act, stride, r);
    for (int b = 0; b < nb; b++) {
        __m256i q;
        float dw, ow;
        if (has_min) {
            const block_q4_1 *wb = (const block_q4_1 *)w + b;
            q = unpack_nibbles(wb->qs);
            dw = ek_h2f(wb->d);
            ow = ek_h2f(wb->m);
        } else {
            const block_q4_0 *wb = (const block_q4_0 *)w + b;
            q = unpack_nibbles(wb->qs);
            dw = ek_h2f(wb->d);
            ow = -8.0f * dw;
        }
        for (int r = 0; r < nx; r++) {
            __m256i av = _mm256_loadu_si256((const __m256i *)a[r][b].qs);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[r][b].d), block_dot_act(q, av), acc[r]);
            off[r] += ow * a[r][b].s;
        }
    }
    for (int r = 0; r < nx; r++) out[r] = ek_hsum256(acc[r]) + off[r];
}

static void dot_q4_0_avx2(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    switch (nx) {
    case 4: dot_q4_avx2(n, w, 0, act, stride, 4, out); break;
    case 3: dot_q4_avx2(n, w, 0, act, stride, 3, out); break;
    case 2: dot_q4_avx2(n, w, 0, act, stride, 2, out); break;
    case 1: dot_q4_avx2(n, w, 0, act, stride, 1, out); break;
    default: for (int r = 0; r < nx; r++) dot_q4_avx2(n, w, 0, EK_ACT_ROW(act, stride, r), stride, 1, out + r);
    }
}

static void dot_q4_1_avx2(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    switch (nx) {
    case 4: dot_q4_avx2(n, w, 1, act, stride, 4, out); break;
    case 3: dot_q4_avx2(n, w, 1, act, stride, 3, out); break;
    case 2: dot_q4_avx2(n, w, 1, act, stride, 2, out); break;
    case 1: dot_q4_avx2(n, w, 1, act, stride, 1, out); break;
    default: for (int r = 0; r < nx; r++) dot_q4_avx2(n, w, 1, EK_ACT_ROW(act, stride, r), stride, 1, out + r);
    }
}

EK_INLINE void dot_q8_0_avx2_n(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    const int nb = n / QK;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const block_q8a *a[4];
    for (int r = 0; r < nx; r++) a[r] = (const block_q8a *)EK_ACT_ROW(act, stride, r);
    const block_q8_0 *wb = (const block_q8_0 *)w;
    for (int b = 0; b < nb; b++) {
        __m256i wq = _mm256_loadu_si256((const __m256i *)wb[b].qs);
        __m256i wabs = _mm256_sign_epi8(wq, wq); /* |w| as unsigned bytes */
        const float dw = ek_h2f(wb[b].d);
        for (int r = 0; r < nx; r++) {
            __m256i av = _mm256_loadu_si256((const __m256i *)a[r][b].qs);
            __m256i as = _mm256_sign_epi8(av, wq); /* move w's sign onto a */
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[r][b].d), block_dot_act(wabs, as), acc[r]);
        }
    }
    for (int r = 0; r < nx; r++) out[r] = ek_hsum256(acc[r]);
}

static void dot_q8_0_avx2(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    switch (nx) {
    case 4: dot_q8_0_avx2_n(n, w, act, stride, 4, out); break;
    case 3: dot_q8_0_avx2_n(n, w, act, stride, 3, out); break;
    case 2: dot_q8_0_avx2_n(n, w, act, stride, 2, out); break;
    case 1: dot_q8_0_avx2_n(n, w, act, stride, 1, out); break;
    default: for (int r = 0; r < nx; r++) dot_q8_0_avx2_n(n, w, EK_ACT_ROW(act, stride, r), stride, 1, out + r);
    }
}

static void dot_f32_avx2(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    const float *wr = (const float *)w;
    for (int r = 0; r < nx; r++) {
        const float *x = (const float *)EK_ACT_ROW(act, stride, r);
        __m256 acc = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i), _mm256_loadu_ps(x + i), acc);
        float s = ek_hsum256(acc);
        for (; i < n; i++) s += wr[i] * x[i];
        out[r] = s;
    }
}

static void dot_f16_avx2(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    const ek_fp16 *wr = (const ek_fp16 *)w;
    for (int r = 0; r < nx; r++) {
        const float *x = (const float *)EK_ACT_ROW(act, stride, r);
        __m256 acc = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wr + i)));
            acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), acc);
        }
        float s = ek_hsum256(acc);
        for (; i < n; i++) s += ek_fp16_to_fp32(wr[i]) * x[i];
        out[r] = s;
    }
}

#define DOT_BEST(t) dot_##t##_avx2

/* ------------------------------------------------------------------------- */
/* NEON kernels                                                               */
/* ------------------------------------------------------------------------- */
#elif defined(EK_NEON) && defined(__aarch64__)

/* sum of 16 s8*s8 products, 4 int32 lanes */
static inline int32x4_t dot16_s8(int8x16_t x, int8x16_t y, int32x4_t acc) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, x, y);
#else
    int16x8_t p = vmull_s8(vget_low_s8(x), vget_low_s8(y));
    p = vmlal_s8(p, vget_high_s8(x), vget_high_s8(y)); /* |2 * 127 * 128| fits int16 */
    return vpadalq_s16(acc, p);
#endif
}

static void dot_q4_neon(int n, const void *w, int has_min, const void *act, size_t stride, int nx, float *out) {
    const int nb = n / QK;
    for (int r = 0; r < nx; r++) {
        const block_q8a *a = (const block_q8a *)EK_ACT_ROW(act, stride, r);
        float32x4_t acc = vdupq_n_f32(0.0f);
        float off = 0.0f;
        for (int b = 0; b < nb; b++) {
            const uint8_t *qs;
            float dw, ow;
            if (has_min) {
                const block_q4_1 *wb = (const block_q4_1 *)w + b;
                qs = wb->qs; dw = ek_h2f(wb->d); ow = ek_h2f(wb->m);
            } else {
                const block_q4_0 *wb = (const block_q4_0 *)w + b;
                qs = wb->qs; dw = ek_h2f(wb->d); ow = -8.0f * dw;
            }
            uint8x16_t v = vld1q_u8(qs);
            int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f)));
            int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
            int32x4_t s = vdupq_n_s32(0);
            s = dot16_s8(lo, vld1q_s8(a[b].qs), s);
            s = dot16_s8(hi, vld1q_s8(a[b].qs + 16), s);
            acc = vmlaq_n_f32(acc, vcvtq_f32_s32(s), dw * a[b].d);
            off += ow * a[b].s;
        }
        out[r] = vaddvq_f32(acc) + off;
    }
}

static void dot_q4_0_neon(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    dot_q4_neon(n, w, 0, act, stride, nx, out);
}
static void dot_q4_1_neon(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    dot_q4_neon(n, w, 1, act, stride, nx, out);
}

static void dot_q8_0_neon(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    const int nb = n / QK;
    const block_q8_0 *wb = (const block_q8_0 *)w;
    for (int r = 0; r < nx; r++) {
        const block_q8a *a = (const block_q8a *)EK_ACT_ROW(act, stride, r);
        float32x4_t acc = vdupq_n_f32(0.0f);
        for (int b = 0; b < nb; b++) {
            int32x4_t s = vdupq_n_s32(0);
            s = dot16_s8(vld1q_s8(wb[b].qs), vld1q_s8(a[b].qs), s);
            s = dot16_s8(vld1q_s8(wb[b].qs + 16), vld1q_s8(a[b].qs + 16), s);
            acc = vmlaq_n_f32(acc, vcvtq_f32_s32(s), ek_h2f(wb[b].d) * a[b].d);
        }
        out[r] = vaddvq_f32(acc);
    }
}

static void dot_f32_neon(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    const float *wr = (const float *)w;
    for (int r = 0; r < nx; r++) {
        const float *x = (const float *)EK_ACT_ROW(act, stride, r);
        float32x4_t acc = vdupq_n_f32(0.0f);
        int i = 0;
        for (; i + 4 <= n; i += 4) acc = vfmaq_f32(acc, vld1q_f32(wr + i), vld1q_f32(x + i));
        float s = vaddvq_f32(acc);
        for (; i < n; i++) s += wr[i] * x[i];
        out[r] = s;
    }
}

static void dot_f16_neon(int n, const void *w, const void *act, size_t stride, int nx, float *out) {
    const ek_fp16 *wr = (const ek_fp16 *)w;
    for (int r = 0; r < nx; r++) {
        const float *x = (const float *)EK_ACT_ROW(act, stride, r);
        float32x4_t acc = vdupq_n_f32(0.0f);
        int i = 0;
        for (; i + 4 <= n; i += 4) {
            float32x4_t wv = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(wr + i)));
            acc = vfmaq_f32(acc, wv, vld1q_f32(x + i));
        }
        float s = vaddvq_f32(acc);
        for (; i < n; i++) s += ek_fp16_to_fp32(wr[i]) * x[i];
        out[r] = s;
    }
}

#define DOT_BEST(t) dot_##t##_neon

#else
#define DOT_BEST(t) dot_##t##_ref
#endif

/* ------------------------------------------------------------------------- */
/* the table                                                                  */
/* ------------------------------------------------------------------------- */

static const ek_type_traits TRAITS[EK_TYPE_COUNT] = {
    [EK_TYPE_F32] = {"F32", 1, sizeof(float), 0, DOT_BEST(f32), dot_f32_ref, to_float_f32},
    [EK_TYPE_F16] = {"F16", 1, sizeof(ek_fp16), 0, DOT_BEST(f16), dot_f16_ref, to_float_f16},
    [EK_TYPE_Q4_0] = {"Q4_0", QK, sizeof(block_q4_0), 1, DOT_BEST(q4_0), dot_q4_0_ref, to_float_q4_0},
    [EK_TYPE_Q4_1] = {"Q4_1", QK, sizeof(block_q4_1), 1, DOT_BEST(q4_1), dot_q4_1_ref, to_float_q4_1},
    [EK_TYPE_Q8_0] = {"Q8_0", QK, sizeof(block_q8_0), 1, DOT_BEST(q8_0), dot_q8_0_ref, to_float_q8_0},
};

const ek_type_traits *ek_type_get(int type) {
    if (type < 0 || type >= EK_TYPE_COUNT || TRAITS[type].name == NULL) return NULL;
    return &TRAITS[type];
}

size_t ek_row_bytes(int type, int64_t n) {
    const ek_type_traits *t = ek_type_get(type);
    if (!t || n % t->blck) return 0;
    return (size_t)(n / t->blck) * t->block_bytes;
}

size_t ek_act_row_bytes(int type, int n) {
    const ek_type_traits *t = ek_type_get(type);
    if (!t) return 0;
    return t->act_is_q8 ? (size_t)(n / QK) * sizeof(block_q8a) : (size_t)n * sizeof(float);
}

void ek_quantize_act_row(int type, const float *x, void *y, int n) {
    const ek_type_traits *t = ek_type_get(type);
    if (t->act_is_q8)
        ek_quantize_row_q8a(x, (block_q8a *)y, n);
    else
        memcpy(y, x, (size_t)n * sizeof(float));
}
