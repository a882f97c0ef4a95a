/* Entry points for tests and benchmarks only (edgekv_testing.h): kernels called directly on
 * caller-supplied data, what the build's attention kernels round, and timings. The model never
 * calls them. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "edgekv_testing.h"
#include "kv_attention.h"
#include "kv_attention_x512.h"
#include "kv_store.h"
#include "model.h"
#include "quant.h"
#include "threadpool.h"

/* ------------------------------------------------------------------------- */
/* weight kernels                                                             */
/* ------------------------------------------------------------------------- */

int ek_matmul(int type, const void *w, int64_t n_in, int64_t n_out, const float *x, int n_tok, float *out,
              int impl) {
    const ek_type_traits *t = ek_type_get(type);
    if (!t || !w || !x || !out || n_tok <= 0 || n_out <= 0 || ek_row_bytes(type, n_in) == 0 || impl < 0 || impl > 3)
        return EK_ERR_INVALID;
    const ek_x8_traits *x8 = ek_x8_get(type);
    if (impl >= 2 && !x8) return EK_ERR_INVALID;
    const size_t stride = ek_act_row_bytes(type, (int)n_in);
    const size_t rb = ek_row_bytes(type, n_in);
    void *act = malloc(stride * (size_t)n_tok);
    /* x8: the leading multiple of 8 rows interleaved, the rest row by row (as the model does) */
    const int64_t n8 = impl >= 2 ? n_out / EK_X8 * EK_X8 : 0;
    void *packed = n8 ? malloc(rb * (size_t)n8) : NULL;
    if (!act || (n8 && !packed)) {
        free(act);
        free(packed);
        return EK_ERR_NOMEM;
    }
    for (int i = 0; i < n_tok; i++) ek_quantize_act_row(type, x + (size_t)i * n_in, (char *)act + (size_t)i * stride, (int)n_in);
    const ek_dot_x8_fn dot8 = !n8 ? NULL : impl == 3 || !x8->dot ? x8->dot_ref : x8->dot;
    for (int64_t r = 0; r < n8; r += EK_X8) {
        const size_t off = (size_t)r * rb;
        x8->repack((const char *)w + off, rb, (char *)packed + off, (int)n_in);
        const int max_nx = dot8 == x8->dot ? x8->max_nx : EK_X8_MAX_NX; /* the reference takes any */
        for (int i = 0; i < n_tok; i += max_nx) {
            const int nt = n_tok - i < max_nx ? n_tok - i : max_nx;
            float o[EK_X8_MAX_NX * EK_X8];
            dot8((int)n_in, (const char *)packed + off, (const char *)act + (size_t)i * stride, stride, nt, o);
            for (int k = 0; k < nt; k++)
                for (int j = 0; j < EK_X8; j++) out[(size_t)(i + k) * n_out + r + j] = o[k * EK_X8 + j];
        }
    }
    ek_dot_fn dot = impl == 0 || impl == 3 ? t->dot_ref : t->dot;
    for (int64_t r = n8; r < n_out; r++) {
        int i = 0;
        float o[4];
        for (; i + 4 <= n_tok; i += 4) {
            dot((int)n_in, (const char *)w + (size_t)r * rb, (const char *)act + (size_t)i * stride, stride, 4, o);
            for (int k = 0; k < 4; k++) out[(size_t)(i + k) * n_out + r] = o[k];
        }
        for (; i < n_tok; i++) {
            dot((int)n_in, (const char *)w + (size_t)r * rb, (const char *)act + (size_t)i * stride, stride, 1, o);
            out[(size_t)i * n_out + r] = o[0];
        }
    }
    free(packed);
    free(act);
    return EK_OK;
}

/* ------------------------------------------------------------------------- */
/* KV records and attention                                                   */
/* ------------------------------------------------------------------------- */

int ek_kv_quant_roundtrip(int bits, const float *x, int n, int g, float *y, int impl) {
    const int p = ek_kv_prec_from_bits(bits);
    if (p < 0 || n <= 0 || n > 1024 || n % 32 || (p != KVP_F16 && (g < 32 || g % 32 || n % g))) return EK_ERR_INVALID;
    if (impl & ~(EK_RT_SIMD | EK_RT_FIT)) return EK_ERR_INVALID;
    uint8_t rec[4096];
    const ek_kv_type *t = ek_kv_prec(p);
    t->quantize(x, rec, n, g, impl & EK_RT_FIT);
    (impl & EK_RT_SIMD ? t->dequant : t->dequant_ref)(rec, y, n, g);
    return EK_OK;
}

int ek_kv_attention_test(const float *q, int gs, const float *k, const float *v, const int32_t *k_bits,
                         const int32_t *v_bits, int n_pos, int head_dim, int group, int flags, float *out,
                         float *k_deq, float *v_deq, float *q_key) {
    if (gs <= 0 || n_pos <= 0 || head_dim <= 0 || head_dim % 32 || head_dim > 1024) return EK_ERR_INVALID;
    if (flags & ~EK_KV_FLAGS) return EK_ERR_INVALID;
    ek_kv_store s;
    if (ek_kv_store_init(&s, 1, 1, head_dim, n_pos)) return EK_ERR_NOMEM;
    int g[KVP_COUNT];
    ek_kv_group_sizes(head_dim, group, group, group, g);
    int rc = EK_ERR_INVALID;
    float *buf = NULL, *qs = NULL;
    if (ek_kv_store_configure(&s, g, flags & EK_KV_ROTATE, flags & EK_KV_CENTER_KEYS, flags & EK_KV_FIT_GRID)) goto done;
    for (int j = 0; j < n_pos; j++)
        if (ek_kv_prec_from_bits(k_bits[j]) < 0 || ek_kv_prec_from_bits(v_bits[j]) < 0) goto done;
    ek_kv_store_append(&s, n_pos);
    for (int j = 0; j < n_pos; j++) ek_kv_store_put(&s, 0, j, k + (size_t)j * head_dim, v + (size_t)j * head_dim);
    for (int j = 0; j < n_pos; j++)
        ek_kv_store_set_prec(&s, -1, j, ek_kv_prec_from_bits(k_bits[j]), ek_kv_prec_from_bits(v_bits[j]));
    rc = EK_ERR_NOMEM;
    buf = (float *)malloc(sizeof(float) * (ek_attn_scratch_floats(gs, head_dim) + ek_attn_partial_floats(gs, head_dim)));
    qs = (float *)malloc(sizeof(float) * 2 * (size_t)gs * head_dim);
    if (!buf || !qs) goto done;
    const float scale = 1.0f / sqrtf((float)head_dim);
    for (int i = 0; i < gs * head_dim; i++) qs[i] = qs[gs * head_dim + i] = q[i] * scale;
    if (s.rotate)
        for (int h = 0; h < gs; h++) ek_rotate(qs + (size_t)(gs + h) * head_dim, s.signs, head_dim);
    ek_attn_args a = {&s, 0, 0, gs, qs, qs + (size_t)gs * head_dim, n_pos - 1, NULL, 0};
    ek_attn_partial part;
    ek_attn_partial_init(&part, buf + ek_attn_scratch_floats(gs, head_dim), gs, head_dim);
    ek_attend_all(&a, &part, buf);
    ek_attn_finish(&part, &s, gs, out);
    if (k_deq && v_deq)
        for (int j = 0; j < n_pos; j++) ek_kv_store_get(&s, 0, j, k_deq + (size_t)j * head_dim, v_deq + (size_t)j * head_dim);
    if (q_key) /* per key precision, the query its keys were scored with (see ek_attend_range) */
        for (int p = 0; p < KVP_COUNT; p++) {
            float *dst = q_key + (size_t)p * gs * head_dim;
            if (p != KVP_F16 && ek_attn_int_keys(p, head_dim, gs) &&
                ek_attn_query_rounded(qs + (size_t)gs * head_dim, gs, head_dim, dst) == 0) {
                if (s.rotate)
                    for (int h = 0; h < gs; h++) ek_unrotate(dst + (size_t)h * head_dim, s.signs, head_dim);
            } else {
                memcpy(dst, qs, sizeof(float) * gs * head_dim);
            }
        }
    rc = EK_OK;
done:
    free(buf);
    free(qs);
    ek_kv_store_free(&s);
    return rc;
}

int ek_attn_value_tile(int v_bits, int head_dim, int gs) {
    return ek_attn_values_x512(ek_kv_prec_from_bits(v_bits), head_dim, gs) ? ATTN_CHUNK : 0;
}

int ek_attn_value_weight_max(int v_bits, int head_dim, int gs) {
#if defined(EK_AVX512)
    return ek_attn_values_x512(ek_kv_prec_from_bits(v_bits), head_dim, gs) ? ek_x512_weight_max(v_bits) : 0;
#else
    (void)v_bits, (void)head_dim, (void)gs;
    return 0;
#endif
}

/* ------------------------------------------------------------------------- */
/* benchmark entries                                                          */
/* ------------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint32_t xorshift(uint32_t *s) {
    *s ^= *s << 13; *s ^= *s >> 17; *s ^= *s << 5;
    return *s;
}
static float gauss(uint32_t *s) { /* sum of 4 uniforms: roughly normal, unit variance */
    float a = 0.0f;
    for (int i = 0; i < 4; i++) a += (float)xorshift(s) / 4294967296.0f;
    return (a - 2.0f) * 1.7320508f;
}

int ek_bench_fill_kv(ek_model *m, int n, int k_bits, int v_bits, uint32_t seed) {
    const int kp = ek_kv_prec_from_bits(k_bits), vp = ek_kv_prec_from_bits(v_bits);
    if (n <= 0 || n > m->cfg.n_ctx || kp < 0 || vp < 0) {
        snprintf(m->err, sizeof m->err, "bench fill: bad arguments");
        return EK_ERR_INVALID;
    }
    ek_truncate(m, 0);
    ek_kv_store_append(&m->seq->kv, n);
    uint32_t st = seed | 1u;
    float *k = m->k, *v = m->v;
    for (int pos = 0; pos < n; pos++) {
        for (int l = 0; l < m->cfg.n_layer; l++) {
            for (int i = 0; i < m->kv_dim; i++) { k[i] = gauss(&st); v[i] = gauss(&st); }
            ek_kv_store_put(&m->seq->kv, l, pos, k, v);
        }
        ek_kv_store_set_prec(&m->seq->kv, -1, pos, kp, vp);
    }
    m->seq->n_past = n;
    return EK_OK;
}

double ek_bench_attention(ek_model *m, int iters) {
    if (m->seq->n_past < 1 || iters < 1) return -1.0;
    uint32_t st = 12345u;
    for (int i = 0; i < m->q_dim; i++) m->q[i] = gauss(&st) / sqrtf((float)m->cfg.head_dim);
    memcpy(m->q_rot, m->q, sizeof(float) * m->q_dim);
    ek_seq *s = m->seq;
    if (s->kv.rotate)
        for (int h = 0; h < m->cfg.n_head; h++) ek_rotate(m->q_rot + h * m->cfg.head_dim, s->kv.signs, m->cfg.head_dim);
    const int saved = s->n_past, saved_stats = s->collect_stats;
    s->n_past = saved - 1; /* the query sits at the last position */
    s->collect_stats = 0;  /* the kernels alone (statistics are measured in decode) */
    double best[64];
    const int n_it = iters < 64 ? iters : 64;
    for (int it = 0; it < n_it; it++) {
        const double t0 = now_s();
        for (int l = 0; l < m->cfg.n_layer; l++) ek_model_attention(m, l, 1, m->xb);
        best[it] = now_s() - t0;
    }
    s->n_past = saved;
    s->collect_stats = saved_stats;
    /* median */
    for (int i = 1; i < n_it; i++)
        for (int j = i; j > 0 && best[j - 1] > best[j]; j--) { double t = best[j]; best[j] = best[j - 1]; best[j - 1] = t; }
    return best[n_it / 2];
}

#define BW_CHUNK (1 << 16) /* 64-bit words per claimed chunk (512 KiB) */

typedef struct {
    const uint64_t *buf;
    size_t n;
    uint64_t sink[64];
    atomic_int next;
} bw_ctx;

static void bw_task(void *p, int ith, int nth) {
    bw_ctx *c = (bw_ctx *)p;
    const int n_chunks = (int)(c->n / BW_CHUNK);
    uint64_t a = 0, b = 0, d = 0, e = 0;
    int k;
    while ((k = ek_claim(&c->next, n_chunks)) >= 0)
        for (size_t i = (size_t)k * BW_CHUNK; i < (size_t)(k + 1) * BW_CHUNK; i += 4) {
            a ^= c->buf[i]; b ^= c->buf[i + 1]; d ^= c->buf[i + 2]; e ^= c->buf[i + 3];
        }
    c->sink[ith % 64] ^= a ^ b ^ d ^ e;
}

double ek_bench_read_bandwidth(size_t n_bytes, int n_threads, int iters) {
    const size_t n = n_bytes / sizeof(uint64_t) / BW_CHUNK * BW_CHUNK;
    if (n == 0) return -1.0;
    uint64_t *buf = (uint64_t *)malloc(n * sizeof(uint64_t));
    ek_pool *pool = ek_pool_create(n_threads);
    if (!buf || !pool) { free(buf); if (pool) ek_pool_free(pool); return -1.0; }
    for (size_t i = 0; i < n; i++) buf[i] = i * 0x9E3779B97F4A7C15ull;
    bw_ctx c = {.buf = buf, .n = n};
    double best = 1e30;
    for (int it = 0; it < iters; it++) {
        atomic_init(&c.next, 0);
        const double t0 = now_s();
        ek_pool_run(pool, bw_task, &c);
        const double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    ek_pool_free(pool);
    free(buf);
    return (double)(n * sizeof(uint64_t)) / best;
}
