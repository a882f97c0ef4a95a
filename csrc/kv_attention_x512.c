#include "kv_attention_x512.h"

#if defined(EK_AVX512)
#include <math.h>
#include <string.h>

#include "kv_attention.h"
#include "quant.h"

#define EK_INLINE static inline __attribute__((always_inline))

/* acc += products summed in pairs (int16 x int16) / in fours (u8 x s8). Inline asm because GCC 12
 * copies every accumulator around the intrinsics' tied operand inside loops (measured: two extra
 * register moves per instruction, about 10% of the attention time). */
EK_INLINE __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
    return acc;
}
EK_INLINE __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "vm"(s8));
    return acc;
}
#define X512_MAX_GS 8
/* whole 16-record vectors per tile; int32 sums of a tile's codes x 15-bit weights cannot overflow:
 * ATTN_CHUNK * 255 * 32767 < 2^31 */
_Static_assert(ATTN_CHUNK % 16 == 0 && ATTN_CHUNK <= 256, "ATTN_CHUNK: a multiple of 16, at most 256");
#ifndef EK_PF_HINT
#define EK_PF_HINT _MM_HINT_T0
#endif
#ifndef EK_PF_RECORDS
#define EK_PF_RECORDS 64 /* records ahead (measured at 8,192 tokens: 64 beats 32 and 128) */
#endif
#define X512_MAX_GROUPS 8 /* head_dim / group: head_dim <= 256, group >= 32 */

/* ---- value order -------------------------------------------------------------------------
 * A unit is 64 values (two 32-value chunks of the record format, see kv_quant.h). Its codes unpack
 * into two registers of 32 int16 words, W0 and W1; unit_word_dim gives the value held by word p of
 * register r:
 *   8-bit: W0 = bytes 0-31, W1 = bytes 32-63                       -> value 32r + p
 *   4-bit: word p = byte p (chunk p/16, byte p%16), W0 its low nibble, W1 its high nibble
 *                                                                   -> value 32(p/16) + p%16 + 16r
 *   2-bit: the 16 bytes as words, W0 shifted by 0 | 2 (words 0-15 | 16-31), W1 by 4 | 6
 *                                                                   -> value 32((p%16)/8) + p%8 + 8(p/16 + 2r)
 * Two records A, B interleave as int16 pairs: accumulator a (0-3) takes register a/2, words
 * 4(a%2) + 8L + e for 128-bit lane L and e < 4 (unpacklo/hi_epi16), i.e. dword t = 4L + e holds
 * word 8(t/4) + 4(a%2) + t%4. */
static int unit_word_dim(int bits, int r, int p) {
    if (bits == 8) return 32 * r + p;
    if (bits == 4) return 32 * (p / 16) + p % 16 + 16 * r;
    return 32 * ((p % 16) / 8) + p % 8 + 8 * (p / 16 + 2 * r);
}
static int acc_dword_dim(int bits, int a, int t) { return unit_word_dim(bits, a / 2, 8 * (t / 4) + 4 * (a % 2) + t % 4); }

/* dwords of accumulator a whose value lies in the unit's second chunk (acc_dword_dim(bits, a, t) >= 32
 * exactly for the set bits t; a wrong mask would scale by the wrong group, which the attention tests
 * with groups of 32 catch) */
EK_INLINE __mmask16 second_chunk_mask(int a, const int bits) {
    if (bits == 8) return a >= 2 ? 0xFFFF : 0;
    if (bits == 4) return 0xFF00;
    return 0xF0F0;
}

/* W0, W1 of unit u of a record */
EK_INLINE void unit_words(const uint8_t *r, int u, __m512i *w0, __m512i *w1, const int bits) {
    if (bits == 8) {
        *w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(r + 64 * u)));
        *w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(r + 64 * u + 32)));
    } else if (bits == 4) {
        const __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(r + 32 * u)));
        *w0 = _mm512_and_si512(x, _mm512_set1_epi16(15));
        *w1 = _mm512_srli_epi16(x, 4);
    } else {
        const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(r + 16 * u)));
        const __m512i z = _mm512_broadcast_i64x4(x);
        const __m512i s01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
        const __m512i s23 = _mm512_add_epi16(s01, _mm512_set1_epi16(4));
        *w0 = _mm512_and_si512(_mm512_srlv_epi16(z, s01), _mm512_set1_epi16(3));
        *w1 = _mm512_and_si512(_mm512_srlv_epi16(z, s23), _mm512_set1_epi16(3));
    }
}

int ek_x512_values_ok(int bits, int hd, int gs) {
    return (bits == 8 || bits == 4 || bits == 2) && hd % 64 == 0 && hd <= 256 && gs >= 1 && gs <= X512_MAX_GS;
}

/* One pair of records (A, B) of unit u into the accumulators of heads h0 .. h0+HB-1 at pair index j */
EK_INLINE void accum_pair(const uint8_t *ra, const uint8_t *rb, int u, int j, int k0, int k1, const int16_t *qw,
                          int h0, __m512i acc[][4], const int HB, const int bits) {
    __m512i a0, a1, b0, b1, x[4];
    unit_words(ra, u, &a0, &a1, bits);
    unit_words(rb, u, &b0, &b1, bits);
    x[0] = _mm512_unpacklo_epi16(a0, b0);
    x[1] = _mm512_unpackhi_epi16(a0, b0);
    x[2] = _mm512_unpacklo_epi16(a1, b1);
    x[3] = _mm512_unpackhi_epi16(a1, b1);
    for (int h = 0; h < HB; h++) {
        /* the pair's two weights as one int32; qw rows are (head, group, ATTN_CHUNK) */
        const int16_t *qh = qw + (size_t)(h0 + h) * X512_MAX_GROUPS * ATTN_CHUNK;
        int32_t p0, p1;
        memcpy(&p0, qh + k0 * ATTN_CHUNK + j, 4);
        const __m512i w0 = _mm512_set1_epi32(p0);
        if (k0 == k1) {
            for (int a = 0; a < 4; a++) acc[h][a] = dpwssd(acc[h][a], x[a], w0);
        } else {
            memcpy(&p1, qh + k1 * ATTN_CHUNK + j, 4);
            const __m512i w1 = _mm512_set1_epi32(p1);
            if (bits == 8) {
                acc[h][0] = dpwssd(acc[h][0], x[0], w0);
                acc[h][1] = dpwssd(acc[h][1], x[1], w0);
                acc[h][2] = dpwssd(acc[h][2], x[2], w1);
                acc[h][3] = dpwssd(acc[h][3], x[3], w1);
            } else {
                const __m512i wb = _mm512_mask_blend_epi32(second_chunk_mask(0, bits), w0, w1);
                for (int a = 0; a < 4; a++) acc[h][a] = dpwssd(acc[h][a], x[a], wb);
            }
        }
    }
}

/* Heads h0 .. h0+HB-1 of unit u: integer sums over the tile, then o_perm += scale * sum + msum. */
EK_INLINE void accum_unit(const uint8_t *base, size_t stride, int n, int u, int k0, int k1, const int16_t *qw,
                          const float *scale, const float *msum, float *o_perm, int hd, int h0, const int HB,
                          const int bits) {
    __m512i acc[4][4];
    for (int h = 0; h < HB; h++)
        for (int a = 0; a < 4; a++) acc[h][a] = _mm512_setzero_si512();
    const uint8_t *r = base;
    int j = 0;
    for (; j + 1 < n; j += 2, r += 2 * stride) accum_pair(r, r + stride, u, j, k0, k1, qw, h0, acc, HB, bits);
    if (j < n) accum_pair(r, r, u, j, k0, k1, qw, h0, acc, HB, bits); /* an odd tail pairs with itself at weight 0 */
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

EK_INLINE void accum_bits(const uint8_t *base, size_t stride, int n, int hd, int g, const int16_t *qw,
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
            const __m512i v = _mm512_loadu_si512(dm + j);
            _mm512_store_ps(&d[0][j], _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)));
            _mm512_store_ps(&m[0][j], _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16))));
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

int ek_x512_values_accum(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs,
                         float *o_perm, int bits) {
    const int ng = hd / g;
    float dv[X512_MAX_GROUPS][ATTN_CHUNK] __attribute__((aligned(64)));
    float mv[X512_MAX_GROUPS][ATTN_CHUNK] __attribute__((aligned(64)));
    /* weights: finite and <= 1 (exp of score - running max) unless a score was NaN or inf; the
     * store's scales and minimums are always finite */
    enum { NV = ATTN_CHUNK / 16 };
    __mmask16 live[NV];
    for (int v = 0; v < NV; v++) live[v] = n >= 16 * (v + 1) ? 0xFFFF : n <= 16 * v ? 0 : (__mmask16)((1u << (n - 16 * v)) - 1);
    __mmask16 bad = 0;
    for (int h = 0; h < gs; h++)
        for (int v = 0; v < NV; v++)
            bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_maskz_loadu_ps(live[v], w + (size_t)h * ATTN_CHUNK + 16 * v)),
                                      _mm512_set1_ps(2.0f), _CMP_NLT_UQ);
    if (bad) return -1; /* the float path handles (and propagates) it */
    load_scales(base, stride, n, (size_t)hd * bits / 8, ng, dv, mv);
    /* weights rounded to 15 bits per (head, group) against the tile's largest w * d */
    int16_t qw[X512_MAX_GS * X512_MAX_GROUPS * ATTN_CHUNK] __attribute__((aligned(64)));
    float scale[X512_MAX_GS * X512_MAX_GROUPS], msum[X512_MAX_GS * X512_MAX_GROUPS];
    for (int h = 0; h < gs; h++) {
        __m512 wv[NV];
        for (int v = 0; v < NV; v++) wv[v] = _mm512_maskz_loadu_ps(live[v], w + (size_t)h * ATTN_CHUNK + 16 * v);
        for (int k = 0; k < ng; k++) {
            __m512 wd[NV], top = _mm512_setzero_ps(), ms = _mm512_setzero_ps();
            for (int v = 0; v < NV; v++) {
                wd[v] = _mm512_mul_ps(wv[v], _mm512_load_ps(&dv[k][16 * v]));
                top = _mm512_max_ps(top, wd[v]);
                ms = _mm512_fmadd_ps(wv[v], _mm512_load_ps(&mv[k][16 * v]), ms);
            }
            const float t = _mm512_reduce_max_ps(top);
            const int idx = h * X512_MAX_GROUPS + k;
            int16_t *q = qw + (size_t)idx * ATTN_CHUNK;
            msum[idx] = _mm512_reduce_add_ps(ms);
            if (t > 0.0f) {
                const __m512 inv = _mm512_set1_ps(32767.0f / t);
                for (int v = 0; v < NV; v++)
                    _mm256_store_si256((__m256i *)(q + 16 * v), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(wd[v], inv))));
                scale[idx] = t / 32767.0f;
            } else {
                memset(q, 0, sizeof(int16_t) * ATTN_CHUNK);
                scale[idx] = 0.0f;
            }
        }
    }
    if (bits == 8) accum_bits(base, stride, n, hd, g, qw, scale, msum, gs, o_perm, 8);
    else if (bits == 4) accum_bits(base, stride, n, hd, g, qw, scale, msum, gs, o_perm, 4);
    else accum_bits(base, stride, n, hd, g, qw, scale, msum, gs, o_perm, 2);
    return 0;
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

EK_INLINE __m512i level_index(int t, int b) { return _mm512_load_si512(LEVEL_INDEX[t][b]); }

/* 16 records' unit u (32 bytes of 4-bit codes: 8 groups of 4 bytes) -> t[i] = group i of records 0-15.
 * Register k starts as [record k | record k+8], so after the three levels lane r is record r. */
EK_INLINE void transpose_4bit(const uint8_t *const *rp, int u, __m512i t[8]) {
    for (int k = 0; k < 8; k++)
        t[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(rp[k] + 32 * u))),
                                  _mm256_loadu_si256((const __m256i *)(rp[k + 8] + 32 * u)), 1);
    for (int lv = 0; lv < 3; lv++) {
        const __m512i i0 = level_index(lv, 0), i1 = level_index(lv, 1);
        for (int r0 = 0; r0 < 8; r0++) {
            if (r0 & (1 << lv)) continue;
            const int r1 = r0 | (1 << lv);
            const __m512i a = t[r0], b = t[r1];
            t[r0] = _mm512_permutex2var_epi32(a, i0, b);
            t[r1] = _mm512_permutex2var_epi32(a, i1, b);
        }
    }
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
    for (int lv = 0; lv < 2; lv++) {
        const __m512i i0 = level_index(lv, 0), i1 = level_index(lv, 1);
        for (int r0 = 0; r0 < 4; r0++) {
            if (r0 & (1 << lv)) continue;
            const int r1 = r0 | (1 << lv);
            const __m512i a = t[r0], b = t[r1];
            t[r0] = _mm512_permutex2var_epi32(a, i0, b);
            t[r1] = _mm512_permutex2var_epi32(a, i1, b);
        }
    }
}

/* Query dword d of unit u (int8 x 4) in the order the transposed codes come: 4-bit: d < 8 the low
 * nibbles of code group d, d >= 8 the high nibbles of group d - 8 (group i: bytes 4i..4i+3, chunk
 * i/4, low nibble of byte j = value 32c + j, high = + 16); 2-bit: d = 4s + i for shift 2s of group i
 * (bytes 4i..4i+3, chunk i/2, byte j = values 32c + j + 8s). */
static int query_dword_value(int bits, int d, int b) {
    if (bits == 4) {
        const int i = d % 8, c = i / 4, j = 4 * (i % 4) + b;
        return 32 * c + j + (d >= 8 ? 16 : 0);
    }
    const int s = d / 4, i = d % 4, c = i / 2, j = 4 * (i % 2) + b;
    return 32 * c + j + 8 * s;
}

int ek_x512_keys_ok(int bits, int hd, int g, int gs) {
    return (bits == 4 || bits == 2) && g == hd && hd % 64 == 0 && hd <= 64 * QI_MAX_UNITS && gs >= 1 &&
           gs <= QI_MAX_GS;
}

void ek_x512_prefetch_start(const uint8_t *base, size_t stride, int n) {
    const size_t bytes = (size_t)(n < EK_PF_RECORDS ? n : EK_PF_RECORDS) * stride;
    for (size_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)(base + b), EK_PF_HINT);
}

void ek_x512_query(const qi8_query *qi, int hd, int gs, int bits, query512 *qz) {
    uint8_t src[64]; /* value index of each query byte, in query512 order */
    for (int d = 0; d < 16; d++)
        for (int b = 0; b < 4; b++) src[4 * d + b] = (uint8_t)query_dword_value(bits, d, b);
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
                    acc[h][c0] = dpbusd(acc[h][c0], lo, _mm512_set1_epi32(qz->q[h][u][i]));
                    acc[h][c1] = dpbusd(acc[h][c1], hi, _mm512_set1_epi32(qz->q[h][u][8 + i]));
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
                        acc[h][s % nc] = dpbusd(acc[h][s % nc], c, _mm512_set1_epi32(qz->q[h][u][4 * s + i]));
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
                                const float *scale, const float *qsum, size_t qsum_stride, float *sc,
                                const int UNITS, const int bits) {
    const size_t code_bytes = (size_t)UNITS * 64 * bits / 8;
    for (int j0 = 0; j0 < n; j0 += 16) {
        const int nb = n - j0 < 16 ? n - j0 : 16;
        /* the next records (a tile is too short a run for the hardware prefetcher) */
        const uint8_t *ahead = base + (size_t)(j0 + EK_PF_RECORDS) * stride;
        for (size_t b = 0; b < (size_t)nb * stride; b += 64) _mm_prefetch((const char *)(ahead + b), EK_PF_HINT);
        /* the block's records (a short tail repeats its last) and their scale and minimum (fp16,
         * adjacent: one group) */
        const uint8_t *rp[16];
        uint32_t dm[16];
        for (int j = 0; j < 16; j++) {
            rp[j] = base + (size_t)(j0 + (j < nb ? j : nb - 1)) * stride;
            memcpy(&dm[j], rp[j] + code_bytes, 4);
        }
        const __m512i dmv = _mm512_loadu_si512(dm);
        const __m512 dv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dmv));
        const __m512 mv = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dmv, 16)));
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
            _mm512_mask_storeu_ps(sc + (size_t)h * ATTN_CHUNK + j0, keep, _mm512_mul_ps(v, _mm512_set1_ps(scale[h])));
        }
    }
}

EK_INLINE void score_tile_bits(const query512 *qz, const uint8_t *base, size_t stride, int n, int units, int gs,
                               const qi8_query *qi, float *sc, const int bits) {
    const size_t qs = &qi->qsum[1][0] - &qi->qsum[0][0];
    switch (units) {
    case 1: score_tile_units(qz, base, stride, n, gs, qi->scale, &qi->qsum[0][0], qs, sc, 1, bits); break;
    case 2: score_tile_units(qz, base, stride, n, gs, qi->scale, &qi->qsum[0][0], qs, sc, 2, bits); break;
    case 3: score_tile_units(qz, base, stride, n, gs, qi->scale, &qi->qsum[0][0], qs, sc, 3, bits); break;
    default: score_tile_units(qz, base, stride, n, gs, qi->scale, &qi->qsum[0][0], qs, sc, 4, bits); break;
    }
}

void ek_x512_score_tile(const qi8_query *qi, const query512 *qz, const uint8_t *base, size_t stride, int n, int hd,
                        int gs, float *sc, int bits) {
    if (bits == 4) score_tile_bits(qz, base, stride, n, hd / 64, gs, qi, sc, 4);
    else score_tile_bits(qz, base, stride, n, hd / 64, gs, qi, sc, 2);
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
