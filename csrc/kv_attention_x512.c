#include "kv_attention_x512.h"

#if defined(EK_AVX512)
#include <math.h>
#include <string.h>

#include "kv_attention.h"
#include "kv_types.h"
#include "quant.h"

/* acc += products summed in pairs (int16 x int16) / in fours (u8 x s8). Inline asm: with the
 * intrinsics GCC 12 copies every accumulator around each instruction in loops (docs/decisions.md). */
EK_INLINE __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
    return acc;
}
EK_INLINE __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "vm"(s8));
    return acc;
}
/* acc += u8 x (4 int8 at s8, broadcast to every lane): the broadcast rides in the instruction */
EK_INLINE __m512i dpbusd_bcast(__m512i acc, __m512i u8, const int32_t *s8) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*s8));
    return acc;
}
#define X512_MAX_GS 8
/* whole 16-record vectors per tile; int32 sums of a tile's codes x 15-bit weights cannot overflow:
 * ATTN_CHUNK * 255 * 32767 < 2^31 */
_Static_assert(ATTN_CHUNK % 16 == 0 && ATTN_CHUNK <= 256, "ATTN_CHUNK: a multiple of 16, at most 256");
#ifndef EK_PF_RECORDS
#define EK_PF_RECORDS 64 /* records ahead (64 beat 32 and 128: docs/decisions.md) */
#endif
#define X512_MAX_GROUPS 8 /* head_dim / group: head_dim <= 256, group >= 32 */

/* 16 records' (scale, minimum) fp16 pairs, one per int32 lane (scale in the low half), as floats */
EK_INLINE void fp16_pairs_to_ps(__m512i v, __m512 *d, __m512 *m) {
    *d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
    *m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
}

/* ---- value order -------------------------------------------------------------------------
 * A unit is 64 values (two 32-value chunks of the record format, see kv_quant.h). The codes of a
 * group of records of a unit become four registers x[a] of 16 int32 lanes, lane t holding each
 * record's code of one value: 8-bit values two records as int16 (for vpdpwssd), 4-, 3- and 2-bit
 * values four records as bytes (for vpdpbusd). One byte permute (vpermt2b / vpermb) gathers the same
 * byte of every record into a lane; nibbles or bit pairs are then taken out with a shift and a mask:
 *   8-bit: x[a] lane t = byte 16a + t                                  -> value 16a + t
 *   4-bit: x[0|1] = bytes 0-15 low | high nibble, x[2|3] = bytes 16-31 -> value 16a + t
 *   2-bit: x[s] = byte t, bits 2s..2s+1 (byte t: chunk t/8, byte t%8)   -> value 32(t/8) + t%8 + 8s */
/*   3-bit: as 2-bit (the codes' low bits), bit 2 added from the record's masks (unit_quad)    */
static int acc_dword_dim(int bits, int a, int t) { return bits <= 3 ? 32 * (t / 8) + t % 8 + 8 * a : 16 * a + t; }

/* dwords of accumulator a whose value lies in the unit's second chunk (acc_dword_dim(bits, a, t) >= 32
 * exactly for the set bits t; a wrong mask would scale by the wrong group, which the attention tests
 * with groups of 32 catch) */
EK_INLINE __mmask16 second_chunk_mask(int a, const int bits) {
    if (bits <= 3) return 0xFF00;
    return a >= 2 ? 0xFFFF : 0;
}

/* 8-bit pairs: lane t = [byte 16a + t of A, 0, the same byte of B, 0] (A: indexes < 64, B: 64 + ...) */
#define PB(p) (p), 0, (p) + 64, 0
#define PB4(p) PB(p), PB(p + 1), PB(p + 2), PB(p + 3)
#define PB16(p) PB4(p), PB4(p + 4), PB4(p + 8), PB4(p + 12)
static const uint8_t PERM_8[4][64] __attribute__((aligned(64))) = {{PB16(0)}, {PB16(16)}, {PB16(32)}, {PB16(48)}};
#undef PB16
#undef PB4
#undef PB
#define KEEP_LOW_BYTES 0x5555555555555555ULL /* bytes 0 and 2 of every lane; 1 and 3 are zero */
/* 4-bit quads: lane t = byte t (+ 16 for QUAD4[1]) of A, B (in [A | B]) and C, D (in [C | D]) */
#define Q4(t, o) (t) + (o), 32 + (t) + (o), 64 + (t) + (o), 96 + (t) + (o)
#define Q4x4(t, o) Q4(t, o), Q4(t + 1, o), Q4(t + 2, o), Q4(t + 3, o)
static const uint8_t QUAD4[2][64] __attribute__((aligned(64))) = {{Q4x4(0, 0), Q4x4(4, 0), Q4x4(8, 0), Q4x4(12, 0)},
                                                                 {Q4x4(0, 16), Q4x4(4, 16), Q4x4(8, 16), Q4x4(12, 16)}};
/* 2-bit quads: lane t = byte t of A, B, C, D in [A | B | C | D] (16 bytes each) */
#define Q2(t) (t), 16 + (t), 32 + (t), 48 + (t)
#define Q2x4(t) Q2(t), Q2(t + 1), Q2(t + 2), Q2(t + 3)
static const uint8_t QUAD2[64] __attribute__((aligned(64))) = {Q2x4(0), Q2x4(4), Q2x4(8), Q2x4(12)};
/* 3-bit units (two 12-byte chunks: 8 bytes of low bits in the 2-bit layout, then a 32-bit mask of
 * the codes' bit 2, bit i for value i of the chunk), loaded as A = unit bytes 0-15 and B = bytes 8-23
 * per record (16 bytes each, record R at 16R of [A0..A3] and of [B0..B3]). QUAD3: the 2-bit quads
 * from A (chunk 0's low bits) and B (chunk 1's, at B byte 4); QUAD3_HI[s]: lane t = mask byte s of
 * chunk t/8 (B byte s or 12 + s), whose bit t % 8 is bit 2 of value acc_dword_dim(3, s, t) */
#define Q3(t) Q3R(t, 0), Q3R(t, 1), Q3R(t, 2), Q3R(t, 3)
#define Q3R(t, R) ((t) < 8 ? 16 * (R) + (t) : 64 + 16 * (R) + 4 + (t) - 8)
#define Q3x4(t) Q3(t), Q3(t + 1), Q3(t + 2), Q3(t + 3)
static const uint8_t QUAD3[64] __attribute__((aligned(64))) = {Q3x4(0), Q3x4(4), Q3x4(8), Q3x4(12)};
#define H3R(t, R, s) (16 * (R) + ((t) < 8 ? 0 : 12) + (s))
#define H3(t, s) H3R(t, 0, s), H3R(t, 1, s), H3R(t, 2, s), H3R(t, 3, s)
#define H3x4(t, s) H3(t, s), H3(t + 1, s), H3(t + 2, s), H3(t + 3, s)
#define H3x16(s) H3x4(0, s), H3x4(4, s), H3x4(8, s), H3x4(12, s)
static const uint8_t QUAD3_HI[4][64] __attribute__((aligned(64))) = {{H3x16(0)}, {H3x16(1)}, {H3x16(2)}, {H3x16(3)}};
#define B3(t) 1 << ((t) % 8), 1 << ((t) % 8), 1 << ((t) % 8), 1 << ((t) % 8)
#define B3x4(t) B3(t), B3(t + 1), B3(t + 2), B3(t + 3)
static const uint8_t QUAD3_BIT[64] __attribute__((aligned(64))) = {B3x4(0), B3x4(4), B3x4(8), B3x4(12)};
#undef B3x4
#undef B3
#undef H3x16
#undef H3x4
#undef H3
#undef H3R
#undef Q3x4
#undef Q3R
#undef Q3
#undef Q2x4
#undef Q2
#undef Q4x4
#undef Q4

/* Weights: 8-bit values (step 1/255 of their range) keep 15-bit weights, two records per lane and
 * vpdpwssd; 4-, 3- and 2-bit values (steps of 1/15, 1/7, 1/3) take 8-bit weights, four records per lane and
 * vpdpbusd, half the multiply instructions (the bound on a weight's rounding, 1/510 of the tile's
 * largest w * d, stays under 1/30 of a 4-bit step times that weight). */
#define WEIGHT_RECS(bits) ((bits) == 8 ? 2 : 4)          /* records per int32 lane */
#define WEIGHT_MAX(bits) ((bits) == 8 ? 32767.0f : 255.0f) /* largest rounded weight */

int ek_x512_weight_max(int bits) { return (int)WEIGHT_MAX(bits); }

int ek_x512_values_shape_ok(int hd, int gs) { return hd % 64 == 0 && hd <= 256 && gs >= 1 && gs <= X512_MAX_GS; }

/* x[0..3] of unit u for records A, B, C, D (8-bit values: A, B only): lane t = the records' codes
 * of value acc_dword_dim(bits, a, t), as int16 (8-bit) or bytes */
EK_INLINE void unit_quad(const uint8_t *const *r, int u, __m512i x[4], const int bits) {
    if (bits == 8) {
        const __m512i a = _mm512_loadu_si512(r[0] + 64 * u), b = _mm512_loadu_si512(r[1] + 64 * u);
        for (int i = 0; i < 4; i++)
            x[i] = _mm512_maskz_permutex2var_epi8(KEEP_LOW_BYTES, a, _mm512_load_si512(PERM_8[i]), b);
    } else if (bits == 4) {
        const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(r[0] + 32 * u))),
                                              _mm256_loadu_si256((const __m256i *)(r[1] + 32 * u)), 1);
        const __m512i cd = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(r[2] + 32 * u))),
                                              _mm256_loadu_si256((const __m256i *)(r[3] + 32 * u)), 1);
        const __m512i lo = _mm512_permutex2var_epi8(ab, _mm512_load_si512(QUAD4[0]), cd);
        const __m512i hi = _mm512_permutex2var_epi8(ab, _mm512_load_si512(QUAD4[1]), cd);
        const __m512i k = _mm512_set1_epi8(15);
        x[0] = _mm512_and_si512(lo, k);
        x[1] = _mm512_and_si512(_mm512_srli_epi16(lo, 4), k);
        x[2] = _mm512_and_si512(hi, k);
        x[3] = _mm512_and_si512(_mm512_srli_epi16(hi, 4), k);
    } else if (bits == 3) {
        __m512i za = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(r[0] + 24 * u)));
        __m512i zb = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(r[0] + 24 * u + 8)));
        za = _mm512_inserti32x4(za, _mm_loadu_si128((const __m128i *)(r[1] + 24 * u)), 1);
        zb = _mm512_inserti32x4(zb, _mm_loadu_si128((const __m128i *)(r[1] + 24 * u + 8)), 1);
        za = _mm512_inserti32x4(za, _mm_loadu_si128((const __m128i *)(r[2] + 24 * u)), 2);
        zb = _mm512_inserti32x4(zb, _mm_loadu_si128((const __m128i *)(r[2] + 24 * u + 8)), 2);
        za = _mm512_inserti32x4(za, _mm_loadu_si128((const __m128i *)(r[3] + 24 * u)), 3);
        zb = _mm512_inserti32x4(zb, _mm_loadu_si128((const __m128i *)(r[3] + 24 * u + 8)), 3);
        const __m512i p = _mm512_permutex2var_epi8(za, _mm512_load_si512(QUAD3), zb);
        const __m512i k = _mm512_set1_epi8(3), four = _mm512_set1_epi8(4), bit = _mm512_load_si512(QUAD3_BIT);
        for (int s = 0; s < 4; s++) {
            const __m512i lo = _mm512_and_si512(s ? _mm512_srli_epi16(p, 2 * s) : p, k);
            const __mmask64 hi = _mm512_test_epi8_mask(_mm512_permutexvar_epi8(_mm512_load_si512(QUAD3_HI[s]), zb), bit);
            x[s] = _mm512_mask_add_epi8(lo, hi, lo, four);
        }
    } else {
        __m512i z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(r[0] + 16 * u)));
        z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(r[1] + 16 * u)), 1);
        z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(r[2] + 16 * u)), 2);
        z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(r[3] + 16 * u)), 3);
        const __m512i p = _mm512_permutexvar_epi8(_mm512_load_si512(QUAD2), z);
        const __m512i k = _mm512_set1_epi8(3);
        x[0] = _mm512_and_si512(p, k);
        x[1] = _mm512_and_si512(_mm512_srli_epi16(p, 2), k);
        x[2] = _mm512_and_si512(_mm512_srli_epi16(p, 4), k);
        x[3] = _mm512_and_si512(_mm512_srli_epi16(p, 6), k);
    }
}

/* acc += x * w (per lane: the records' codes times their weights) */
EK_INLINE __m512i dp_weights(__m512i acc, __m512i x, __m512i w, const int bits) {
    return bits == 8 ? dpwssd(acc, x, w) : dpbusd(acc, w, x);
}

/* Records r[0..R-1] (R = WEIGHT_RECS) of unit u, the first at slot j, into the accumulators of heads
 * h0 .. h0+HB-1; qw rows are (head, group) of ATTN_CHUNK weights, 2 bytes each for 8-bit values, 1
 * for 4-, 3- and 2-bit */
EK_INLINE void accum_group(const uint8_t *const *r, int u, int j, int k0, int k1, const uint8_t *qw, int h0,
                           __m512i acc[][4], const int HB, const int bits) {
    const size_t wb = bits == 8 ? 2 : 1; /* bytes per weight */
    __m512i x[4];
    unit_quad(r, u, x, bits);
    for (int h = 0; h < HB; h++) {
        /* the group's weights as one int32 */
        const uint8_t *qh = qw + (size_t)(h0 + h) * X512_MAX_GROUPS * ATTN_CHUNK * wb;
        int32_t p0, p1;
        memcpy(&p0, qh + (k0 * ATTN_CHUNK + j) * wb, 4);
        const __m512i w0 = _mm512_set1_epi32(p0);
        if (k0 == k1) {
            for (int a = 0; a < 4; a++) acc[h][a] = dp_weights(acc[h][a], x[a], w0, bits);
        } else {
            memcpy(&p1, qh + (k1 * ATTN_CHUNK + j) * wb, 4);
            const __m512i w1 = _mm512_set1_epi32(p1);
            if (bits > 3) { /* a chunk per register pair */
                acc[h][0] = dp_weights(acc[h][0], x[0], w0, bits);
                acc[h][1] = dp_weights(acc[h][1], x[1], w0, bits);
                acc[h][2] = dp_weights(acc[h][2], x[2], w1, bits);
                acc[h][3] = dp_weights(acc[h][3], x[3], w1, bits);
            } else {
                const __m512i w = _mm512_mask_blend_epi32(second_chunk_mask(0, bits), w0, w1);
                for (int a = 0; a < 4; a++) acc[h][a] = dp_weights(acc[h][a], x[a], w, bits);
            }
        }
    }
}

/* Heads h0 .. h0+HB-1 of unit u: integer sums over the tile, then o_perm += scale * sum + msum. */
EK_INLINE void accum_unit(const uint8_t *base, size_t stride, int n, int u, int k0, int k1, const uint8_t *qw,
                          const float *scale, const float *msum, float *o_perm, int hd, int h0, const int HB,
                          const int bits) {
    enum { R_MAX = 4 };
    const int R = WEIGHT_RECS(bits);
    __m512i acc[4][4];
    for (int h = 0; h < HB; h++)
        for (int a = 0; a < 4; a++) acc[h][a] = _mm512_setzero_si512();
    const uint8_t *r[R_MAX];
    int j = 0;
    for (; j + R <= n; j += R) {
        for (int i = 0; i < R; i++) r[i] = base + (size_t)(j + i) * stride;
        accum_group(r, u, j, k0, k1, qw, h0, acc, HB, bits);
    }
    if (j < n) { /* a short tail repeats its last record, at weight 0 */
        for (int i = 0; i < R; i++) r[i] = base + (size_t)(j + i < n ? j + i : n - 1) * stride;
        accum_group(r, u, j, k0, k1, qw, h0, acc, HB, bits);
    }
    for (int h = 0; h < HB; h++) {
        const int hh = h0 + h;
        const float *sc = scale + hh * X512_MAX_GROUPS, *ms = msum + hh * X512_MAX_GROUPS;
        for (int a = 0; a < 4; a++) {
            const __mmask16 m = second_chunk_mask(a, bits);
            const __m512 sv = _mm512_mask_blend_ps(m, _mm512_set1_ps(sc[k0]), _mm512_set1_ps(sc[k1]));
            const __m512 mv = _mm512_mask_blend_ps(m, _mm512_set1_ps(ms[k0]), _mm512_set1_ps(ms[k1]));
            float *op = o_perm + (size_t)hh * hd + 64 * u + 16 * a;
            const __m512 add = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[h][a]), sv, mv);
            _mm512_storeu_ps(op, _mm512_add_ps(_mm512_loadu_ps(op), add));
        }
    }
}

EK_INLINE void accum_bits(const uint8_t *base, size_t stride, int n, int hd, int g, const uint8_t *qw,
                          const float *scale, const float *msum, int gs, float *o_perm, const int bits) {
    for (int u = 0; u < hd / 64; u++) {
        const int k0 = 64 * u / g, k1 = (64 * u + 32) / g;
        for (int h0 = 0; h0 < gs; h0 += 4) {
            const int hb = gs - h0 < 4 ? gs - h0 : 4;
            switch (hb) {
            case 1: accum_unit(base, stride, n, u, k0, k1, qw, scale, msum, o_perm, hd, h0, 1, bits); break;
            case 2: accum_unit(base, stride, n, u, k0, k1, qw, scale, msum, o_perm, hd, h0, 2, bits); break;
            case 3: accum_unit(base, stride, n, u, k0, k1, qw, scale, msum, o_perm, hd, h0, 3, bits); break;
            default: accum_unit(base, stride, n, u, k0, k1, qw, scale, msum, o_perm, hd, h0, 4, bits); break;
            }
        }
    }
}

/* Scale d and minimum m of group k of records 0 .. n-1 into d[k][j], m[k][j], zero for j >= n (so
 * padding records weigh nothing). The fp16 pairs of one or two groups are gathered as one integer per
 * record and converted 16 records at a time. */
static void load_scales(const uint8_t *base, size_t stride, int n, size_t code_bytes, int ng,
                        float d[][ATTN_CHUNK], float m[][ATTN_CHUNK]) {
    if (ng == 1) {
        uint32_t dm[ATTN_CHUNK] = {0};
        for (int j = 0; j < n; j++) memcpy(&dm[j], base + (size_t)j * stride + code_bytes, 4);
        for (int j = 0; j < ATTN_CHUNK; j += 16) {
            __m512 dj, mj;
            fp16_pairs_to_ps(_mm512_loadu_si512(dm + j), &dj, &mj);
            _mm512_store_ps(&d[0][j], dj);
            _mm512_store_ps(&m[0][j], mj);
        }
        return;
    }
    if (ng == 2) { /* d0 d1 m0 m1 */
        uint64_t dm[ATTN_CHUNK] = {0};
        for (int j = 0; j < n; j++) memcpy(&dm[j], base + (size_t)j * stride + code_bytes, 8);
        for (int j = 0; j < ATTN_CHUNK; j += 16) {
            const __m512i a = _mm512_loadu_si512(dm + j), b = _mm512_loadu_si512(dm + j + 8);
            for (int f = 0; f < 4; f++) {
                const __m256i h = _mm256_set_m128i(_mm512_cvtepi64_epi16(_mm512_srli_epi64(b, 16 * f)),
                                                   _mm512_cvtepi64_epi16(_mm512_srli_epi64(a, 16 * f)));
                _mm512_store_ps(f < 2 ? &d[f][j] : &m[f - 2][j], _mm512_cvtph_ps(h));
            }
        }
        return;
    }
    for (int j = 0; j < n; j++) {
        const ek_fp16 *dm = (const ek_fp16 *)(base + (size_t)j * stride + code_bytes);
        for (int k = 0; k < ng; k++) {
            d[k][j] = ek_h2f(dm[k]);
            m[k][j] = ek_h2f(dm[ng + k]);
        }
    }
    for (int k = 0; k < ng; k++)
        for (int j = n; j < ATTN_CHUNK; j++) d[k][j] = m[k][j] = 0.0f;
}

EK_INLINE int values_accum(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs,
                           float *o_perm, const int bits) {
    const int ng = hd / g;
    float dv[X512_MAX_GROUPS][ATTN_CHUNK] __attribute__((aligned(64)));
    float mv[X512_MAX_GROUPS][ATTN_CHUNK] __attribute__((aligned(64)));
    /* weights: finite and <= 1 (exp of score - running max) unless a score was NaN or inf; the
     * store's scales and minimums are always finite */
    enum { NV = ATTN_CHUNK / 16 };
    __mmask16 live[NV];
    for (int v = 0; v < NV; v++) live[v] = n >= 16 * (v + 1) ? 0xFFFF : n <= 16 * v ? 0 : (__mmask16)((1u << (n - 16 * v)) - 1);
    __mmask16 bad = 0;
    load_scales(base, stride, n, (size_t)hd * bits / 8, ng, dv, mv);
    /* weights rounded per (head, group) against the tile's largest w * d (WEIGHT_MAX). The rounding
     * error is taken about the codes' midpoint c: the integer sum covers sum qw * u, and
     * msum = sum w * m + c * (sum w * d - scale * sum qw) makes the total
     * scale * sum qw * (u - c) + sum w * (m + c * d), so a weight's error multiplies |u - c| <= c */
    uint8_t qw[X512_MAX_GS * X512_MAX_GROUPS * ATTN_CHUNK * 2] __attribute__((aligned(64)));
    const float wmax = WEIGHT_MAX(bits), mid = (float)(1 << (bits - 1));
    float scale[X512_MAX_GS * X512_MAX_GROUPS], msum[X512_MAX_GS * X512_MAX_GROUPS];
    for (int h = 0; h < gs; h++) {
        __m512 wv[NV];
        for (int v = 0; v < NV; v++) {
            wv[v] = _mm512_maskz_loadu_ps(live[v], w + (size_t)h * ATTN_CHUNK + 16 * v);
            bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(wv[v]), _mm512_set1_ps(2.0f), _CMP_NLT_UQ);
        }
        for (int k = 0; k < ng; k++) {
            __m512 wd[NV], top = _mm512_setzero_ps(), ms = _mm512_setzero_ps();
            const __m512 vmid = _mm512_set1_ps(mid);
            for (int v = 0; v < NV; v++) {
                const __m512 d = _mm512_load_ps(&dv[k][16 * v]);
                wd[v] = _mm512_mul_ps(wv[v], d);
                top = _mm512_max_ps(top, wd[v]);
                ms = _mm512_fmadd_ps(wv[v], _mm512_fmadd_ps(vmid, d, _mm512_load_ps(&mv[k][16 * v])), ms);
            }
            const float t = _mm512_reduce_max_ps(top);
            const int idx = h * X512_MAX_GROUPS + k;
            const __m512 inv = _mm512_set1_ps(t > 0.0f ? wmax / t : 0.0f);
            scale[idx] = t / wmax;
            __m512i qsum = _mm512_setzero_si512();
            for (int v = 0; v < NV; v++) {
                const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(wd[v], inv));
                qsum = _mm512_add_epi32(qsum, qi);
                if (bits == 8)
                    _mm256_store_si256((__m256i *)(qw + ((size_t)idx * ATTN_CHUNK + 16 * v) * 2), _mm512_cvtepi32_epi16(qi));
                else
                    _mm_store_si128((__m128i *)(qw + (size_t)idx * ATTN_CHUNK + 16 * v), _mm512_cvtepi32_epi8(qi));
            }
            msum[idx] = _mm512_reduce_add_ps(ms) - mid * scale[idx] * (float)_mm512_reduce_add_epi32(qsum);
        }
    }
    if (bad) return -1; /* nothing written yet: the float path handles (and propagates) it */
    accum_bits(base, stride, n, hd, g, qw, scale, msum, gs, o_perm, bits);
    return 0;
}

/* The value-sum kernels the table's rows name (kv_types.c). */
int ek_x512_values_q8(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o_perm) {
    return values_accum(base, stride, n, hd, g, w, gs, o_perm, 8);
}
int ek_x512_values_q4(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o_perm) {
    return values_accum(base, stride, n, hd, g, w, gs, o_perm, 4);
}
int ek_x512_values_q2(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o_perm) {
    return values_accum(base, stride, n, hd, g, w, gs, o_perm, 2);
}
int ek_x512_values_q3(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o_perm) {
    return values_accum(base, stride, n, hd, g, w, gs, o_perm, 3);
}

/* ---- key scores ---------------------------------------------------------------------------- */

/* Scores by transposition: the code bytes of 16 records are transposed so that int32 lane r of
 * register i holds 4-byte group i of record r; one vpdpbusd against a broadcast group of 4 query
 * values then advances all 16 records, and the sums come out one record per lane (no horizontal
 * reductions). The transposes run on vpermt2d: each level swaps one bit of the register index
 * with one bit of the lane index, pairing registers that differ in that bit. */

/* LEVEL_INDEX[t][b][q]: lane q of output b of a level that swaps register bit t with lane bit t:
 * ((q >> t) & 1 ? 16 : 0) + (q with bit t set to b) */
#define LI(t, b, q) ((((q) >> (t)) & 1 ? 16 : 0) + (((q) & ~(1 << (t))) | ((b) << (t))))
#define LI16(t, b)                                                                                         \
    {LI(t, b, 0), LI(t, b, 1), LI(t, b, 2),  LI(t, b, 3),  LI(t, b, 4),  LI(t, b, 5),  LI(t, b, 6),  LI(t, b, 7), \
     LI(t, b, 8), LI(t, b, 9), LI(t, b, 10), LI(t, b, 11), LI(t, b, 12), LI(t, b, 13), LI(t, b, 14), LI(t, b, 15)}
static const int32_t LEVEL_INDEX[3][2][16] __attribute__((aligned(64))) = {
    {LI16(0, 0), LI16(0, 1)}, {LI16(1, 0), LI16(1, 1)}, {LI16(2, 0), LI16(2, 1)}};
#undef LI16
#undef LI

/* levels 0 .. LEVELS-1 over registers t[0 .. 2^LEVELS - 1] */
EK_INLINE void transpose_levels(__m512i *t, const int LEVELS) {
    for (int lv = 0; lv < LEVELS; lv++) {
        const __m512i i0 = _mm512_load_si512(LEVEL_INDEX[lv][0]), i1 = _mm512_load_si512(LEVEL_INDEX[lv][1]);
        for (int r0 = 0; r0 < 1 << LEVELS; r0++) {
            if (r0 & (1 << lv)) continue;
            const int r1 = r0 | (1 << lv);
            const __m512i a = t[r0], b = t[r1];
            t[r0] = _mm512_permutex2var_epi32(a, i0, b);
            t[r1] = _mm512_permutex2var_epi32(a, i1, b);
        }
    }
}

/* 16 records' unit u (32 bytes of 4-bit codes: 8 groups of 4 bytes) -> t[i] = group i of records 0-15.
 * Register k starts as [record k | record k+8], so after the three levels lane r is record r. */
EK_INLINE void transpose_4bit(const uint8_t *const *rp, int u, __m512i t[8]) {
    for (int k = 0; k < 8; k++)
        t[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(rp[k] + 32 * u))),
                                  _mm256_loadu_si256((const __m256i *)(rp[k + 8] + 32 * u)), 1);
    transpose_levels(t, 3);
}

/* 16 records' unit u (16 bytes of 2-bit codes: 4 groups) -> t[i] = group i of records 0-15;
 * register k starts as [record k | k+4 | k+8 | k+12]. */
EK_INLINE void transpose_2bit(const uint8_t *const *rp, int u, __m512i t[4]) {
    for (int k = 0; k < 4; k++) {
        __m512i z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rp[k] + 16 * u)));
        z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(rp[k + 4] + 16 * u)), 1);
        z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(rp[k + 8] + 16 * u)), 2);
        t[k] = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(rp[k + 12] + 16 * u)), 3);
    }
    transpose_levels(t, 2);
}

/* Query dword d of unit u (int8 x 4) in the order the transposed codes come: nibble order (4-bit): d < 8 the low
 * nibbles of code group d, d >= 8 the high nibbles of group d - 8 (group i: bytes 4i..4i+3, chunk
 * i/4, low nibble of byte j = value 32c + j, high = + 16); crumb order (2-bit): d = 4s + i for shift 2s of group i
 * (bytes 4i..4i+3, chunk i/2, byte j = values 32c + j + 8s). */
static int query_dword_value(int qorder, int d, int b) {
    if (qorder == EK_QORDER_NIBBLE) {
        const int i = d % 8, c = i / 4, j = 4 * (i % 4) + b;
        return 32 * c + j + (d >= 8 ? 16 : 0);
    }
    const int s = d / 4, i = d % 4, c = i / 2, j = 4 * (i % 2) + b;
    return 32 * c + j + 8 * s;
}

int ek_x512_keys_shape_ok(int hd, int g, int gs) {
    return g == hd && hd % 64 == 0 && hd <= 64 * QI_MAX_UNITS && gs >= 1 &&
           gs <= QI_MAX_GS;
}

void ek_x512_prefetch_start(const uint8_t *base, size_t stride, int n) {
    ek_prefetch_bytes(base, (size_t)(n < EK_PF_RECORDS ? n : EK_PF_RECORDS) * stride);
}

void ek_x512_query(const qi8_query *qi, int hd, int gs, int qorder, query512 *qz) {
    uint8_t src[64]; /* value index of each query byte, in query512 order */
    for (int d = 0; d < 16; d++)
        for (int b = 0; b < 4; b++) src[4 * d + b] = (uint8_t)query_dword_value(qorder, d, b);
    for (int h = 0; h < gs; h++)
        for (int u = 0; u < hd / 64; u++) {
            int8_t *dst = (int8_t *)qz->q[h][u];
            const int8_t *q8 = qi->q8[h] + 64 * u;
            for (int i = 0; i < 64; i++) dst[i] = q8[src[i]];
        }
}

/* Integer dot products of 16 records (rp) with G heads: tot[h] lane r = record r. Each head sums
 * into NC independent chains (vpdpbusd's latency would otherwise bound a block: 16 dependent
 * steps per head), added at the end. */
EK_INLINE void score_block(const query512 *qz, const uint8_t *const *rp, __m512i *tot, const int G, const int UNITS,
                           const int bits) {
    enum { NC = 4 };
    const int nc = G <= 4 ? NC : 2;
    __m512i acc[8][NC];
    for (int h = 0; h < G; h++)
        for (int c = 0; c < nc; c++) acc[h][c] = _mm512_setzero_si512();
    for (int u = 0; u < UNITS; u++) {
        if (bits == 4) {
            __m512i t[8];
            transpose_4bit(rp, u, t);
            const __m512i k = _mm512_set1_epi8(15);
            for (int i = 0; i < 8; i++) {
                const __m512i lo = _mm512_and_si512(t[i], k), hi = _mm512_and_si512(_mm512_srli_epi16(t[i], 4), k);
                const int c0 = (2 * i) % nc, c1 = (2 * i + 1) % nc;
                for (int h = 0; h < G; h++) {
                    acc[h][c0] = dpbusd_bcast(acc[h][c0], lo, &qz->q[h][u][i]);
                    acc[h][c1] = dpbusd_bcast(acc[h][c1], hi, &qz->q[h][u][8 + i]);
                }
            }
        } else {
            __m512i t[4];
            transpose_2bit(rp, u, t);
            const __m512i k = _mm512_set1_epi8(3);
            for (int i = 0; i < 4; i++)
                for (int s = 0; s < 4; s++) {
                    const __m512i c = _mm512_and_si512(_mm512_srli_epi16(t[i], 2 * s), k);
                    for (int h = 0; h < G; h++)
                        acc[h][s % nc] = dpbusd_bcast(acc[h][s % nc], c, &qz->q[h][u][4 * s + i]);
                }
        }
    }
    for (int h = 0; h < G; h++) {
        __m512i x = acc[h][0];
        for (int c = 1; c < nc; c++) x = _mm512_add_epi32(x, acc[h][c]);
        tot[h] = x;
    }
}

EK_INLINE void score_tile_units(const query512 *qz, const uint8_t *base, size_t stride, int n, int gs,
                                const float *scale, const float *qsum, size_t qsum_stride, float *sc, float *tmax,
                                const int UNITS, const int bits) {
    __m512 mx[QI_MAX_GS];
    for (int h = 0; h < gs; h++) mx[h] = _mm512_set1_ps(-INFINITY);
    const size_t code_bytes = (size_t)UNITS * 64 * bits / 8;
    /* byte offsets of a block's 16 records (a record is at most a few hundred bytes: int32) */
    const __m512i full_offs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32((int)stride));
    for (int j0 = 0; j0 < n; j0 += 16) {
        const int nb = n - j0 < 16 ? n - j0 : 16;
        /* the next records (a tile is too short a run for the hardware prefetcher) */
        ek_prefetch_bytes(base + (size_t)(j0 + EK_PF_RECORDS) * stride, (size_t)nb * stride);
        /* the block's records (a short tail repeats its last) and their scale and minimum (fp16,
         * adjacent: one group), gathered */
        const uint8_t *blk = base + (size_t)j0 * stride;
        const uint8_t *rp[16];
        __m512i offs = full_offs;
        if (nb < 16) offs = _mm512_min_epi32(offs, _mm512_set1_epi32((int)((nb - 1) * stride)));
        int32_t o32[16] __attribute__((aligned(64)));
        _mm512_store_si512(o32, offs);
        for (int j = 0; j < 16; j++) rp[j] = blk + o32[j];
        __m512 dv, mv;
        fp16_pairs_to_ps(_mm512_i32gather_epi32(offs, blk + code_bytes, 1), &dv, &mv);
        const __mmask16 keep = (__mmask16)((1u << nb) - 1);
        __m512i tot[QI_MAX_GS];
        switch (gs) {
        case 1: score_block(qz, rp, tot, 1, UNITS, bits); break;
        case 2: score_block(qz, rp, tot, 2, UNITS, bits); break;
        case 3: score_block(qz, rp, tot, 3, UNITS, bits); break;
        case 4: score_block(qz, rp, tot, 4, UNITS, bits); break;
        case 5: score_block(qz, rp, tot, 5, UNITS, bits); break;
        case 6: score_block(qz, rp, tot, 6, UNITS, bits); break;
        case 7: score_block(qz, rp, tot, 7, UNITS, bits); break;
        default: score_block(qz, rp, tot, 8, UNITS, bits); break;
        }
        for (int h = 0; h < gs; h++) { /* s * (d * sum + m * sum(q8)), as the AVX2 path */
            const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tot[h]), dv,
                                             _mm512_mul_ps(mv, _mm512_set1_ps(qsum[h * qsum_stride])));
            const __m512 sv = _mm512_mul_ps(v, _mm512_set1_ps(scale[h]));
            _mm512_mask_storeu_ps(sc + (size_t)h * ATTN_CHUNK + j0, keep, sv);
            mx[h] = _mm512_mask_max_ps(mx[h], keep, sv, mx[h]); /* a NaN score loses, as in row_max */
        }
    }
    for (int h = 0; h < gs; h++) tmax[h] = _mm512_reduce_max_ps(mx[h]);
}

EK_INLINE void score_tile_bits(const query512 *qz, const uint8_t *base, size_t stride, int n, int units, int gs,
                               const qi8_query *qi, float *sc, float *tmax, const int bits) {
    const size_t qs = &qi->qsum[1][0] - &qi->qsum[0][0];
    const float *q0 = &qi->qsum[0][0];
    switch (units) {
    case 1: score_tile_units(qz, base, stride, n, gs, qi->scale, q0, qs, sc, tmax, 1, bits); break;
    case 2: score_tile_units(qz, base, stride, n, gs, qi->scale, q0, qs, sc, tmax, 2, bits); break;
    case 3: score_tile_units(qz, base, stride, n, gs, qi->scale, q0, qs, sc, tmax, 3, bits); break;
    default: score_tile_units(qz, base, stride, n, gs, qi->scale, q0, qs, sc, tmax, 4, bits); break;
    }
}

/* The key-scoring kernels the table's rows name (kv_types.c). */
void ek_x512_score_q4(const qi8_query *qi, const query512 *qz, const uint8_t *base, size_t stride, int n, int hd, int gs,
                      float *sc, float *tmax) {
    score_tile_bits(qz, base, stride, n, hd / 64, gs, qi, sc, tmax, 4);
}
void ek_x512_score_q2(const qi8_query *qi, const query512 *qz, const uint8_t *base, size_t stride, int n, int hd, int gs,
                      float *sc, float *tmax) {
    score_tile_bits(qz, base, stride, n, hd / 64, gs, qi, sc, tmax, 2);
}

int ek_x512_values_in_order(int bits) {
    for (int a = 0; a < 4; a++)
        for (int t = 0; t < 16; t++)
            if (acc_dword_dim(bits, a, t) != 16 * a + t) return 0;
    return 1;
}

void ek_x512_values_unpermute(const float *o_perm, float *o, int gs, int hd, int bits) {
    int dim[64];
    for (int a = 0; a < 4; a++)
        for (int t = 0; t < 16; t++) dim[16 * a + t] = acc_dword_dim(bits, a, t);
    for (int h = 0; h < gs; h++)
        for (int u = 0; u < hd / 64; u++) {
            const float *src = o_perm + (size_t)h * hd + 64 * u;
            float *dst = o + (size_t)h * hd + 64 * u;
            for (int p = 0; p < 64; p++) dst[dim[p]] += src[p];
        }
}
#endif
