#include "kv_attention.h"

#include <math.h>
#include <string.h>

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

/* exp(x) for x <= 0: 2^n * p(r), relative error < 2e-7 (Cephes polynomial) */
static inline __m256 exp_neg_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

float ek_exp_shift(float *x, int n, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_neg_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = ek_hsum256(acc);
    if (i < n) { /* the tail through the same polynomial, so results do not depend on where tiles end */
        float t[8];
        const int r = n - i;
        for (int k = 0; k < 8; k++) t[k] = k < r ? x[i + k] - m : 0.0f;
        _mm256_storeu_ps(t, exp_neg_avx2(_mm256_loadu_ps(t)));
        for (int k = 0; k < r; k++) {
            x[i + k] = t[k];
            sum += t[k];
        }
    }
    return sum;
}

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
float ek_exp_shift(float *x, int n, float m) { return exp_shift_ref(x, n, m); }
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
size_t ek_attn_scratch_floats(int gs, int head_dim) { return (size_t)gs * ATTN_CHUNK + 2 * (size_t)ATTN_CHUNK * head_dim; }

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

/* Rescale head h of a partial to a new running max. */
static inline void rebase(ek_attn_partial *p, int h, float m_new, int hd) {
    if (p->m[h] == m_new) return;
    const float c = p->m[h] == -INFINITY ? 0.0f : expf(p->m[h] - m_new);
    p->l[h] *= c;
    scalef(p->o_plain + (size_t)h * hd, c, hd);
    scalef(p->o_rot + (size_t)h * hd, c, hd);
    p->m[h] = m_new;
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
/* the fused kernel                                                           */
/* ------------------------------------------------------------------------- */

#if defined(EK_AVX2)
#define EK_INLINE static inline __attribute__((always_inline))

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

/* o[h] += sum_j w[h][j] * tile[j], accumulators for G heads held in registers */
EK_INLINE void accum_tile_g(const float *tile, int n, int hd, const float *w, float *o, const int G) {
    for (int i = 0; i < hd; i += 8) {
        __m256 acc[8];
        for (int h = 0; h < G; h++) acc[h] = _mm256_setzero_ps();
        for (int j = 0; j < n; j++) {
            const __m256 v = _mm256_loadu_ps(tile + (size_t)j * hd + i);
            for (int h = 0; h < G; h++)
                acc[h] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + (size_t)h * ATTN_CHUNK + j), v, acc[h]);
        }
        for (int h = 0; h < G; h++) {
            float *oh = o + (size_t)h * hd + i;
            _mm256_storeu_ps(oh, _mm256_add_ps(_mm256_loadu_ps(oh), acc[h]));
        }
    }
}

static void accum_tile(const float *tile, int n, int hd, const float *w, int gs, float *o) {
    switch (gs) { /* constant head counts let the compiler keep acc[] in registers */
    case 1: accum_tile_g(tile, n, hd, w, o, 1); break;
    case 2: accum_tile_g(tile, n, hd, w, o, 2); break;
    case 3: accum_tile_g(tile, n, hd, w, o, 3); break;
    case 4: accum_tile_g(tile, n, hd, w, o, 4); break;
    case 5: accum_tile_g(tile, n, hd, w, o, 5); break;
    case 6: accum_tile_g(tile, n, hd, w, o, 6); break;
    case 7: accum_tile_g(tile, n, hd, w, o, 7); break;
    case 8: accum_tile_g(tile, n, hd, w, o, 8); break;
    default:
        for (int h = 0; h < gs; h += 8) {
            const int g = gs - h < 8 ? gs - h : 8;
            for (int k = 0; k < g; k++) /* rare: more than 8 query heads per KV head */
                for (int j = 0; j < n; j++) axpyf(o + (size_t)(h + k) * hd, w[(size_t)(h + k) * ATTN_CHUNK + j], tile + (size_t)j * hd, hd);
        }
    }
}
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

void ek_attend_range(const ek_attn_args *a, const ek_kv_pool *pool, int j0, int j1, ek_attn_partial *part,
                     float *scratch) {
    const ek_kv_store *s = a->s;
    const int hd = s->head_dim, gs = a->gs;
    const ek_kv_prec_traits *kt = ek_kv_prec(pool->kp), *vt = ek_kv_prec(pool->vp);
    const int kg = s->group[pool->kp], vg = s->group[pool->vp];
    const float *q = pool->kp == KVP_F16 ? a->q : a->q_rot;
    float *o = pool->vp == KVP_F16 ? part->o_plain : part->o_rot;
    float *sc = scratch;                                  /* (gs, ATTN_CHUNK) scores, then weights */
    float *tile = scratch + (size_t)gs * ATTN_CHUNK;      /* (ATTN_CHUNK, head_dim) dequantized records */
    const int masked_pool = pool->kp == KVP_F16 && pool->vp == KVP_F16; /* only new tokens can be in the future */

    for (int c0 = j0; c0 < j1; c0 += ATTN_CHUNK) {
        const int n = j1 - c0 < ATTN_CHUNK ? j1 - c0 : ATTN_CHUNK;
        /* scores */
        for (int j = 0; j < n; j++) kt->dequant(ek_kv_rec(s, pool, a->layer, a->head, c0 + j), tile + (size_t)j * hd, hd, kg);
        score_tile(tile, n, hd, q, gs, sc);
        int n_masked = 0;
        if (masked_pool)
            for (int j = 0; j < n; j++)
                if (pool->pos[c0 + j] > a->max_pos) {
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
            float cm = -INFINITY;
            for (int j = 0; j < n; j++) cm = row[j] > cm ? row[j] : cm;
            rebase(part, h, fmaxf(part->m[h], cm), hd);
            part->l[h] += ek_exp_shift(row, n, part->m[h]);
            if (n_masked) /* exp(-inf) came out as a denormal-sized number: make it exactly 0 */
                for (int j = 0; j < n; j++)
                    if (pool->pos[c0 + j] > a->max_pos) row[j] = 0.0f;
        }
        /* weighted values */
        for (int j = 0; j < n; j++)
            vt->dequant(ek_kv_rec(s, pool, a->layer, a->head, c0 + j) + pool->k_bytes, tile + (size_t)j * hd, hd, vg);
        accum_tile(tile, n, hd, sc, gs, o);
    }
}

void ek_attend_all(const ek_attn_args *a, ek_attn_partial *part, float *scratch) {
    for (int p = 0; p < KV_NPOOLS; p++) {
        const ek_kv_pool *pool = &a->s->pools[p];
        if (pool->n) ek_attend_range(a, pool, 0, pool->n, part, scratch);
    }
}
