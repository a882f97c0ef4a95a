/* NEON key scores and value sums of the fused attention (kv_attention_neon.h says what each computes
 * and how it rounds). Plain armv8-a NEON (Pi 3/4); `sdot` where the build has dotprod (Pi 5). */
#include "kv_attention_neon.h"

#if defined(EK_NEON_KV)

#include <math.h>
#include <string.h>

#include "kv_attention.h"
#include "kv_types.h"

/* CALL(G) with G = gs as a compile-time constant (1..8; the callers check gs <= QI_MAX_GS) */
#define NEON_DISPATCH_GS(gs, CALL)                                                                                   \
    switch (gs) {                                                                                                    \
    case 1: CALL(1); break;                                                                                          \
    case 2: CALL(2); break;                                                                                          \
    case 3: CALL(3); break;                                                                                          \
    case 4: CALL(4); break;                                                                                          \
    case 5: CALL(5); break;                                                                                          \
    case 6: CALL(6); break;                                                                                          \
    case 7: CALL(7); break;                                                                                          \
    default: CALL(8); break;                                                                                         \
    }

int ek_neon_keys_ok(int hd, int gs) { return gs >= 1 && gs <= QI_MAX_GS && hd > 0 && hd % 8 == 0; }
int ek_neon_values_ok(int hd, int gs) { return gs >= 1 && gs <= QI_MAX_GS && hd > 0 && hd % 8 == 0; }

int ek_neon_query_prepare(ek_neon_query *qn, const float *q, int gs, int hd, int g, int int8) {
    qn->q = q;
    if (!int8) return 0;
    if (gs > QI_MAX_GS || hd > 64 * QI_MAX_UNITS || hd % 64 || g < 32 || hd % g) return -1;
    for (int h = 0; h < gs; h++) {
        const float *qh = q + (size_t)h * hd;
        float32x4_t mx = vdupq_n_f32(0.0f);
        for (int i = 0; i < hd; i += 4) mx = vmaxq_f32(mx, vabsq_f32(vld1q_f32(qh + i))); /* NaN propagates */
        const float amax = vmaxvq_f32(mx);
        if (!(amax <= 3.4e38f)) return -1; /* NaN or inf */
        /* ek_attn_query_i8's rule: q * (127 / amax), rounded to nearest even */
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        qn->scale[h] = amax > 0.0f ? amax / 127.0f : 0.0f;
        for (int i = 0; i < hd; i += 8) {
            const int32x4_t a = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(qh + i), id));
            const int32x4_t b = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(qh + i + 4), id));
            vst1_s8(qn->q8[h] + i, vmovn_s16(vcombine_s16(vmovn_s32(a), vmovn_s32(b))));
        }
        for (int k = 0; k < hd / g; k++) {
            int32_t s = 0;
            for (int i = k * g; i < (k + 1) * g; i++) s += qn->q8[h][i];
            qn->qsum[h][k] = (float)s;
        }
    }
    return 0;
}

/* ---- unpacking (the layouts of kv_quant.h) ------------------------------------------------------ */

/* Codes of chunk c (values 32c .. 32c+31) of a record at `bits` in value order: lo = the chunk's
 * codes 0-15, hi = 16-31. */
EK_INLINE void chunk_codes(const uint8_t *r, int c, uint8x16_t *lo, uint8x16_t *hi, const int bits) {
    if (bits == 8) {
        *lo = vld1q_u8(r + 32 * c);
        *hi = vld1q_u8(r + 32 * c + 16);
        return;
    }
    if (bits == 4 || bits == 6) { /* byte j: code j | code j+16 << 4 (6-bit: their low 4 bits) */
        const uint8x16_t t = vld1q_u8(r + (bits == 4 ? 16 : 24) * c);
        *lo = vandq_u8(t, vdupq_n_u8(0x0f));
        *hi = vshrq_n_u8(t, 4);
        if (bits == 6) { /* bits 4-5 in the 2-bit layout: byte j holds codes j, j+8, j+16, j+24 */
            const uint8x8_t h = vld1_u8(r + 24 * c + 16), k3 = vdup_n_u8(3);
            *lo = vorrq_u8(*lo, vshlq_n_u8(vcombine_u8(vand_u8(h, k3), vand_u8(vshr_n_u8(h, 2), k3)), 4));
            *hi = vorrq_u8(*hi, vshlq_n_u8(vcombine_u8(vand_u8(vshr_n_u8(h, 4), k3), vshr_n_u8(h, 6)), 4));
        }
        return;
    }
    /* 2-bit, or the low 2 bits of a 3-bit chunk (its first 8 of 12 bytes) */
    const uint8x8_t t = vld1_u8(r + (bits == 3 ? 12 : 8) * c), k3 = vdup_n_u8(3);
    *lo = vcombine_u8(vand_u8(t, k3), vand_u8(vshr_n_u8(t, 2), k3));
    *hi = vcombine_u8(vand_u8(vshr_n_u8(t, 4), k3), vshr_n_u8(t, 6));
    if (bits == 3) { /* + 4 where the chunk's 32-bit mask (bit j: code j's bit 2) is set */
        static const uint8_t sel[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
        static const uint8_t bit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
        uint32_t m;
        memcpy(&m, r + 12 * c + 8, sizeof m);
        const uint8x16_t mb = vreinterpretq_u8_u32(vdupq_n_u32(m)), b = vld1q_u8(bit), four = vdupq_n_u8(4);
        *lo = vorrq_u8(*lo, vandq_u8(vtstq_u8(vqtbl1q_u8(mb, vld1q_u8(sel)), b), four));
        *hi = vorrq_u8(*hi, vandq_u8(vtstq_u8(vqtbl1q_u8(mb, vld1q_u8(sel + 16)), b), four));
    }
}

/* Codes 4b .. 4b+3 (b < 8, a constant) of a chunk unpacked by chunk_codes, as floats. */
EK_INLINE float32x4_t codes_f32(uint8x16_t lo, uint8x16_t hi, const int b) {
    const uint8x16_t x = b < 4 ? lo : hi;
    const uint16x8_t w = (b & 2) ? vmovl_high_u8(x) : vmovl_u8(vget_low_u8(x));
    return vcvtq_f32_u32((b & 1) ? vmovl_high_u16(w) : vmovl_u16(vget_low_u16(w)));
}

EK_INLINE float32x4_t f16x4(const uint8_t *p) { return vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p))); }

/* ---- key scores ---------------------------------------------------------------------------------- */

/* acc + the dot products of a chunk's 32 codes with 32 int8 query values, 4 int32 lanes */
EK_INLINE int32x4_t dot_chunk(int32x4_t acc, uint8x16_t lo, uint8x16_t hi, const int8_t *q) {
    const int8x16_t qa = vld1q_s8(q), qb = vld1q_s8(q + 16);
    const int8x16_t a = vreinterpretq_s8_u8(lo), b = vreinterpretq_s8_u8(hi); /* codes <= 63 */
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(vdotq_s32(acc, a, qa), b, qb);
#else
    int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(qa));
    p = vmlal_high_s8(p, a, qa);
    p = vmlal_s8(p, vget_low_s8(b), vget_low_s8(qb));
    p = vmlal_high_s8(p, b, qb); /* four products per lane: |p| <= 4 * 63 * 127 = 32004 */
    return vpadalq_s16(acc, p);
#endif
}

/* Keys scored against the int8 query: score = s * (sum_k d_k * (q8 . u)_k + sum_k m_k * qsum_k),
 * the integer part exact. */
EK_INLINE void score_int8_g(const ek_neon_query *qn, const uint8_t *base, size_t stride, int n, int hd, int g,
                            float *sc, const int G, const int bits) {
    const int nc = hd / 32, ng = hd / g, cpg = g / 32;
    if (ng == 1) { /* integer sums per record; the float epilogue 4 records at a time, in the AVX2 order */
        int32_t isum[QI_MAX_GS][ATTN_CHUNK] __attribute__((aligned(16)));
        float dv[ATTN_CHUNK] __attribute__((aligned(16))), mv[ATTN_CHUNK] __attribute__((aligned(16)));
        for (int j = 0; j < n; j++) {
            const uint8_t *r = base + (size_t)j * stride;
            const ek_fp16 *dm = (const ek_fp16 *)(r + (size_t)hd * bits / 8);
            dv[j] = ek_h2f(dm[0]);
            mv[j] = ek_h2f(dm[1]);
            int32x4_t acc[QI_MAX_GS];
            for (int h = 0; h < G; h++) acc[h] = vdupq_n_s32(0);
            for (int c = 0; c < nc; c++) {
                uint8x16_t lo, hi;
                chunk_codes(r, c, &lo, &hi, bits);
                for (int h = 0; h < G; h++) acc[h] = dot_chunk(acc[h], lo, hi, qn->q8[h] + 32 * c);
            }
            for (int h = 0; h < G; h++) isum[h][j] = vaddvq_s32(acc[h]);
        }
        const int n4 = (n + 3) & ~3; /* a partial tile's last lanes are zeros (and their scores unused) */
        for (int j = n; j < n4; j++) {
            dv[j] = mv[j] = 0.0f;
            for (int h = 0; h < G; h++) isum[h][j] = 0;
        }
        for (int h = 0; h < G; h++) {
            const float32x4_t qs = vdupq_n_f32(qn->qsum[h][0]);
            float *out = sc + (size_t)h * ATTN_CHUNK;
            for (int j = 0; j < n4; j += 4) {
                const float32x4_t i4 = vcvtq_f32_s32(vld1q_s32(isum[h] + j));
                const float32x4_t s4 = vfmaq_f32(vmulq_f32(vld1q_f32(mv + j), qs), i4, vld1q_f32(dv + j));
                vst1q_f32(out + j, vmulq_n_f32(s4, qn->scale[h]));
            }
        }
        return;
    }
    for (int j = 0; j < n; j++) { /* several groups: each group's integer sum scaled in float */
        const uint8_t *r = base + (size_t)j * stride;
        const ek_fp16 *dm = (const ek_fp16 *)(r + (size_t)hd * bits / 8);
        float32x4_t facc[QI_MAX_GS];
        for (int h = 0; h < G; h++) facc[h] = vdupq_n_f32(0.0f);
        for (int k = 0; k < ng; k++) {
            int32x4_t acc[QI_MAX_GS];
            for (int h = 0; h < G; h++) acc[h] = vdupq_n_s32(0);
            for (int c = k * cpg; c < (k + 1) * cpg; c++) {
                uint8x16_t lo, hi;
                chunk_codes(r, c, &lo, &hi, bits);
                for (int h = 0; h < G; h++) acc[h] = dot_chunk(acc[h], lo, hi, qn->q8[h] + 32 * c);
            }
            const float d = ek_h2f(dm[k]);
            for (int h = 0; h < G; h++) facc[h] = vfmaq_n_f32(facc[h], vcvtq_f32_s32(acc[h]), d);
        }
        for (int h = 0; h < G; h++) {
            float mt = 0.0f;
            for (int k = 0; k < ng; k++) mt += ek_h2f(dm[ng + k]) * qn->qsum[h][k];
            sc[(size_t)h * ATTN_CHUNK + j] = (vaddvq_f32(facc[h]) + mt) * qn->scale[h];
        }
    }
}

/* 16- and 8-bit keys against the float query: each 4 values read once (8-bit: dequantized as
 * fma(m, code, d)) for all heads, one accumulator per head in value order */
EK_INLINE void score_float_g(const ek_neon_query *qn, const uint8_t *base, size_t stride, int n, int hd, int g,
                             float *sc, const int G, const int bits) {
    const float *q = qn->q;
    for (int j = 0; j < n; j++) {
        const uint8_t *r = base + (size_t)j * stride;
        float32x4_t acc[QI_MAX_GS];
        for (int h = 0; h < G; h++) acc[h] = vdupq_n_f32(0.0f);
        if (bits == 16) {
            for (int i = 0; i < hd; i += 4) {
                const float32x4_t y = f16x4(r + 2 * i);
                for (int h = 0; h < G; h++) acc[h] = vfmaq_f32(acc[h], y, vld1q_f32(q + (size_t)h * hd + i));
            }
        } else {
            const ek_fp16 *dm = (const ek_fp16 *)(r + (size_t)hd * bits / 8);
            const int ng = hd / g;
            for (int c = 0; c < hd / 32; c++) {
                const float32x4_t d = vdupq_n_f32(ek_h2f(dm[32 * c / g])), m = vdupq_n_f32(ek_h2f(dm[ng + 32 * c / g]));
                uint8x16_t lo, hi;
                chunk_codes(r, c, &lo, &hi, bits);
#define KEY_BLOCK(B)                                                                                                 \
    {                                                                                                                \
        const float32x4_t y = vfmaq_f32(m, codes_f32(lo, hi, B), d);                                                 \
        for (int h = 0; h < G; h++) acc[h] = vfmaq_f32(acc[h], y, vld1q_f32(q + (size_t)h * hd + 32 * c + 4 * (B)));  \
    }
                KEY_BLOCK(0) KEY_BLOCK(1) KEY_BLOCK(2) KEY_BLOCK(3) KEY_BLOCK(4) KEY_BLOCK(5) KEY_BLOCK(6) KEY_BLOCK(7)
#undef KEY_BLOCK
            }
        }
        for (int h = 0; h < G; h++) sc[(size_t)h * ATTN_CHUNK + j] = vaddvq_f32(acc[h]);
    }
}

/* ---- value sums ---------------------------------------------------------------------------------- */

/* o[h][4*B0 .. 4*(B0+CB)) of chunk c += sum_j w[h][j] * value j: G * CB accumulators (<= 16) that start
 * from o; each record's CB blocks of 4 values dequantized once for all heads */
EK_INLINE void values_block(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, float *o,
                            int c, const int B0, const int G, const int CB, const int bits) {
    float32x4_t acc[QI_MAX_GS][8];
    for (int h = 0; h < G; h++)
        for (int b = 0; b < CB; b++) acc[h][b] = vld1q_f32(o + (size_t)h * hd + 32 * c + 4 * (B0 + b));
    const int ng = hd / g, k = 32 * c / g;
    for (int j = 0; j < n; j++) {
        const uint8_t *r = base + (size_t)j * stride;
        float32x4_t y[8];
        if (bits == 16) {
            for (int b = 0; b < CB; b++) y[b] = f16x4(r + 2 * (32 * c + 4 * (B0 + b)));
        } else {
            const ek_fp16 *dm = (const ek_fp16 *)(r + (size_t)hd * bits / 8);
            const float32x4_t d = vdupq_n_f32(ek_h2f(dm[k])), m = vdupq_n_f32(ek_h2f(dm[ng + k]));
            uint8x16_t lo, hi;
            chunk_codes(r, c, &lo, &hi, bits);
            for (int b = 0; b < CB; b++) y[b] = vfmaq_f32(m, codes_f32(lo, hi, B0 + b), d);
        }
        for (int h = 0; h < G; h++) {
            const float wj = w[(size_t)h * ATTN_CHUNK + j];
            for (int b = 0; b < CB; b++) acc[h][b] = vfmaq_n_f32(acc[h][b], y[b], wj);
        }
    }
    for (int h = 0; h < G; h++)
        for (int b = 0; b < CB; b++) vst1q_f32(o + (size_t)h * hd + 32 * c + 4 * (B0 + b), acc[h][b]);
}

/* CB blocks of 4 per pass: all 8 of a chunk for 1-2 heads, 4 for 3-4, 2 for 5-8 */
#define NEON_CB(G) ((G) <= 2 ? 8 : (G) <= 4 ? 4 : 2)

EK_INLINE void values_g(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, float *o, const int G,
                        const int bits) {
    const int CB = NEON_CB(G);
    if (bits == 16 && hd % 32) { /* 16-bit heads of 8, 16 or 24 values (tiny models): blocks of 8 */
        for (int i = 0; i < hd; i += 8) values_block(base + 2 * i, stride, n, hd, hd, w, o + i, 0, 0, G, 2, 16);
        return;
    }
    for (int c = 0; c < hd / 32; c++)
        for (int b0 = 0; b0 < 8; b0 += CB) {
            /* b0 as a constant, so codes_f32 picks its lanes at compile time */
            if (b0 == 0) values_block(base, stride, n, hd, g, w, o, c, 0, G, CB, bits);
            else if (b0 == 2) values_block(base, stride, n, hd, g, w, o, c, 2, G, CB, bits);
            else if (b0 == 4) values_block(base, stride, n, hd, g, w, o, c, 4, G, CB, bits);
            else values_block(base, stride, n, hd, g, w, o, c, 6, G, CB, bits);
        }
}

/* ---- the kernels the rows name (kv_types.c) ------------------------------------------------------ */
#define SCORE_INT8(G) score_int8_g(qn, base, stride, n, hd, g, sc, G, BITS)
#define SCORE_FLOAT(G) score_float_g(qn, base, stride, n, hd, g, sc, G, BITS)
#define VALUES(G) values_g(base, stride, n, hd, g, w, o, G, BITS)
#define NEON_KERNELS(P, B, SCORE)                                                                                    \
    void ek_kv_score_##P##_neon(const ek_neon_query *qn, const uint8_t *base, size_t stride, int n, int hd, int g,    \
                                int gs, float *sc) {                                                                 \
        enum { BITS = B };                                                                                           \
        NEON_DISPATCH_GS(gs, SCORE)                                                                                  \
    }                                                                                                                \
    void ek_kv_values_##P##_neon(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs,    \
                                 float *o) {                                                                         \
        enum { BITS = B };                                                                                           \
        NEON_DISPATCH_GS(gs, VALUES)                                                                                 \
    }
NEON_KERNELS(f16, 16, SCORE_FLOAT)
NEON_KERNELS(q8, 8, SCORE_FLOAT)
NEON_KERNELS(q6, 6, SCORE_INT8)
NEON_KERNELS(q4, 4, SCORE_INT8)
NEON_KERNELS(q3, 3, SCORE_INT8)
NEON_KERNELS(q2, 2, SCORE_INT8)

#endif
