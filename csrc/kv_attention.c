#include "kv_attention.h"

#include <math.h>
#include <string.h>

#include "kv_attention_int.h"
#include "kv_attention_x512.h"
#include "simd.h"

/* ------------------------------------------------------------------------- */
/* small vector helpers (head_dim is a multiple of 8)                         */
/* ------------------------------------------------------------------------- */

static inline float exp_shift_ref(float *x, int n, float m) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    return sum;
}

#if defined(EK_AVX2)
static inline float dotf(const float *a, const float *b, int n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i < n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    return ek_hsum256(_mm256_add_ps(acc0, acc1));
}
static inline void axpyf(float *y, float a, const float *x, int n) {
    const __m256 va = _mm256_set1_ps(a);
    for (int i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}
static inline void scalef(float *y, float a, int n) {
    const __m256 va = _mm256_set1_ps(a);
    for (int i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(va, _mm256_loadu_ps(y + i)));
}

#if defined(EK_AVX512)
float ek_exp_shift(float *x, int n, float m) {
    /* 16 at a time, the tail under a mask: every element through the same polynomial */
    const __m512 vm = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(k, ek_exp_neg512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vm)));
        _mm512_mask_storeu_ps(x + i, k, e);
        acc = _mm512_add_ps(acc, e);
    }
    return _mm512_reduce_add_ps(acc);
}
#else
float ek_exp_shift(float *x, int n, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = ek_exp_neg256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = ek_hsum256(acc);
    if (i < n) { /* the tail through the same polynomial, so results do not depend on where tiles end */
        float t[8];
        const int r = n - i;
        for (int k = 0; k < 8; k++) t[k] = k < r ? x[i + k] - m : 0.0f;
        _mm256_storeu_ps(t, ek_exp_neg256(_mm256_loadu_ps(t)));
        for (int k = 0; k < r; k++) {
            x[i + k] = t[k];
            sum += t[k];
        }
    }
    return sum;
}
#endif

#elif defined(EK_NEON) && defined(__aarch64__)
static inline float dotf(const float *a, const float *b, int n) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int i = 0; i < n; i += 4) acc = vfmaq_f32(acc, vld1q_f32(a + i), vld1q_f32(b + i));
    return vaddvq_f32(acc);
}
static inline void axpyf(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
}
static inline void scalef(float *y, float a, int n) {
    for (int i = 0; i < n; i += 4) vst1q_f32(y + i, vmulq_n_f32(vld1q_f32(y + i), a));
}
float ek_exp_shift(float *x, int n, float m) { return ek_exp_shift_neon(x, n, m); }
#else
static inline float dotf(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
static inline void axpyf(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}
static inline void scalef(float *y, float a, int n) {
    for (int i = 0; i < n; i++) y[i] *= a;
}
float ek_exp_shift(float *x, int n, float m) { return exp_shift_ref(x, n, m); }
#endif

/* ------------------------------------------------------------------------- */
/* partials                                                                   */
/* ------------------------------------------------------------------------- */

size_t ek_attn_partial_floats(int gs, int head_dim) { return (size_t)gs * (2 + 2 * head_dim); }
/* scores (gs, ATTN_CHUNK) | tile (ATTN_CHUNK, head_dim) | second tile (AVX-512 permuted values) | key-center
 * score offsets (gs) */
size_t ek_attn_scratch_floats(int gs, int head_dim) {
    return (size_t)gs * ATTN_CHUNK + 2 * (size_t)ATTN_CHUNK * head_dim + (size_t)gs;
}

void ek_attn_partial_init(ek_attn_partial *p, float *buf, int gs, int head_dim) {
    p->m = buf;
    p->l = buf + gs;
    p->o_plain = buf + 2 * gs;
    p->o_rot = p->o_plain + (size_t)gs * head_dim;
    for (int h = 0; h < gs; h++) {
        p->m[h] = -INFINITY;
        p->l[h] = 0.0f;
    }
    memset(p->o_plain, 0, sizeof(float) * 2 * (size_t)gs * head_dim);
}

/* Rescale head h of a partial to a new running max; returns the factor applied. */
static inline float rebase(ek_attn_partial *p, int h, float m_new, int hd) {
    if (p->m[h] == m_new) return 1.0f;
    const float c = p->m[h] == -INFINITY ? 0.0f : expf(p->m[h] - m_new);
    p->l[h] *= c;
    scalef(p->o_plain + (size_t)h * hd, c, hd);
    scalef(p->o_rot + (size_t)h * hd, c, hd);
    p->m[h] = m_new;
    return c;
}

void ek_attn_merge(ek_attn_partial *into, const ek_attn_partial *from, int gs, int hd) {
    for (int h = 0; h < gs; h++) {
        if (from->m[h] == -INFINITY) continue;
        const float m_new = fmaxf(into->m[h], from->m[h]);
        rebase(into, h, m_new, hd);
        const float c = expf(from->m[h] - m_new);
        into->l[h] += c * from->l[h];
        axpyf(into->o_plain + (size_t)h * hd, c, from->o_plain + (size_t)h * hd, hd);
        axpyf(into->o_rot + (size_t)h * hd, c, from->o_rot + (size_t)h * hd, hd);
    }
}

void ek_attn_finish(const ek_attn_partial *p, const ek_kv_store *s, int gs, float *out) {
    const int hd = s->head_dim;
    for (int h = 0; h < gs; h++) {
        float *o = out + (size_t)h * hd;
        const float *r = p->o_rot + (size_t)h * hd;
        memcpy(o, r, sizeof(float) * hd);
        if (s->rotate) ek_unrotate(o, s->signs, hd);
        const float inv = p->l[h] > 0.0f ? 1.0f / p->l[h] : 0.0f;
        const float *pl = p->o_plain + (size_t)h * hd;
        for (int i = 0; i < hd; i++) o[i] = (o[i] + pl[i]) * inv;
    }
}

/* ------------------------------------------------------------------------- */
/* int8 query (for integer key scoring)                                       */
/* ------------------------------------------------------------------------- */


/* Keys of this precision and shape are scored against the int8-rounded query, in every build
 * (AVX2 and NEON with integer dot products, plain C in float), so all builds compute the same
 * scores up to float rounding. */
static int int_keys_ok(const ek_kv_type *t, int hd, int gs) {
    return t->qorder != EK_QORDER_NONE && hd % 64 == 0 && hd <= 64 * QI_MAX_UNITS && gs <= QI_MAX_GS;
}

int ek_attn_query_i8(const float *q, int n, int8_t *q8, float *scale) {
    float amax = 0.0f;
    for (int i = 0; i < n; i++) {
        const float a = fabsf(q[i]);
        if (!(a <= 3.4e38f)) return -1; /* NaN or inf: the float path handles it */
        amax = a > amax ? a : amax;
    }
    if (amax == 0.0f) {
        memset(q8, 0, (size_t)n);
        *scale = 0.0f;
        return 0;
    }
    const float id = 127.0f / amax;
    for (int i = 0; i < n; i++) q8[i] = (int8_t)lrintf(q[i] * id);
    *scale = amax / 127.0f;
    return 0;
}

int ek_attn_query_rounded(const float *q, int gs, int hd, float *out) {
    int8_t q8[64 * QI_MAX_UNITS];
    if (hd > 64 * QI_MAX_UNITS) return -1;
    for (int h = 0; h < gs; h++) {
        float sc;
        if (ek_attn_query_i8(q + (size_t)h * hd, hd, q8, &sc)) return -1;
        for (int i = 0; i < hd; i++) out[(size_t)h * hd + i] = sc * (float)q8[i];
    }
    return 0;
}

/* ------------------------------------------------------------------------- */
/* the fused kernel                                                           */
/* ------------------------------------------------------------------------- */

#if defined(EK_AVX2)
/* CALL(G) with G = gs as a compile-time constant (1..8), so per-head accumulator arrays live in
 * registers; gs > 8 is not dispatched here */
#define EK_DISPATCH_GS(gs, CALL)                                                                    \
    switch (gs) {                                                                                  \
    case 1: CALL(1); break;                                                                        \
    case 2: CALL(2); break;                                                                        \
    case 3: CALL(3); break;                                                                        \
    case 4: CALL(4); break;                                                                        \
    case 5: CALL(5); break;                                                                        \
    case 6: CALL(6); break;                                                                        \
    case 7: CALL(7); break;                                                                        \
    default: CALL(8); break;                                                                       \
    }
/* column blocks of 8 per pass for G heads, G * CB <= 12 accumulators */
#define EK_CB(G) ((G) <= 3 ? 4 : (G) <= 6 ? 2 : 1)

/* Ask for the record one tile ahead: a task's run is too short for the hardware prefetcher
 * (docs/decisions.md). Prefetches never fault, so running past the pool's end is harmless. */
EK_INLINE void prefetch_ahead(const uint8_t *r, size_t stride) { ek_prefetch_bytes(r + ATTN_CHUNK * stride, stride); }

/* sc[h*ATTN_CHUNK + j] = dot(tile[j], q[h]) for n records; 4 records share one reduction */
EK_INLINE void score_tile(const float *tile, int n, int hd, const float *q, int gs, float *sc) {
    for (int h = 0; h < gs; h++) {
        const float *qh = q + (size_t)h * hd;
        int j = 0;
        for (; j + 4 <= n; j += 4) {
            const float *t0 = tile + (size_t)j * hd;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int i = 0; i < hd; i += 8) {
                const __m256 qv = _mm256_loadu_ps(qh + i);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(t0 + i), qv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(t0 + hd + i), qv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(t0 + 2 * hd + i), qv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(t0 + 3 * hd + i), qv, a3);
            }
            /* four horizontal sums at once */
            __m256 s01 = _mm256_hadd_ps(a0, a1), s23 = _mm256_hadd_ps(a2, a3);
            __m256 s = _mm256_hadd_ps(s01, s23);
            __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            _mm_storeu_ps(sc + (size_t)h * ATTN_CHUNK + j, r);
        }
        for (; j < n; j++) sc[(size_t)h * ATTN_CHUNK + j] = dotf(tile + (size_t)j * hd, qh, hd);
    }
}

/* o[h] += sum_j w[h][j] * tile[j]: accumulators for G heads x CB column blocks of 8 held in
 * registers (G * CB <= 12), so each weight is broadcast once per CB blocks, not once per block */
EK_INLINE void accum_tile_g(const float *tile, int n, int hd, const float *w, float *o, const int G, const int CB) {
    for (int i = 0; i < hd; i += 8 * CB) {
        __m256 acc[8][4];
        for (int h = 0; h < G; h++)
            for (int b = 0; b < CB; b++) acc[h][b] = _mm256_setzero_ps();
        for (int j = 0; j < n; j++) {
            __m256 v[4];
            for (int b = 0; b < CB; b++) v[b] = _mm256_loadu_ps(tile + (size_t)j * hd + i + 8 * b);
            for (int h = 0; h < G; h++) {
                const __m256 wj = _mm256_broadcast_ss(w + (size_t)h * ATTN_CHUNK + j);
                for (int b = 0; b < CB; b++) acc[h][b] = _mm256_fmadd_ps(wj, v[b], acc[h][b]);
            }
        }
        for (int h = 0; h < G; h++)
            for (int b = 0; b < CB; b++) {
                float *oh = o + (size_t)h * hd + i + 8 * b;
                _mm256_storeu_ps(oh, _mm256_add_ps(_mm256_loadu_ps(oh), acc[h][b]));
            }
    }
}

static void accum_tile(const float *tile, int n, int hd, const float *w, int gs, float *o) {
    if (gs <= 8) {
        /* head_dim a multiple of 32: EK_CB(G) blocks of 8 per pass; FP16 heads of 8, 16 or 24: one */
#define ACC_WIDE(G) accum_tile_g(tile, n, hd, w, o, G, EK_CB(G))
#define ACC_NARROW(G) accum_tile_g(tile, n, hd, w, o, G, 1)
        if (hd % 32 == 0) {
            EK_DISPATCH_GS(gs, ACC_WIDE)
        } else {
            EK_DISPATCH_GS(gs, ACC_NARROW)
        }
#undef ACC_WIDE
#undef ACC_NARROW
        return;
    }
    for (int h = 0; h < gs; h++) /* rare: more than 8 query heads per KV head */
        for (int j = 0; j < n; j++) axpyf(o + (size_t)h * hd, w[(size_t)h * ATTN_CHUNK + j], tile + (size_t)j * hd, hd);
}

/* ---- integer key scoring: int8 query x 6-, 4-, 3- or 2-bit key codes ---------------------------
 * score = s_q * (sum_c d_c * (q8 . u)_c + sum_g m_g * sum_{i in g} q8_i) for a record with codes u,
 * group scales d and minimums m: exactly the dot product of the dequantized key with the
 * int8-rounded query s_q * q8. The integer part runs on vpdpbusd (AVX-VNNI) or vpmaddubsw. */



/* The int8 query of each head in the order the codes unpack into two registers per unit of 64
 * values. 4-bit: a unit is 32 bytes (two 16-byte chunks of "code j | code j+16 << 4"); low nibbles
 * give values 0-15 | 32-47, high nibbles 16-31 | 48-63. 2-bit: a unit is 16 bytes (two 8-byte
 * chunks of codes j, j+8, j+16, j+24); shifts 0|2 give values 0-7, 32-39 | 8-15, 40-47 and
 * shifts 4|6 give 16-23, 48-55 | 24-31, 56-63. 3-bit units (two 12-byte chunks: the 2-bit layout, then
 * a 32-bit mask of the codes' bit 2) unpack in the 2-bit order, 6-bit units (two 24-byte chunks: the
 * 4-bit layout, then bits 4-5 in the 2-bit layout) in the 4-bit order. The row's qorder names the order
 * (EK_QORDER_NIBBLE: the 4-bit one, EK_QORDER_CRUMB: the 2-bit one). Runs once per task: vector code, and the same
 * arithmetic as ek_attn_query_i8 (q * (127 / amax), rounded to nearest even). */
static int qi8_prepare(qi8_query *qi, const float *q, int gs, int hd, int qorder, int g) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int h = 0; h < gs; h++) {
        const float *qh = q + (size_t)h * hd;
        __m256 mx = _mm256_setzero_ps();
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (int i = 0; i < hd; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(qh + i), absmask));
        const float amax = ek_hmax256(mx);
        if (!(amax <= 3.4e38f)) return -1; /* inf; NaN is caught by the scalar check below */
        for (int i = 0; i < hd; i++)
            if (qh[i] != qh[i]) return -1;
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        qi->scale[h] = amax > 0.0f ? amax / 127.0f : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i ints[8 * QI_MAX_UNITS]; /* 8 values each */
        for (int b = 0; b < hd / 8; b++) ints[b] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(qh + 8 * b), vid));
        for (int k = 0; k < hd / g; k++) {
            __m256i sum = _mm256_setzero_si256();
            for (int b = k * g / 8; b < (k + 1) * g / 8; b++) sum = _mm256_add_epi32(sum, ints[b]);
            qi->qsum[h][k] = (float)ek_hsum256_epi32(sum);
        }
        for (int u = 0; u < hd / 64; u++) {
            __m256i q32[2]; /* values 64u .. +31 and +32 .. +63 as bytes, in order */
            for (int c = 0; c < 2; c++) {
                const __m256i *x = ints + 8 * u + 4 * c;
                const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(x[0], x[1]), _mm256_packs_epi32(x[2], x[3]));
                q32[c] = _mm256_permutevar8x32_epi32(p, order);
                _mm256_storeu_si256((__m256i *)&qi->q8[h][64 * u + 32 * c], q32[c]);
            }
            if (qorder == EK_QORDER_NIBBLE) {
                qi->qa[h][u] = _mm256_permute2x128_si256(q32[0], q32[1], 0x20);
                qi->qb[h][u] = _mm256_permute2x128_si256(q32[0], q32[1], 0x31);
            } else {
                const __m256i lo = _mm256_unpacklo_epi64(q32[0], q32[1]), hi = _mm256_unpackhi_epi64(q32[0], q32[1]);
                qi->qa[h][u] = _mm256_permute2x128_si256(lo, hi, 0x20);
                qi->qb[h][u] = _mm256_permute2x128_si256(lo, hi, 0x31);
            }
        }
    }
    return 0;
}

/* One unit's codes (x0, x1 from unpack_unit) dotted with the int8 query's two registers for that
 * unit: u8 x s8 products summed per 4-byte lane over both pairs, as 8 int32 (codes <= 63, so the
 * plain-AVX2 fallback of ek_dpbusd stays exact) */
EK_INLINE __m256i unit_dot_query(__m256i u0, __m256i q0, __m256i u1, __m256i q1) {
    return ek_dpbusd(ek_dpbusd(_mm256_setzero_si256(), u0, q0), u1, q1);
}

/* Unit u (64 values) of a 6-, 4-, 3- or 2-bit record's codes as the two registers qi8_prepare ordered
 * the query for. */
EK_INLINE void unpack_unit(const uint8_t *r, int u, __m256i *x0, __m256i *x1, const int bits) {
    if (bits == 4) {
        const __m256i t = _mm256_loadu_si256((const __m256i *)(r + 32 * u)), k = _mm256_set1_epi8(0x0f);
        *x0 = _mm256_and_si256(t, k);
        *x1 = _mm256_and_si256(_mm256_srli_epi16(t, 4), k);
        return;
    }
    if (bits == 6) { /* chunks of 24 bytes: 16 of low nibbles (the 4-bit order), 8 of bits 4-5 (2-bit layout) */
        const uint8_t *c0 = r + 48 * u, *c1 = c0 + 24;
        const __m256i t = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)c1), _mm_loadu_si128((const __m128i *)c0));
        const __m256i k = _mm256_set1_epi8(0x0f);
        /* x0 byte p of lane L (chunk L) is value p of the chunk: crumb p / 8 of high byte p % 8; x1: crumb 2 + p / 8 */
        const __m128i h = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)(c0 + 16)), _mm_loadl_epi64((const __m128i *)(c1 + 16)));
        const __m128i k3 = _mm_set1_epi8(3);
        const __m128i s0 = _mm_and_si128(h, k3), s1 = _mm_and_si128(_mm_srli_epi16(h, 2), k3);
        const __m128i s2 = _mm_and_si128(_mm_srli_epi16(h, 4), k3), s3 = _mm_and_si128(_mm_srli_epi16(h, 6), k3);
        const __m256i h0 = _mm256_set_m128i(_mm_unpackhi_epi64(s0, s1), _mm_unpacklo_epi64(s0, s1));
        const __m256i h1 = _mm256_set_m128i(_mm_unpackhi_epi64(s2, s3), _mm_unpacklo_epi64(s2, s3));
        *x0 = _mm256_or_si256(_mm256_and_si256(t, k), _mm256_slli_epi16(h0, 4));
        *x1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(t, 4), k), _mm256_slli_epi16(h1, 4));
        return;
    }
    __m128i t;
    if (bits == 3) /* the two chunks' low-bit bytes, as one 2-bit unit */
        t = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)(r + 24 * u)),
                               _mm_loadl_epi64((const __m128i *)(r + 24 * u + 12)));
    else
        t = _mm_loadu_si128((const __m128i *)(r + 16 * u));
    const __m128i k = _mm_set1_epi8(3);
    *x0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(t, 2), k), _mm_and_si128(t, k));
    *x1 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(t, 6), k), _mm_and_si128(_mm_srli_epi16(t, 4), k));
    if (bits == 3) {
        /* mask bytes 0-3: values 0-31 (chunk 0), 4-7: values 32-63; byte p of x0 holds value
         * 8L + b (b < 8) or 40 + 8L + (b - 8) for lane L, b = p % 16 (x1: 16 more), so it reads
         * mask byte L or 4 + L (x1: 2 + L, 6 + L), bit b % 8 */
        uint32_t m0, m1;
        memcpy(&m0, r + 24 * u + 8, 4);
        memcpy(&m1, r + 24 * u + 20, 4);
        const __m256i m = _mm256_set1_epi64x((long long)((uint64_t)m0 | (uint64_t)m1 << 32));
        const __m256i sel0 = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4,
                                              1, 1, 1, 1, 1, 1, 1, 1, 5, 5, 5, 5, 5, 5, 5, 5);
        const __m256i sel1 = _mm256_add_epi8(sel0, _mm256_set1_epi8(2));
        const __m256i bit = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128,
                                             1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
        const __m256i four = _mm256_set1_epi8(4);
        const __m256i h0 = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(m, sel0), bit), bit);
        const __m256i h1 = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(m, sel1), bit), bit);
        *x0 = _mm256_or_si256(*x0, _mm256_and_si256(h0, four));
        *x1 = _mm256_or_si256(*x1, _mm256_and_si256(h1, four));
    }
}

/* sc[h*ATTN_CHUNK + j] for n records of `stride` bytes from `base`, G query heads (a constant, so
 * the accumulators live in registers); tmp: G*ATTN_CHUNK*8 floats */
/* One group per record (group == head_dim): integer dot products per record, the record's scale
 * and minimum applied to four records at a time after the horizontal sums. */
EK_INLINE void score_tile_q1_g(const qi8_query *qi, const uint8_t *base, size_t stride, int n, int hd,
                               float *sc, int32_t *tmp, const int G, const int bits) {
    const int units = hd / 64;
    float dv[ATTN_CHUNK + 3], mv[ATTN_CHUNK + 3];
    for (int j = 0; j < n; j++) {
        const uint8_t *r = base + (size_t)j * stride;
        const ek_fp16 *dm = (const ek_fp16 *)(r + (size_t)hd * bits / 8);
        prefetch_ahead(r, stride);
        dv[j] = ek_h2f(dm[0]);
        mv[j] = ek_h2f(dm[1]);
        __m256i acc[QI_MAX_GS];
        for (int h = 0; h < G; h++) acc[h] = _mm256_setzero_si256();
        for (int u = 0; u < units; u++) {
            __m256i x0, x1;
            unpack_unit(r, u, &x0, &x1, bits);
            for (int h = 0; h < G; h++) acc[h] = _mm256_add_epi32(acc[h], unit_dot_query(x0, qi->qa[h][u], x1, qi->qb[h][u]));
        }
        for (int h = 0; h < G; h++) _mm256_storeu_si256((__m256i *)(tmp + ((size_t)h * ATTN_CHUNK + j) * 8), acc[h]);
    }
    for (int h = 0; h < G; h++) {
        const int32_t *t = tmp + (size_t)h * ATTN_CHUNK * 8;
        float *out = sc + (size_t)h * ATTN_CHUNK;
        const __m128 s = _mm_set1_ps(qi->scale[h]), qs = _mm_set1_ps(qi->qsum[h][0]);
        int j = 0;
        for (; j + 4 <= n; j += 4) { /* int sums of 4 records, then s * (d * sum + m * sum(q8)) */
            const __m256i s01 = _mm256_hadd_epi32(_mm256_loadu_si256((const __m256i *)(t + 8 * j)),
                                                  _mm256_loadu_si256((const __m256i *)(t + 8 * j + 8)));
            const __m256i s23 = _mm256_hadd_epi32(_mm256_loadu_si256((const __m256i *)(t + 8 * j + 16)),
                                                  _mm256_loadu_si256((const __m256i *)(t + 8 * j + 24)));
            const __m256i v = _mm256_hadd_epi32(s01, s23);
            const __m128 i4 = _mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
            const __m128 sc4 = _mm_fmadd_ps(i4, _mm_loadu_ps(dv + j), _mm_mul_ps(_mm_loadu_ps(mv + j), qs));
            _mm_storeu_ps(out + j, _mm_mul_ps(sc4, s));
        }
        for (; j < n; j++) {
            const float isum = (float)ek_hsum256_epi32(_mm256_loadu_si256((const __m256i *)(t + 8 * j)));
            out[j] = (isum * dv[j] + mv[j] * qi->qsum[h][0]) * qi->scale[h];
        }
    }
}

EK_INLINE void score_tile_q_g(const qi8_query *qi, const uint8_t *base, size_t stride, int n, int hd, int g,
                              float *sc, float *tmp, const int G, const int bits, const int qorder) {
    const int units = hd / 64, ng = hd / g;
    if (ng == 1) {
        score_tile_q1_g(qi, base, stride, n, hd, sc, (int32_t *)tmp, G, bits);
        return;
    }
    float mt[QI_MAX_GS * ATTN_CHUNK];
    int g0[QI_MAX_UNITS], g1[QI_MAX_UNITS]; /* group of each unit's two chunks (no division per record) */
    for (int u = 0; u < units; u++) {
        g0[u] = 64 * u / g;
        g1[u] = (64 * u + 32) / g;
    }
    for (int j = 0; j < n; j++) {
        const uint8_t *r = base + (size_t)j * stride;
        const ek_fp16 *dm = (const ek_fp16 *)(r + (size_t)hd * bits / 8);
        prefetch_ahead(r, stride);
        __m256 acc[QI_MAX_GS];
        for (int h = 0; h < G; h++) acc[h] = _mm256_setzero_ps();
        for (int u = 0; u < units; u++) {
            __m256i x0, x1;
            unpack_unit(r, u, &x0, &x1, bits);
            const __m256 d0 = _mm256_set1_ps(ek_h2f(dm[g0[u]])), d1 = _mm256_set1_ps(ek_h2f(dm[g1[u]]));
            /* int32 lane -> chunk: nibble order lanes 0-3 first chunk, 4-7 second; crumb order 0,1,4,5 / 2,3,6,7 */
            const __m256 dv = qorder == EK_QORDER_NIBBLE ? _mm256_blend_ps(d0, d1, 0xF0) : _mm256_blend_ps(d0, d1, 0xCC);
            for (int h = 0; h < G; h++)
                acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(unit_dot_query(x0, qi->qa[h][u], x1, qi->qb[h][u])), dv, acc[h]);
        }
        for (int h = 0; h < G; h++) _mm256_storeu_ps(tmp + ((size_t)h * ATTN_CHUNK + j) * 8, acc[h]);
        for (int k = 0; k < ng; k++) {
            const float m = ek_h2f(dm[ng + k]);
            for (int h = 0; h < G; h++) mt[h * ATTN_CHUNK + j] = (k ? mt[h * ATTN_CHUNK + j] : 0.0f) + m * qi->qsum[h][k];
        }
    }
    for (int h = 0; h < G; h++) {
        const float *t = tmp + (size_t)h * ATTN_CHUNK * 8, *mh = mt + h * ATTN_CHUNK;
        float *out = sc + (size_t)h * ATTN_CHUNK;
        const __m128 s = _mm_set1_ps(qi->scale[h]);
        int j = 0;
        for (; j + 4 <= n; j += 4) {
            const __m256 s01 = _mm256_hadd_ps(_mm256_loadu_ps(t + 8 * j), _mm256_loadu_ps(t + 8 * j + 8));
            const __m256 s23 = _mm256_hadd_ps(_mm256_loadu_ps(t + 8 * j + 16), _mm256_loadu_ps(t + 8 * j + 24));
            const __m256 v = _mm256_hadd_ps(s01, s23);
            const __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            _mm_storeu_ps(out + j, _mm_mul_ps(_mm_add_ps(r4, _mm_loadu_ps(mh + j)), s));
        }
        for (; j < n; j++) out[j] = (ek_hsum256(_mm256_loadu_ps(t + 8 * j)) + mh[j]) * qi->scale[h];
    }
}

/* The AVX2 key-scoring kernels the table's rows name (kv_types.c): the template above at one
 * precision's bits and int8-query order. */
#define SCORE_Q(G) score_tile_q_g(qi, base, stride, n, hd, g, sc, tmp, G, BITS, QORDER)
#define SCORE_KERNEL(NAME, B, Q)                                                                                   \
    void NAME(const qi8_query *qi, const uint8_t *base, size_t stride, int n, int hd, int g, int gs, float *sc,     \
              float *tmp) {                                                                                       \
        enum { BITS = B, QORDER = Q };                                                                            \
        EK_DISPATCH_GS(gs, SCORE_Q)                                                                               \
    }
SCORE_KERNEL(ek_kv_score_q4_avx2, 4, EK_QORDER_NIBBLE)
SCORE_KERNEL(ek_kv_score_q3_avx2, 3, EK_QORDER_CRUMB)
SCORE_KERNEL(ek_kv_score_q2_avx2, 2, EK_QORDER_CRUMB)
SCORE_KERNEL(ek_kv_score_q6_avx2, 6, EK_QORDER_NIBBLE)
#undef SCORE_KERNEL
#undef SCORE_Q

/* ---- quantized values, dequantized in registers ---------------------------------------------
 * o[h] += sum_j w[h][j] * (d_j * u_j + m_j) computed as sum_j (w[h][j] * d_j) * u_j plus
 * (sum_j w[h][j] * m_j) added once per group: the codes u_j go from bytes to floats in
 * registers and feed the FMAs directly (no dequantized tile). */

/* G heads, CB column blocks of 8 per pass (G * CB <= 12 accumulators in registers) */
EK_INLINE void accum_tile_q_g(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, float *o,
                              const int G, const int CB, const int bits) {
    const int ng = hd / g;
    /* per group k and record j: scale and minimum; then w * d per (head, group, record) and the sum
     * of w * m per (head, group), as vector operations over the records */
    float dv[8][ATTN_CHUNK] __attribute__((aligned(32))), mv[8][ATTN_CHUNK] __attribute__((aligned(32)));
    float wd[QI_MAX_GS * 8 * ATTN_CHUNK] __attribute__((aligned(32))), msum[QI_MAX_GS][8];
    for (int j = 0; j < n; j++) {
        const ek_fp16 *dm = (const ek_fp16 *)(base + (size_t)j * stride + (size_t)hd * bits / 8);
        for (int k = 0; k < ng; k++) {
            dv[k][j] = ek_h2f(dm[k]);
            mv[k][j] = ek_h2f(dm[ng + k]);
        }
    }
    for (int k = 0; k < ng; k++)
        for (int j = n; j < ATTN_CHUNK; j++) dv[k][j] = mv[k][j] = 0.0f; /* a partial tile: no stale values */
    float wl[ATTN_CHUNK] __attribute__((aligned(32)));
    for (int h = 0; h < G; h++) {
        for (int j = 0; j < ATTN_CHUNK; j++) wl[j] = j < n ? w[h * ATTN_CHUNK + j] : 0.0f; /* never read past n */
        for (int k = 0; k < ng; k++) {
            __m256 ms = _mm256_setzero_ps();
            for (int j = 0; j < ATTN_CHUNK; j += 8) {
                const __m256 wj = _mm256_load_ps(wl + j);
                _mm256_store_ps(wd + (h * 8 + k) * ATTN_CHUNK + j, _mm256_mul_ps(wj, _mm256_load_ps(&dv[k][j])));
                ms = _mm256_fmadd_ps(wj, _mm256_load_ps(&mv[k][j]), ms);
            }
            msum[h][k] = ek_hsum256(ms);
        }
    }
    for (int c = 0; c < hd / 32; c++) {
        const int k = 32 * c / g;
        for (int b0 = 0; b0 < 4; b0 += CB) {
            __m256 acc[8][4];
            for (int h = 0; h < G; h++)
                for (int b = 0; b < CB; b++) acc[h][b] = _mm256_setzero_ps();
            for (int j = 0; j < n; j++) {
                __m256 v[4];
                ek_kv_chunk_codes(base + (size_t)j * stride, c, v, bits);
                for (int h = 0; h < G; h++) {
                    const __m256 wj = _mm256_broadcast_ss(wd + (h * 8 + k) * ATTN_CHUNK + j);
                    for (int b = 0; b < CB; b++) acc[h][b] = _mm256_fmadd_ps(wj, v[b0 + b], acc[h][b]);
                }
            }
            for (int h = 0; h < G; h++)
                for (int b = 0; b < CB; b++) {
                    float *oh = o + (size_t)h * hd + 32 * c + 8 * (b0 + b);
                    _mm256_storeu_ps(oh, _mm256_add_ps(_mm256_loadu_ps(oh), _mm256_add_ps(acc[h][b], _mm256_set1_ps(msum[h][k]))));
                }
        }
    }
}

/* The AVX2 value-sum kernels the table's rows name (kv_types.c). */
#define ACC_Q(G) accum_tile_q_g(base, stride, n, hd, g, w, o, G, EK_CB(G), BITS)
#define VALUES_KERNEL(NAME, B)                                                                                    \
    void NAME(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o) {        \
        enum { BITS = B };                                                                                        \
        EK_DISPATCH_GS(gs, ACC_Q)                                                                                 \
    }
VALUES_KERNEL(ek_kv_values_q8_avx2, 8)
VALUES_KERNEL(ek_kv_values_q4_avx2, 4)
VALUES_KERNEL(ek_kv_values_q3_avx2, 3)
VALUES_KERNEL(ek_kv_values_q2_avx2, 2)
VALUES_KERNEL(ek_kv_values_q6_avx2, 6)
#undef VALUES_KERNEL
#undef ACC_Q

/* 1 if quantized values of this row and shape take the fused path */
static int fused_values_ok(const ek_kv_type *t, int hd, int gs) { return t->values_avx2 && hd <= 256 && gs <= QI_MAX_GS; }
#else
static void score_tile(const float *tile, int n, int hd, const float *q, int gs, float *sc) {
    for (int h = 0; h < gs; h++)
        for (int j = 0; j < n; j++) sc[(size_t)h * ATTN_CHUNK + j] = dotf(tile + (size_t)j * hd, q + (size_t)h * hd, hd);
}
static void accum_tile(const float *tile, int n, int hd, const float *w, int gs, float *o) {
    for (int j = 0; j < n; j++)
        for (int h = 0; h < gs; h++) axpyf(o + (size_t)h * hd, w[(size_t)h * ATTN_CHUNK + j], tile + (size_t)j * hd, hd);
}
#endif

/* max of x[0..n), n <= ATTN_CHUNK (-inf for n == 0; NaN is skipped, as by the comparison loop) */
static inline float row_max(const float *x, int n) {
#if defined(EK_AVX2)
    if (n == ATTN_CHUNK) {
        __m256 acc = _mm256_set1_ps(-INFINITY);
        for (int j = 0; j < ATTN_CHUNK; j += 8) acc = _mm256_max_ps(_mm256_loadu_ps(x + j), acc); /* a NaN x loses */
        return ek_hmax256(acc);
    }
#elif defined(EK_NEON_KV)
    if (n == ATTN_CHUNK) {
        float32x4_t acc = vdupq_n_f32(-INFINITY);
        for (int j = 0; j < ATTN_CHUNK; j += 4) acc = vmaxnmq_f32(acc, vld1q_f32(x + j)); /* maxNum: a NaN x loses */
        return vmaxnmvq_f32(acc);
    }
#endif
    float cm = -INFINITY;
    for (int j = 0; j < n; j++) cm = x[j] > cm ? x[j] : cm;
    return cm;
}

#if defined(EK_AVX512)
static int x512_values_ok(const ek_kv_type *t, int hd, int gs) { return t->values_x512 && ek_x512_values_shape_ok(hd, gs); }
#endif
/* A tile with no position inside a sliding window is not scored; its statistics scores are -inf. */
static int window_skips(const ek_attn_args *a, const ek_kv_pool *pool, int c0, int n) {
    for (int j = 0; j < n; j++)
        if (pool->pos[c0 + j] >= a->min_pos && pool->pos[c0 + j] <= a->max_pos) return 0;
    if (a->raw)
        for (int h = 0; h < a->gs; h++)
            for (int j = 0; j < n; j++)
                if (pool->pos[c0 + j] <= a->max_pos) a->raw[(size_t)h * a->s->n_ctx + pool->pos[c0 + j]] = -INFINITY;
    return 1;
}

void ek_attend_range(const ek_attn_args *a, const ek_kv_pool *pool, int j0, int j1, ek_attn_partial *part,
                     float *scratch) {
    const ek_kv_store *s = a->s;
    const int hd = s->head_dim, gs = a->gs;
    const ek_kv_type *kt = ek_kv_prec(pool->kp), *vt = ek_kv_prec(pool->vp);
    const int kg = s->group[pool->kp], vg = s->group[pool->vp];
    const float *q = pool->kp == KVP_F16 ? a->q : a->q_rot;
    float *o = pool->vp == KVP_F16 ? part->o_plain : part->o_rot;
    float *sc = scratch;                                  /* (gs, ATTN_CHUNK) scores, then weights */
    float *tile = scratch + (size_t)gs * ATTN_CHUNK;      /* (ATTN_CHUNK, head_dim) dequantized records */
    /* only new tokens can be in the future; a sliding window can leave out any pool's positions */
    const int masked_pool = (pool->kp == KVP_F16 && pool->vp == KVP_F16) || a->min_pos > 0;
    const unsigned span = (unsigned)(a->max_pos - a->min_pos); /* attended: pos - min_pos in [0, span] */
    /* centered keys (kv_store.h): each head's scores of this pool get q . c back */
    const float *kc = pool->kp != KVP_F16 ? ek_kv_center(s, a->layer, a->head) : NULL;
    float *kbias = scratch + (size_t)gs * ATTN_CHUNK + 2 * (size_t)ATTN_CHUNK * hd;
    if (kc)
        for (int h = 0; h < gs; h++) {
            float b = 0.0f;
            for (int i = 0; i < hd; i++) b += a->q[(size_t)h * hd + i] * kc[i];
            kbias[h] = b;
        }
#if defined(EK_AVX512)
    /* integer value sums go to o directly where the kernel's value order is the natural one, else
     * to o_perm (added into o at the end) */
    const int v512 = x512_values_ok(vt, hd, gs), v_perm = v512 && !ek_x512_values_in_order(vt->bits);
    float *o_perm = v_perm ? tile + (size_t)ATTN_CHUNK * hd : o;
    if (v_perm) memset(o_perm, 0, sizeof(float) * gs * hd);
#endif
    int use_int = 0; /* keys scored by the row's integer kernel */
#if defined(EK_AVX2)
    qi8_query qi;
    use_int = kt->score_avx2 && int_keys_ok(kt, hd, gs) && qi8_prepare(&qi, q, gs, hd, kt->qorder, kg) == 0;
#if defined(EK_AVX512)
    query512 qz __attribute__((aligned(64)));
    const int k512 = use_int && kt->score_x512 && ek_x512_keys_shape_ok(hd, kg, gs);
    if (k512) {
        ek_x512_prefetch_start(ek_kv_rec(s, pool, a->layer, a->head, j0), pool->rec_bytes, j1 - j0);
        ek_x512_query(&qi, hd, gs, kt->qorder, &qz);
    }
#endif
#endif
#if defined(EK_NEON_KV)
    ek_neon_query qn; /* the row's NEON kernel scores the keys (int8 rows: where the AVX2 one would) */
    const int int8 = kt->qorder != EK_QORDER_NONE;
    const int k_neon = kt->score_neon && ek_neon_keys_ok(hd, gs) && (!int8 || int_keys_ok(kt, hd, gs)) &&
                       ek_neon_query_prepare(&qn, q, gs, hd, kg, int8) == 0;
    use_int = k_neon && int8;
#endif
    /* no integer kernel here (another ISA, or a row without one): the same scores from the float path,
     * the query rounded to int8 and scaled back (a non-finite query stays as it is in both) */
    float q_i8[QI_MAX_GS * 64 * QI_MAX_UNITS];
    if (!use_int && int_keys_ok(kt, hd, gs) && ek_attn_query_rounded(q, gs, hd, q_i8) == 0) q = q_i8;

    for (int c0 = j0; c0 < j1; c0 += ATTN_CHUNK) {
        const int n = j1 - c0 < ATTN_CHUNK ? j1 - c0 : ATTN_CHUNK;
        if (a->min_pos > 0 && window_skips(a, pool, c0, n)) continue;
        float tmax[QI_MAX_GS]; /* each head's largest score, where the scoring kernel reports it */
        int have_tmax = 0;
        /* scores */
#if defined(EK_AVX2)
        if (use_int) {
            const uint8_t *base = ek_kv_rec(s, pool, a->layer, a->head, c0);
#if defined(EK_AVX512)
            if (k512) {
                kt->score_x512(&qi, &qz, base, pool->rec_bytes, n, hd, gs, sc, tmax);
                have_tmax = 1;
            } else
#endif
                kt->score_avx2(&qi, base, pool->rec_bytes, n, hd, kg, gs, sc, tile);
        } else
#endif
#if defined(EK_NEON_KV)
        if (k_neon)
            kt->score_neon(&qn, ek_kv_rec(s, pool, a->layer, a->head, c0), pool->rec_bytes, n, hd, kg, gs, sc);
        else
#endif
        {
            for (int j = 0; j < n; j++) {
                const uint8_t *r = ek_kv_rec(s, pool, a->layer, a->head, c0 + j);
#if defined(EK_AVX2)
                prefetch_ahead(r, pool->rec_bytes);
#endif
                kt->dequant(r, tile + (size_t)j * hd, hd, kg);
            }
            score_tile(tile, n, hd, q, gs, sc);
        }
        if (kc)
            for (int h = 0; h < gs; h++) {
                float *row = sc + h * ATTN_CHUNK;
                for (int j = 0; j < n; j++) row[j] += kbias[h];
                if (have_tmax) tmax[h] += kbias[h];
            }
        int n_masked = 0;
        if (masked_pool)
            for (int j = 0; j < n; j++)
                if ((unsigned)(pool->pos[c0 + j] - a->min_pos) > span) {
                    for (int h = 0; h < gs; h++) sc[h * ATTN_CHUNK + j] = -INFINITY;
                    n_masked++;
                }
        if (a->raw)
            for (int h = 0; h < gs; h++)
                for (int j = 0; j < n; j++)
                    if (pool->pos[c0 + j] <= a->max_pos) a->raw[(size_t)h * s->n_ctx + pool->pos[c0 + j]] = sc[h * ATTN_CHUNK + j];
        if (n_masked == n) continue;
        /* online softmax: rescale the running sums to the new max, turn scores into weights */
        for (int h = 0; h < gs; h++) {
            float *row = sc + h * ATTN_CHUNK;
            const float cm = have_tmax && !n_masked ? tmax[h] : row_max(row, n); /* tmax saw masked scores too */
            const float c = rebase(part, h, cm > part->m[h] ? cm : part->m[h], hd); /* cm is never NaN */
#if defined(EK_AVX512)
            if (v_perm && c != 1.0f) scalef(o_perm + (size_t)h * hd, c, hd);
#else
            (void)c;
#endif
            part->l[h] += ek_exp_shift(row, n, part->m[h]);
            if (n_masked) /* exp(-inf) came out as a denormal-sized number: make it exactly 0 */
                for (int j = 0; j < n; j++)
                    if ((unsigned)(pool->pos[c0 + j] - a->min_pos) > span) row[j] = 0.0f;
        }
        /* weighted values */
#if defined(EK_AVX512)
        if (v512 && vt->values_x512(ek_kv_rec(s, pool, a->layer, a->head, c0) + pool->k_bytes, pool->rec_bytes, n, hd, vg,
                                     sc, gs, o_perm) == 0)
            continue;
#endif
#if defined(EK_AVX2)
        if (fused_values_ok(vt, hd, gs)) {
            vt->values_avx2(ek_kv_rec(s, pool, a->layer, a->head, c0) + pool->k_bytes, pool->rec_bytes, n, hd, vg, sc, gs,
                            o);
            continue;
        }
#endif
#if defined(EK_NEON_KV)
        if (vt->values_neon && ek_neon_values_ok(hd, gs)) {
            vt->values_neon(ek_kv_rec(s, pool, a->layer, a->head, c0) + pool->k_bytes, pool->rec_bytes, n, hd, vg, sc, gs, o);
            continue;
        }
#endif
        for (int j = 0; j < n; j++)
            vt->dequant(ek_kv_rec(s, pool, a->layer, a->head, c0 + j) + pool->k_bytes, tile + (size_t)j * hd, hd, vg);
        accum_tile(tile, n, hd, sc, gs, o);
    }
#if defined(EK_AVX512)
    if (v_perm) ek_x512_values_unpermute(o_perm, o, gs, hd, vt->bits);
#endif
}

int ek_attn_int_keys(int kp, int head_dim, int gs) { return kp >= 0 && kp < KVP_COUNT && int_keys_ok(ek_kv_prec(kp), head_dim, gs); }

int ek_attn_values_x512(int vp, int head_dim, int gs) {
#if defined(EK_AVX512)
    return vp >= 0 && vp < KVP_COUNT && x512_values_ok(ek_kv_prec(vp), head_dim, gs);
#else
    (void)vp, (void)head_dim, (void)gs;
    return 0;
#endif
}

void ek_attend_all(const ek_attn_args *a, ek_attn_partial *part, float *scratch) {
    const ek_kv_map *mp = ek_kv_map_of(a->s, a->layer); /* layer l reads only its own map */
    for (int p = 0; p < KV_NPOOLS; p++) {
        const ek_kv_pool *pool = &mp->pools[p];
        if (pool->n) ek_attend_range(a, pool, 0, pool->n, part, scratch);
    }
}
