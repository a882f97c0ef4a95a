/* The model: borrowed weights, scratch buffers and the forward pass; the sequences (ek_seq: a
 * KV cache each) it runs (batched prefill and single-token decode share one code path; a decode
 * step is a batch of one, and a step of several sequences one batch of all their rows).
 *
 * forward() reads top to bottom, layer by layer:
 *   x = embed(tokens)
 *   (gemma3: x *= embd_scale)
 *   per layer: xb = rmsnorm(x); q,k,v = xb @ Wqkv (+bias); (qwen3, gemma3: rmsnorm each head of q,k)
 *              rope(q,k) (gemma3: sliding-window layers with their own base); cache(k,v)
 *              att = attention(q, cache) (sliding-window layers: the last swa_window positions)
 *              x += att @ Wo (gemma3: rmsnorm'd first)
 *              xb = rmsnorm(x); h = silu(xb @ Wgate) * (xb @ Wup) (gemma3: gelu); x += h @ Wdown
 *              (gemma3: rmsnorm'd first)
 *   logits = rmsnorm(x) @ Woutput
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgekv.h"
#include "kv_attention.h"
#include "kv_store.h"
#include "logit_stats.h"
#include "model.h"
#include "quant.h"
#include "simd.h"
#include "threadpool.h"

/* Decode attention runs each pool of each KV head as two halves (whole tiles; an empty half is
 * dropped): enough runs for two threads, each long (docs/decisions.md). The split depends on the
 * pools' sizes only, never on the thread count, so results do not either. */
static const int DECODE_PIECES[] = {8, 8}; /* sixteenths of a pool */
#define DECODE_NPIECES 2
/* Matmul rows per claimed chunk, for one token and batches alike: long runs per thread keep the
 * hardware prefetcher's streams (docs/decisions.md). */
#define MM_ROWS_CHUNK 64

static int fail(ek_model *m, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->err, sizeof m->err, fmt, ap);
    va_end(ap);
    return code;
}

int ek_abi_version(void) { return EK_ABI_VERSION; }
const char *ek_simd(void) { return ek_simd_name(); }
size_t ek_type_row_bytes(int type, int64_t n) { return ek_row_bytes(type, n); }
const char *ek_model_error(const ek_model *m) { return m->err; }
int ek_n_past(const ek_model *m) { return m->seq->n_past; }
int ek_n_ctx(const ek_model *m) { return m->cfg.n_ctx; }
size_t ek_kv_bytes_per_token(const ek_model *m) {
    return m->seq->kv.shared.pools[0].rec_bytes * m->cfg.n_layer * m->cfg.n_head_kv + sizeof(uint8_t) + sizeof(int32_t);
}
size_t ek_kv_bytes_used(const ek_model *m) { return ek_seq_kv_bytes_used(m->seq); }
ek_seq *ek_model_seq(ek_model *m) { return m->seq; }
int ek_seq_n_past(const ek_seq *s) { return s->n_past; }
size_t ek_seq_kv_bytes_used(const ek_seq *s) { return ek_kv_store_bytes(&s->kv); }

/* ------------------------------------------------------------------------- */
/* construction                                                               */
/* ------------------------------------------------------------------------- */

static int check_config(const ek_config *c, char *err, size_t err_len) {
#define REQUIRE(cond, ...)                                                                                    \
    if (!(cond)) {                                                                                            \
        if (err) snprintf(err, err_len, __VA_ARGS__);                                                        \
        return -1;                                                                                            \
    }
    REQUIRE(c->n_vocab > 0 && c->n_embd > 0 && c->n_layer > 0 && c->n_ff > 0,
            "config: n_vocab, n_embd, n_layer and n_ff must be positive");
    REQUIRE(c->n_head > 0 && c->n_head_kv > 0 && c->n_head % c->n_head_kv == 0,
            "config: n_head (%d) must be a positive multiple of n_head_kv (%d)", c->n_head, c->n_head_kv);
    REQUIRE(c->head_dim > 0 && c->head_dim % 8 == 0 && c->head_dim <= 1024,
            "config: head_dim (%d) must be a multiple of 8 and at most 1024", c->head_dim);
    REQUIRE(c->rope_dim >= 0 && c->rope_dim <= c->head_dim && c->rope_dim % 2 == 0,
            "config: rope_dim (%d) must be even and at most head_dim (%d)", c->rope_dim, c->head_dim);
    REQUIRE(c->n_ctx > 0 && c->n_ctx <= (1 << 22), "config: n_ctx (%d) must be in 1..4194304", c->n_ctx);
    REQUIRE(c->n_threads >= 1 && c->n_threads <= 256, "config: n_threads (%d) must be in 1..256", c->n_threads);
    REQUIRE(c->n_batch >= 1 && c->n_batch <= 8192, "config: n_batch (%d) must be in 1..8192", c->n_batch);
    REQUIRE(c->norm_eps > 0.0f && c->rope_base > 0.0f, "config: norm_eps and rope_base must be positive");
    REQUIRE(c->embd_scale >= 0.0f && c->attn_scale >= 0.0f && c->embd_scale < INFINITY && c->attn_scale < INFINITY,
            "config: embd_scale and attn_scale must be finite and not negative (0: off)");
    REQUIRE(c->swa_window >= 0 && (c->swa_window == 0 || (c->swa_period >= 1 && c->rope_base_swa > 0.0f)),
            "config: a sliding window (%d) needs swa_period >= 1 and a positive rope_base_swa", c->swa_window);
#undef REQUIRE
    return 0;
}

/* theta_i = pos * base^(-2i / rope_dim) / factor_i; factors: rope_freqs (Llama 3 scaling) or NULL. */
static void set_inv_freq(ek_model *m, const float *factors) {
    const ek_config *c = &m->cfg;
    for (int i = 0; i < c->rope_dim / 2; i++)
        m->inv_freq[i] =
            (float)(pow((double)c->rope_base, -2.0 * i / (double)c->rope_dim) / (factors ? factors[i] : 1.0));
    if (m->inv_freq_swa) /* sliding-window layers: their own base, never scaled (as llama.cpp) */
        for (int i = 0; i < c->rope_dim / 2; i++)
            m->inv_freq_swa[i] = (float)pow((double)c->rope_base_swa, -2.0 * i / (double)c->rope_dim);
}

/* Does layer l attend through the sliding window? (gemma3: all but every swa_period-th layer) */
static int layer_slides(const ek_config *c, int l) {
    return c->swa_window > 0 && l % c->swa_period != c->swa_period - 1;
}

ek_model *ek_model_create(const ek_config *cfg, char *err, size_t err_len) {
    if (check_config(cfg, err, err_len)) return NULL;
    ek_model *m = (ek_model *)calloc(1, sizeof(ek_model));
    if (!m) goto oom;
    m->cfg = *cfg;
    m->q_dim = cfg->n_head * cfg->head_dim;
    m->kv_dim = cfg->n_head_kv * cfg->head_dim;
    m->group = cfg->n_head / cfg->n_head_kv;
    m->layers = (ek_layer *)calloc((size_t)cfg->n_layer, sizeof(ek_layer));
    if (!m->layers) goto oom;

    const size_t B = (size_t)cfg->n_batch;
    const int wide = cfg->n_embd > m->q_dim ? cfg->n_embd : m->q_dim;
    int widest = wide > cfg->n_ff ? wide : cfg->n_ff;
    m->act_stride = (size_t)widest * sizeof(float); /* >= any activation row format */
    m->row_seq = (ek_seq **)malloc(B * sizeof(ek_seq *));
    m->row_pos = (int *)malloc(B * sizeof(int));
    m->x = (float *)malloc(B * cfg->n_embd * sizeof(float));
    m->xb = (float *)malloc(B * wide * sizeof(float));
    m->q = (float *)malloc(B * m->q_dim * sizeof(float));
    m->k = (float *)malloc(B * m->kv_dim * sizeof(float));
    m->v = (float *)malloc(B * m->kv_dim * sizeof(float));
    m->gate = (float *)malloc(B * cfg->n_ff * sizeof(float));
    m->up = (float *)malloc(B * cfg->n_ff * sizeof(float));
    m->proj = (float *)malloc(B * cfg->n_embd * sizeof(float));
    m->act = malloc(B * m->act_stride);
    m->rope_cos = (float *)malloc(B * (cfg->rope_dim / 2 + 1) * sizeof(float));
    m->rope_sin = (float *)malloc(B * (cfg->rope_dim / 2 + 1) * sizeof(float));
    m->inv_freq = (float *)malloc((cfg->rope_dim / 2 + 1) * sizeof(float));
    if (cfg->swa_window > 0) {
        m->rope_cos_swa = (float *)malloc(B * (cfg->rope_dim / 2 + 1) * sizeof(float));
        m->rope_sin_swa = (float *)malloc(B * (cfg->rope_dim / 2 + 1) * sizeof(float));
        m->inv_freq_swa = (float *)malloc((cfg->rope_dim / 2 + 1) * sizeof(float));
        if (!m->rope_cos_swa || !m->rope_sin_swa || !m->inv_freq_swa) goto oom;
    }
    m->attn_scale = cfg->attn_scale > 0.0f ? cfg->attn_scale : 1.0f / sqrtf((float)cfg->head_dim);
    const size_t T = (size_t)cfg->n_threads, C = (size_t)cfg->n_ctx;
    m->q_rot = (float *)malloc(B * m->q_dim * sizeof(float));
    m->logit_parts = (float *)malloc(3 * sizeof(float) * ((size_t)cfg->n_vocab / MM_ROWS_CHUNK + 1));
    m->raw = (float *)malloc((size_t)cfg->n_head * C * sizeof(float));
    m->th_raw = (float *)malloc(T * m->group * C * sizeof(float));
    m->th_stats = (double *)calloc(T * 3 * C, sizeof(double));
    m->th_scratch_floats = ek_attn_scratch_floats(m->group, cfg->head_dim) + ek_attn_partial_floats(m->group, cfg->head_dim);
    m->th_scratch = (float *)malloc(T * m->th_scratch_floats * sizeof(float));
    m->max_tasks = cfg->n_head_kv * KV_NPOOLS * DECODE_NPIECES;
    m->parts = (float *)malloc((size_t)m->max_tasks * ek_attn_partial_floats(m->group, cfg->head_dim) * sizeof(float));
    m->tasks = malloc((size_t)m->max_tasks * 4 * sizeof(int));
    if (!m->row_seq || !m->row_pos ||
        !m->x || !m->xb || !m->q || !m->k || !m->v || !m->gate || !m->up || !m->proj || !m->act || !m->rope_cos ||
        !m->rope_sin || !m->inv_freq || !m->q_rot || !m->logit_parts || !m->raw || !m->th_raw || !m->th_stats || !m->th_scratch ||
        !m->parts || !m->tasks)
        goto oom;
    set_inv_freq(m, NULL);
    m->pool = ek_pool_create(cfg->n_threads);
    if (!m->pool) goto oom;
    m->seq = ek_seq_create(m);
    if (!m->seq) goto oom;
    return m;
oom:
    if (err) snprintf(err, err_len, "out of memory allocating the model state (n_ctx=%d, n_batch=%d)", cfg->n_ctx,
                      cfg->n_batch);
    ek_model_free(m);
    return NULL;
}

/* packed == data: a packed copy borrowed from the caller (EK_TYPE_PACKED_X8), not ours to free */
static void mat_unpack(ek_mat *w) {
    if (w->packed != w->data) free(w->packed);
    w->packed = NULL;
}

static ek_mat *mat_of(ek_model *m, int kind, int layer);
static const int LAYER_MATRICES[] = {EK_T_ATTN_Q, EK_T_ATTN_K, EK_T_ATTN_V, EK_T_ATTN_O,
                                     EK_T_FFN_GATE, EK_T_FFN_UP, EK_T_FFN_DOWN};

void ek_model_free(ek_model *m) {
    if (!m) return;
    for (int l = 0; m->layers && l < m->cfg.n_layer; l++) /* the packed copies (the embedding never is) */
        for (size_t k = 0; k < sizeof LAYER_MATRICES / sizeof *LAYER_MATRICES; k++) mat_unpack(mat_of(m, LAYER_MATRICES[k], l));
    mat_unpack(&m->output);
    if (m->pool) ek_pool_free(m->pool);
    ek_seq_free(m->seq);
    free(m->layers);
    free(m->row_seq); free(m->row_pos);
    free(m->x); free(m->xb); free(m->q); free(m->k); free(m->v); free(m->gate); free(m->up); free(m->proj);
    free(m->act); free(m->rope_cos); free(m->rope_sin); free(m->inv_freq);
    free(m->rope_cos_swa); free(m->rope_sin_swa); free(m->inv_freq_swa);
    free(m->q_rot); free(m->logit_parts); free(m->raw); free(m->th_raw); free(m->th_stats); free(m->th_scratch); free(m->parts); free(m->tasks);
    free(m);
}

/* A new empty sequence; it takes the KV layout (groups, rotation, centering, fitting) of the
 * default sequence, so every sequence of a model stores records alike. */
ek_seq *ek_seq_create(ek_model *m) {
    const ek_config *c = &m->cfg;
    ek_seq *s = (ek_seq *)calloc(1, sizeof(ek_seq));
    if (!s || ek_kv_store_init(&s->kv, c->n_layer, c->n_head_kv, c->head_dim, c->n_ctx)) {
        free(s);
        fail(m, EK_ERR_NOMEM, "out of memory allocating a sequence (n_ctx=%d)", c->n_ctx);
        return NULL;
    }
    s->m = m;
    s->collect_stats = 1;
    if (m->seq) {
        const ek_kv_store *d = &m->seq->kv;
        ek_kv_store_configure(&s->kv, d->group, d->rotate, d->center, d->fit); /* valid: d holds it */
    }
    return s;
}

void ek_seq_free(ek_seq *s) {
    if (!s) return;
    ek_kv_store_free(&s->kv);
    free(s);
}

/* Interleave a matrix's rows 8 by 8 when this build has an x8 kernel for its type. */
int ek_x8_packs(int type, int64_t n_rows); /* weight_convert.c: this build has an x8 kernel for it */
static int mat_pack(ek_mat *w) {
    const ek_x8_traits *x8 = ek_x8_get(w->type);
    if (w->packed || !ek_x8_packs(w->type, w->n_out)) return EK_OK;
    const size_t group = EK_X8 * w->row_bytes; /* a multiple of 64 bytes for every packed type */
    w->packed = aligned_alloc(64, group * (size_t)(w->n_out / EK_X8));
    if (!w->packed) return EK_ERR_NOMEM;
    for (int64_t g = 0; g < w->n_out / EK_X8; g++)
        x8->repack((const char *)w->data + (size_t)g * group, w->row_bytes, (char *)w->packed + (size_t)g * group,
                   (int)w->n_in);
    return EK_OK;
}

/* The matrix slot of a tensor kind (NULL for vectors, a bad layer, or no matrix kind). */
static ek_mat *mat_of(ek_model *m, int kind, int layer) {
    ek_layer *L = layer >= 0 && layer < m->cfg.n_layer && m->layers ? &m->layers[layer] : NULL;
    switch (kind) {
    case EK_T_TOK_EMBD: return &m->tok_embd;
    case EK_T_OUTPUT: return &m->output; /* a tied output shares the embedding's bytes */
    case EK_T_ATTN_Q: return L ? &L->wq : NULL;
    case EK_T_ATTN_K: return L ? &L->wk : NULL;
    case EK_T_ATTN_V: return L ? &L->wv : NULL;
    case EK_T_ATTN_O: return L ? &L->wo : NULL;
    case EK_T_FFN_GATE: return L ? &L->w_gate : NULL;
    case EK_T_FFN_UP: return L ? &L->w_up : NULL;
    case EK_T_FFN_DOWN: return L ? &L->w_down : NULL;
    default: return NULL;
    }
}

/* What each tensor kind must look like: (n_in, n_out), whether it must be F32, whether per layer. */
static int expected_shape(const ek_model *m, int kind, int64_t *n_in, int64_t *n_out, int *f32_only,
                          int *per_layer) {
    const ek_config *c = &m->cfg;
    *f32_only = 0;
    *per_layer = 1;
    *n_out = 1;
    switch (kind) {
    case EK_T_TOK_EMBD: *n_in = c->n_embd; *n_out = c->n_vocab; *per_layer = 0; break;
    case EK_T_OUTPUT: *n_in = c->n_embd; *n_out = c->n_vocab; *per_layer = 0; break;
    case EK_T_OUTPUT_NORM: *n_in = c->n_embd; *f32_only = 1; *per_layer = 0; break;
    case EK_T_ATTN_NORM: case EK_T_FFN_NORM: *n_in = c->n_embd; *f32_only = 1; break;
    case EK_T_ATTN_POST_NORM: case EK_T_FFN_POST_NORM: *n_in = c->n_embd; *f32_only = 1; break;
    case EK_T_ATTN_Q: *n_in = c->n_embd; *n_out = m->q_dim; break;
    case EK_T_ATTN_K: case EK_T_ATTN_V: *n_in = c->n_embd; *n_out = m->kv_dim; break;
    case EK_T_ATTN_O: *n_in = m->q_dim; *n_out = c->n_embd; break;
    case EK_T_ATTN_Q_BIAS: *n_in = m->q_dim; *f32_only = 1; break;
    case EK_T_ATTN_K_BIAS: case EK_T_ATTN_V_BIAS: *n_in = m->kv_dim; *f32_only = 1; break;
    case EK_T_FFN_GATE: case EK_T_FFN_UP: *n_in = c->n_embd; *n_out = c->n_ff; break;
    case EK_T_FFN_DOWN: *n_in = c->n_ff; *n_out = c->n_embd; break;
    case EK_T_ATTN_Q_NORM: case EK_T_ATTN_K_NORM: *n_in = c->head_dim; *f32_only = 1; break;
    case EK_T_ROPE_FREQS: *n_in = c->rope_dim / 2; *f32_only = 1; *per_layer = 0; break;
    default: return -1;
    }
    return 0;
}

int ek_model_set_tensor(ek_model *m, int kind, int layer, int type, const void *data, int64_t n_in,
                        int64_t n_out, size_t n_bytes) {
    int64_t e_in, e_out;
    int f32_only, per_layer;
    if (m->finalized) return fail(m, EK_ERR_INVALID, "model is finalized; tensors can no longer be set");
    if (expected_shape(m, kind, &e_in, &e_out, &f32_only, &per_layer))
        return fail(m, EK_ERR_INVALID, "unknown tensor kind %d", kind);
    if (per_layer && (layer < 0 || layer >= m->cfg.n_layer))
        return fail(m, EK_ERR_INVALID, "tensor kind %d: layer %d out of range 0..%d", kind, layer, m->cfg.n_layer - 1);
    if (!data) return fail(m, EK_ERR_INVALID, "tensor kind %d: data is NULL", kind);
    const int borrow_packed = (type & EK_TYPE_PACKED_X8) != 0;
    type &= ~EK_TYPE_PACKED_X8;
    if (n_in != e_in || n_out != e_out)
        return fail(m, EK_ERR_INVALID, "tensor kind %d layer %d: shape (%lld, %lld), expected (%lld, %lld)", kind,
                    layer, (long long)n_in, (long long)n_out, (long long)e_in, (long long)e_out);
    const ek_type_traits *t = ek_type_get(type);
    if (!t) return fail(m, EK_ERR_INVALID, "tensor kind %d layer %d: type %d does not run natively", kind, layer, type);
    if (f32_only && type != EK_TYPE_F32)
        return fail(m, EK_ERR_INVALID, "tensor kind %d layer %d: norms and biases must be F32", kind, layer);
    size_t row_bytes = ek_row_bytes(type, n_in);
    if (row_bytes == 0)
        return fail(m, EK_ERR_INVALID, "tensor kind %d layer %d: %lld values per row is not a whole number of %s blocks",
                    kind, layer, (long long)n_in, t->name);
    if (n_bytes != row_bytes * (size_t)n_out)
        return fail(m, EK_ERR_INVALID, "tensor kind %d layer %d: %zu bytes given, %zu expected", kind, layer, n_bytes,
                    row_bytes * (size_t)n_out);
    ek_layer *L = per_layer ? &m->layers[layer] : NULL;
    ek_mat *w = mat_of(m, kind, layer);
    if (borrow_packed && (!w || !ek_x8_packs(type, n_out) || (uintptr_t)data % 64))
        return fail(m, EK_ERR_INVALID, "tensor kind %d layer %d: a packed copy must be a matrix this build packs, "
                    "64-byte aligned", kind, layer);
    if (w) {
        mat_unpack(w); /* a tensor given twice: the new bytes win */
        *w = (ek_mat){data, type, n_in, n_out, row_bytes, borrow_packed ? (void *)data : NULL};
        /* repack now, so the caller can release the source before the next tensor (a low load peak) */
        if (kind != EK_T_TOK_EMBD && mat_pack(w) != EK_OK)
            return fail(m, EK_ERR_NOMEM, "out of memory repacking tensor kind %d layer %d", kind, layer);
        return EK_OK;
    }
    switch (kind) { /* vectors */
    case EK_T_OUTPUT_NORM: m->output_norm = (const float *)data; break;
    case EK_T_ATTN_NORM: L->attn_norm = (const float *)data; break;
    case EK_T_ATTN_Q_BIAS: L->bq = (const float *)data; break;
    case EK_T_ATTN_K_BIAS: L->bk = (const float *)data; break;
    case EK_T_ATTN_V_BIAS: L->bv = (const float *)data; break;
    case EK_T_FFN_NORM: L->ffn_norm = (const float *)data; break;
    case EK_T_ATTN_Q_NORM: L->q_norm = (const float *)data; break;
    case EK_T_ATTN_K_NORM: L->k_norm = (const float *)data; break;
    case EK_T_ATTN_POST_NORM: L->post_attn_norm = (const float *)data; break;
    case EK_T_FFN_POST_NORM: L->post_ffn_norm = (const float *)data; break;
    case EK_T_ROPE_FREQS: {
        const float *f = (const float *)data;
        for (int64_t i = 0; i < n_in; i++)
            if (!(f[i] > 0.0f && f[i] < INFINITY))
                return fail(m, EK_ERR_INVALID, "rope_freqs[%lld] = %g: factors must be positive and finite", (long long)i,
                            (double)f[i]);
        set_inv_freq(m, f); /* read once: the bytes are not kept */
        break;
    }
    }
    return EK_OK;
}

int ek_model_tensor_released(const ek_model *m, int kind, int layer) {
    if (!m) return 0;
    if (kind == EK_T_TOK_EMBD) /* tied: looked up in the packed output (embed_row) */
        return m->finalized && m->output.data == m->tok_embd.data && m->output.packed != NULL &&
               m->output.packed != m->output.data;
    const ek_mat *w = mat_of((ek_model *)m, kind, layer);
    return w && w->packed && w->packed != w->data && w->data != m->tok_embd.data;
}

int ek_model_finalize(ek_model *m) {
    if (!m->tok_embd.data) return fail(m, EK_ERR_INVALID, "missing tensor: token embedding");
    if (!m->output_norm) return fail(m, EK_ERR_INVALID, "missing tensor: output norm");
    if (m->tok_embd.packed && m->output.data) /* embed_row reads a packed embedding only as the tied output */
        return fail(m, EK_ERR_INVALID, "a packed token embedding needs tied embeddings (no output tensor)");
    if (!m->output.data) m->output = m->tok_embd; /* tied embeddings */
    for (int l = 0; l < m->cfg.n_layer; l++) {
        const ek_layer *L = &m->layers[l];
        if (!L->attn_norm || !L->ffn_norm || !L->wq.data || !L->wk.data || !L->wv.data || !L->wo.data ||
            !L->w_gate.data || !L->w_up.data || !L->w_down.data)
            return fail(m, EK_ERR_INVALID, "missing tensor in layer %d", l);
        int nb = (L->bq != NULL) + (L->bk != NULL) + (L->bv != NULL);
        if (m->cfg.has_qkv_bias ? nb != 3 : nb != 0)
            return fail(m, EK_ERR_INVALID, "layer %d: Q/K/V biases must be all present (qwen2) or all absent (llama)", l);
        const int nn = (L->q_norm != NULL) + (L->k_norm != NULL);
        if (m->cfg.has_qk_norm ? nn != 2 : nn != 0)
            return fail(m, EK_ERR_INVALID, "layer %d: Q/K norms must be both present (has_qk_norm) or both absent", l);
        const int np = (L->post_attn_norm != NULL) + (L->post_ffn_norm != NULL);
        if (m->cfg.has_post_norms ? np != 2 : np != 0)
            return fail(m, EK_ERR_INVALID, "layer %d: post-attention and post-FFN norms must be both present "
                        "(has_post_norms) or both absent", l);
    }
    if (mat_pack(&m->output) != EK_OK) return fail(m, EK_ERR_NOMEM, "out of memory repacking the output matrix");
    m->finalized = 1;
    return EK_OK;
}

/* ------------------------------------------------------------------------- */
/* parallel matmul: out[t, r] = dot(W[r], act[t]) for several matrices at once */
/* ------------------------------------------------------------------------- */

#define MM_MAX_JOBS 3
#define MM_TOKEN_TILE 32 /* activation tile kept in L1 while weight rows stream past */

typedef struct {
    const ek_mat *w;
    float *out; /* (n_tok, out_stride) */
    int out_stride;
    float *chunk_stats; /* one token: logit partials (ek_logit_partial) of each row chunk, or NULL */
} mm_job;

typedef struct {
    mm_job jobs[MM_MAX_JOBS];
    int n_jobs;
    const float *x;   /* (n_tok, n_in) float source */
    const void *xq;   /* (n_tok, act_stride) quantized activations */
    size_t act_stride;
    int n_tok, n_in;
    int job_chunks[MM_MAX_JOBS + 1]; /* prefix sums: chunks before job j */
    atomic_int next;
} mm_ctx;

/* Rows r0..r1 (multiples of 8) of a packed matrix, 8 rows by up to max_nx tokens per kernel call. */
static void mm_rows_x8(const mm_ctx *c, const mm_job *job, const void *act, size_t stride, int64_t r0, int64_t r1) {
    const ek_mat *w = job->w;
    const ek_x8_traits *x8 = ek_x8_get(w->type);
    const ek_dot_x8_fn dot = x8->dot;
    const size_t group = EK_X8 * w->row_bytes;
    for (int t0 = 0; t0 < c->n_tok; t0 += MM_TOKEN_TILE) {
        const int t1 = t0 + MM_TOKEN_TILE < c->n_tok ? t0 + MM_TOKEN_TILE : c->n_tok;
        for (int64_t r = r0; r < r1; r += EK_X8) {
            const void *w8 = (const char *)w->packed + (size_t)(r / EK_X8) * group;
            for (int t = t0; t < t1; t += x8->max_nx) {
                const int nt = t1 - t < x8->max_nx ? t1 - t : x8->max_nx;
                float o[EK_X8_MAX_NX * EK_X8];
                dot((int)w->n_in, w8, (const char *)act + (size_t)t * stride, stride, nt, o);
                for (int i = 0; i < nt; i++)
                    memcpy(job->out + (size_t)(t + i) * job->out_stride + r, o + i * EK_X8, sizeof(float) * EK_X8);
            }
        }
    }
}

/* Rows [r0, r1) of one matrix against every token, tile by tile. */
static void mm_rows(const mm_ctx *c, const mm_job *job, int64_t r0, int64_t r1) {
    const ek_mat *w = job->w;
    const ek_type_traits *tr = ek_type_get(w->type);
    const void *act = tr->act_is_q8 ? c->xq : (const void *)c->x;
    const size_t stride = tr->act_is_q8 ? c->act_stride : (size_t)c->n_in * sizeof(float);
    if (w->packed) { /* chunks start at multiples of MM_ROWS_CHUNK and n_out % 8 == 0 */
        mm_rows_x8(c, job, act, stride, r0, r1);
        return;
    }
    for (int t0 = 0; t0 < c->n_tok; t0 += MM_TOKEN_TILE) {
        const int t1 = t0 + MM_TOKEN_TILE < c->n_tok ? t0 + MM_TOKEN_TILE : c->n_tok;
        for (int64_t r = r0; r < r1; r++) {
            const void *row = (const char *)w->data + (size_t)r * w->row_bytes;
            int t = t0;
            float o[4];
            for (; t + 4 <= t1; t += 4) {
                tr->dot((int)w->n_in, row, (const char *)act + (size_t)t * stride, stride, 4, o);
                for (int i = 0; i < 4; i++) job->out[(size_t)(t + i) * job->out_stride + r] = o[i];
            }
            if (t < t1) { /* 1-3 tokens left: one pass over the row for all of them */
                tr->dot((int)w->n_in, row, (const char *)act + (size_t)t * stride, stride, t1 - t, o);
                for (int i = 0; i < t1 - t; i++) job->out[(size_t)(t + i) * job->out_stride + r] = o[i];
            }
        }
    }
}

static void mm_task(void *p, int ith, int nth) {
    mm_ctx *c = (mm_ctx *)p;
    int i;
    while ((i = ek_claim(&c->next, c->job_chunks[c->n_jobs])) >= 0) {
        int j = 0;
        while (i >= c->job_chunks[j + 1]) j++;
        const int64_t r0 = (int64_t)(i - c->job_chunks[j]) * MM_ROWS_CHUNK;
        const int64_t n_out = c->jobs[j].w->n_out, r1 = r0 + MM_ROWS_CHUNK < n_out ? r0 + MM_ROWS_CHUNK : n_out;
        mm_rows(c, &c->jobs[j], r0, r1);
        if (c->jobs[j].chunk_stats) /* while the chunk's logits are still in this core's cache */
            ek_logit_partial(c->jobs[j].out + r0, (int)(r1 - r0), c->jobs[j].chunk_stats + 3 * (i - c->job_chunks[j]));
    }
}

typedef struct {
    const float *x;
    void *xq;
    size_t stride;
    int n_tok, n_in;
    atomic_int next;
} quant_ctx;

static void quant_task(void *p, int ith, int nth) {
    quant_ctx *c = (quant_ctx *)p;
    int t;
    while ((t = ek_claim(&c->next, c->n_tok)) >= 0)
        ek_quantize_row_q8a(c->x + (size_t)t * c->n_in, (block_q8a *)((char *)c->xq + (size_t)t * c->stride), c->n_in);
}

/* Run up to MM_MAX_JOBS matrices that share the input x (n_tok, n_in). */
static void matmul(ek_model *m, const float *x, int n_tok, int n_in, const mm_job *jobs, int n_jobs) {
    mm_ctx c = {.n_jobs = n_jobs, .x = x, .xq = m->act, .act_stride = m->act_stride, .n_tok = n_tok, .n_in = n_in};
    atomic_init(&c.next, 0);
    int need_q8 = 0;
    c.job_chunks[0] = 0;
    for (int j = 0; j < n_jobs; j++) {
        c.jobs[j] = jobs[j];
        need_q8 |= ek_type_get(jobs[j].w->type)->act_is_q8;
        c.job_chunks[j + 1] = c.job_chunks[j] + (int)((jobs[j].w->n_out + MM_ROWS_CHUNK - 1) / MM_ROWS_CHUNK);
    }
    if (need_q8) {
        quant_ctx q = {.x = x, .xq = m->act, .stride = m->act_stride, .n_tok = n_tok, .n_in = n_in};
        atomic_init(&q.next, 0);
        if (n_tok == 1)
            quant_task(&q, 0, 1);
        else
            ek_pool_run(m->pool, quant_task, &q);
    }
    ek_pool_run(m->pool, mm_task, &c);
}

/* ------------------------------------------------------------------------- */
/* elementwise pieces                                                         */
/* ------------------------------------------------------------------------- */

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

/* Rotate one head in place. llama GGUF rotates adjacent pairs (the converter
 * permutes Q/K rows for that); NEOX style (qwen2) rotates (i, i + rope_dim/2). */
static void rope_head(float *v, const float *cs, const float *sn, int rope_dim, int neox) {
    const int half = rope_dim / 2;
    for (int i = 0; i < half; i++) {
        const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * cs[i] - x1 * sn[i];
        v[b] = x0 * sn[i] + x1 * cs[i];
    }
}

/* Per-token work between the QKV matmul and attention: bias, QK-norm, rope, cache write. */
typedef struct {
    ek_model *m;
    int layer, n_tok;
    const ek_layer *L;
    atomic_int next;
} qkv_post_ctx;

static void qkv_post_task(void *p, int ith, int nth) {
    qkv_post_ctx *c = (qkv_post_ctx *)p;
    ek_model *m = c->m;
    const ek_config *cf = &m->cfg;
    const int half = cf->rope_dim / 2;
    int t;
    while ((t = ek_claim(&c->next, c->n_tok)) >= 0) {
        float *q = m->q + (size_t)t * m->q_dim, *k = m->k + (size_t)t * m->kv_dim, *v = m->v + (size_t)t * m->kv_dim;
        if (c->L->bq) {
            for (int i = 0; i < m->q_dim; i++) q[i] += c->L->bq[i];
            for (int i = 0; i < m->kv_dim; i++) k[i] += c->L->bk[i];
            for (int i = 0; i < m->kv_dim; i++) v[i] += c->L->bv[i];
        }
        if (c->L->q_norm) { /* QK-norm (qwen3): each head on its own, before RoPE */
            const int hd = cf->head_dim;
            for (int h = 0; h < cf->n_head; h++) rmsnorm(q + h * hd, q + h * hd, c->L->q_norm, hd, cf->norm_eps);
            for (int h = 0; h < cf->n_head_kv; h++) rmsnorm(k + h * hd, k + h * hd, c->L->k_norm, hd, cf->norm_eps);
        }
        const int swa = layer_slides(cf, c->layer);
        const float *cs = (swa ? m->rope_cos_swa : m->rope_cos) + (size_t)t * half;
        const float *sn = (swa ? m->rope_sin_swa : m->rope_sin) + (size_t)t * half;
        for (int h = 0; h < cf->n_head; h++) rope_head(q + h * cf->head_dim, cs, sn, cf->rope_dim, cf->rope_neox);
        for (int h = 0; h < cf->n_head_kv; h++) rope_head(k + h * cf->head_dim, cs, sn, cf->rope_dim, cf->rope_neox);
        ek_kv_store *kv = &m->row_seq[t]->kv;
        ek_kv_store_put(kv, c->layer, m->row_pos[t], k, v);
        /* attention wants the query scaled, and rotated for quantized keys */
        const float scale = m->attn_scale;
        float *qr = m->q_rot + (size_t)t * m->q_dim;
        for (int i = 0; i < m->q_dim; i++) q[i] *= scale;
        memcpy(qr, q, sizeof(float) * m->q_dim);
        if (kv->rotate)
            for (int h = 0; h < cf->n_head; h++) ek_rotate(qr + h * cf->head_dim, kv->signs, cf->head_dim);
    }
}

/* Attention.
 * Prefill: one task per (token, KV head), each walking the whole store.
 * Decode (one token): tasks split every pool of every KV head into runs
 * (DECODE_PIECES), so two threads stay busy on three heads; partials merge
 * by log-sum-exp afterwards. The last layer also yields per-token statistics. */
typedef struct {
    ek_model *m;
    ek_seq *s;
    int layer, row0, n_tok, stats; /* the sequence's queries are rows row0..row0+n_tok-1 */
    float *out; /* (n_tok, q_dim) */
    atomic_int next;
} attn_ctx;

static ek_attn_args attn_args(const attn_ctx *c, int t, int g, float *raw) {
    const ek_model *m = c->m;
    const size_t off = (size_t)(c->row0 + t) * m->q_dim + (size_t)g * m->group * m->cfg.head_dim;
    ek_attn_args a = {&c->s->kv, c->layer, g, m->group, m->q + off, m->q_rot + off, c->s->n_past + t, raw, 0};
    if (layer_slides(&m->cfg, c->layer) && a.max_pos >= m->cfg.swa_window) a.min_pos = a.max_pos - m->cfg.swa_window + 1;
    return a;
}

/* Fold probabilities exp(raw - m) / l of positions 0..n_pos-1 into sum/sumsq/count accumulators. */
static void stats_fold(const float *raw, size_t raw_stride, const ek_attn_partial *p, int gs, int n_pos, double *sum,
                       double *sumsq, double *count) {
    for (int h = 0; h < gs; h++) {
        const float *r = raw + (size_t)h * raw_stride;
        const float mh = p->m[h], inv = 1.0f / p->l[h];
        for (int j = 0; j < n_pos; j++) {
            const double pr = (double)(expf(r[j] - mh) * inv);
            sum[j] += pr;
            sumsq[j] += pr * pr;
        }
    }
    for (int j = 0; j < n_pos; j++) count[j] += gs;
}

static void attn_prefill_task(void *p, int ith, int nth) {
    attn_ctx *c = (attn_ctx *)p;
    ek_model *m = c->m;
    const int gs = m->group, hd = m->cfg.head_dim, C = m->cfg.n_ctx;
    float *scratch = m->th_scratch + (size_t)ith * m->th_scratch_floats;
    float *pbuf = scratch + ek_attn_scratch_floats(gs, hd);
    float *raw = c->stats ? m->th_raw + (size_t)ith * gs * C : NULL;
    double *st = m->th_stats + (size_t)ith * 3 * C;
    const int n_tasks = c->n_tok * m->cfg.n_head_kv;
    int task;
    while ((task = ek_claim(&c->next, n_tasks)) >= 0) {
        const int t = task / m->cfg.n_head_kv, g = task % m->cfg.n_head_kv;
        ek_attn_args a = attn_args(c, t, g, raw);
        ek_attn_partial part;
        ek_attn_partial_init(&part, pbuf, gs, hd);
        ek_attend_all(&a, &part, scratch);
        ek_attn_finish(&part, &c->s->kv, gs, c->out + (size_t)t * m->q_dim + (size_t)g * gs * hd);
        if (raw) stats_fold(raw, C, &part, gs, a.max_pos + 1, st, st + C, st + 2 * C);
    }
}

typedef struct {
    int g, pool, j0, j1;
} decode_task;

typedef struct {
    attn_ctx c;
    const decode_task *tasks;
    int n_tasks;
} decode_ctx;

static void attn_decode_task(void *p, int ith, int nth) {
    decode_ctx *d = (decode_ctx *)p;
    ek_model *m = d->c.m;
    const int gs = m->group, hd = m->cfg.head_dim;
    float *scratch = m->th_scratch + (size_t)ith * m->th_scratch_floats;
    const size_t pf = ek_attn_partial_floats(gs, hd);
    int i;
    while ((i = ek_claim(&d->c.next, d->n_tasks)) >= 0) {
        const decode_task *t = &d->tasks[i];
        ek_attn_args a = attn_args(&d->c, 0, t->g, d->c.stats ? m->raw + (size_t)t->g * gs * m->cfg.n_ctx : NULL);
        ek_attn_partial part;
        ek_attn_partial_init(&part, m->parts + (size_t)i * pf, gs, hd);
        ek_attend_range(&a, &ek_kv_map_of(&d->c.s->kv, d->c.layer)->pools[t->pool], t->j0, t->j1, &part, scratch);
    }
}

/* slot where piece k of a pool of n starts (k = DECODE_NPIECES: n) */
static int decode_piece_start(int n, int k) {
    int cum = 0;
    for (int i = 0; i < k; i++) cum += DECODE_PIECES[i];
    if (k == DECODE_NPIECES) return n;
    return (int)((long long)n * cum / 16) / ATTN_CHUNK * ATTN_CHUNK;
}

static void attention(ek_model *m, ek_seq *s, int layer, int row0, int n_tok, float *out) {
    const ek_config *cf = &m->cfg;
    const int gs = m->group, hd = cf->head_dim, C = cf->n_ctx;
    const int stats = s->collect_stats && layer == cf->n_layer - 1;
    attn_ctx c = {.m = m, .s = s, .layer = layer, .row0 = row0, .n_tok = n_tok, .stats = stats, .out = out};
    atomic_init(&c.next, 0);
    if (n_tok > 1) {
        if (stats) memset(m->th_stats, 0, sizeof(double) * 3 * (size_t)C * ek_pool_size(m->pool));
        ek_pool_run(m->pool, attn_prefill_task, &c);
        if (stats) {
            const int n_pos = s->n_past + n_tok;
            for (int th = 0; th < ek_pool_size(m->pool); th++) {
                const double *st = m->th_stats + (size_t)th * 3 * C;
                for (int j = 0; j < n_pos; j++) {
                    s->kv.att_sum[j] += st[j];
                    s->kv.att_sumsq[j] += st[C + j];
                    s->kv.att_count[j] += (int32_t)st[2 * C + j];
                }
            }
        }
        return;
    }
    decode_task *tl = (decode_task *)m->tasks;
    const ek_kv_map *kmap = ek_kv_map_of(&s->kv, layer);
    int nt = 0;
    for (int k = 0; k < DECODE_NPIECES; k++)
        for (int g = 0; g < cf->n_head_kv; g++)
            for (int p = 0; p < KV_NPOOLS; p++) {
                const int n = kmap->pools[p].n, j0 = decode_piece_start(n, k), j1 = decode_piece_start(n, k + 1);
                if (j1 > j0) tl[nt++] = (decode_task){g, p, j0, j1};
            }
    decode_ctx d = {.tasks = tl, .n_tasks = nt};
    d.c.m = m; d.c.s = s; d.c.layer = layer; d.c.row0 = row0; d.c.n_tok = n_tok; d.c.stats = stats; d.c.out = out;
    atomic_init(&d.c.next, 0);
    ek_pool_run(m->pool, attn_decode_task, &d);
    const size_t pf = ek_attn_partial_floats(gs, hd);
    float *acc = m->th_scratch; /* thread 0's scratch is free again */
    for (int g = 0; g < cf->n_head_kv; g++) {
        ek_attn_partial total, part;
        ek_attn_partial_init(&total, acc, gs, hd);
        for (int i = 0; i < nt; i++)
            if (tl[i].g == g) {
                part.m = m->parts + (size_t)i * pf;
                part.l = part.m + gs;
                part.o_plain = part.m + 2 * gs;
                part.o_rot = part.o_plain + (size_t)gs * hd;
                ek_attn_merge(&total, &part, gs, hd);
            }
        ek_attn_finish(&total, &s->kv, gs, out + (size_t)g * gs * hd);
        if (stats) {
            const int n_pos = s->n_past + 1;
            double *st = m->th_stats; /* reuse as a (3, n_pos) accumulator */
            memset(st, 0, sizeof(double) * 3 * (size_t)n_pos);
            stats_fold(m->raw + (size_t)g * gs * C, C, &total, gs, n_pos, st, st + n_pos, st + 2 * n_pos);
            for (int j = 0; j < n_pos; j++) {
                s->kv.att_sum[j] += st[j];
                s->kv.att_sumsq[j] += st[n_pos + j];
                s->kv.att_count[j] += (int32_t)st[2 * n_pos + j];
            }
        }
    }
}

typedef struct {
    ek_model *m;
    int n_tok;
    const float *w;
    atomic_int next;
} norm_ctx;

static void norm_task(void *p, int ith, int nth) {
    norm_ctx *c = (norm_ctx *)p;
    const int n = c->m->cfg.n_embd;
    int t;
    while ((t = ek_claim(&c->next, c->n_tok)) >= 0)
        rmsnorm(c->m->xb + (size_t)t * n, c->m->x + (size_t)t * n, c->w, n, c->m->cfg.norm_eps);
}

/* g = silu(g) * u over n values. AVX2: 8 at a time, the sigmoid from e = exp(-|g|) <= 1 (no
 * overflow) as 1/(1+e) for g >= 0 and e/(1+e) below, with the softmax's vector exp (relative error
 * < 2e-7), a little faster than libm's expf in batches (docs/decisions.md). NEON: the same per lane
 * (ek_silu128). */
static void swiglu_row(float *g, const float *u, size_t n) {
    size_t i = 0;
#if defined(EK_AVX2)
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = ek_exp_neg256(_mm256_or_ps(x, neg));
        const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
        const __m256 sig = _mm256_blendv_ps(r, _mm256_mul_ps(e, r), x); /* x's sign bit picks e/(1+e) */
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
    }
#elif defined(EK_NEON) && defined(__aarch64__)
    for (; i + 4 <= n; i += 4) vst1q_f32(g + i, vmulq_f32(ek_silu128(vld1q_f32(g + i)), vld1q_f32(u + i)));
#endif
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* g = gelu(g) * u over n values, GELU's tanh approximation (gemma3's GeGLU), written as
 * x * sigmoid(2z) (= x * (1 + tanh z) / 2), z = sqrt(2/pi) (x + 0.044715 x^3): AVX2 takes swiglu_row's
 * sigmoid. */
static void geglu_row(float *g, const float *u, size_t n) {
    const float c2 = 2.0f * 0.7978845608028654f; /* 2 sqrt(2 / pi) */
    size_t i = 0;
#if defined(EK_AVX2)
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f), vc = _mm256_set1_ps(c2),
                 vk = _mm256_set1_ps(0.044715f);
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 z = _mm256_mul_ps(vc, _mm256_fmadd_ps(_mm256_mul_ps(vk, x), _mm256_mul_ps(x, x), x));
        const __m256 e = ek_exp_neg256(_mm256_or_ps(z, neg));
        const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
        const __m256 sig = _mm256_blendv_ps(r, _mm256_mul_ps(e, r), z);
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) {
        const float x = g[i], z = c2 * (x + 0.044715f * x * x * x);
        g[i] = x / (1.0f + expf(-z)) * u[i];
    }
}

static void swiglu_task(void *p, int ith, int nth) {
    norm_ctx *c = (norm_ctx *)p;
    const size_t n_ff = (size_t)c->m->cfg.n_ff;
    float *g = c->m->gate, *u = c->m->up;
    void (*row)(float *, const float *, size_t) = c->m->cfg.ffn_geglu ? geglu_row : swiglu_row;
    int t;
    while ((t = ek_claim(&c->next, c->n_tok)) >= 0) row(g + (size_t)t * n_ff, u + (size_t)t * n_ff, n_ff);
}

/* m->proj rows normed in place by c->w before the residual add (gemma3's post-norms). */
static void post_norm_task(void *p, int ith, int nth) {
    norm_ctx *c = (norm_ctx *)p;
    const int n = c->m->cfg.n_embd;
    int t;
    while ((t = ek_claim(&c->next, c->n_tok)) >= 0)
        rmsnorm(c->m->proj + (size_t)t * n, c->m->proj + (size_t)t * n, c->w, n, c->m->cfg.norm_eps);
}

/* Run a per-token elementwise task in parallel only when there is enough work. */
static void run_rows(ek_model *m, ek_task_fn fn, void *ctx, atomic_int *next, int n_tok) {
    atomic_store(next, 0);
    if (n_tok == 1)
        fn(ctx, 0, 1);
    else
        ek_pool_run(m->pool, fn, ctx);
}

static void add_into(float *x, const float *y, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

/* ------------------------------------------------------------------------- */
/* forward                                                                    */
/* ------------------------------------------------------------------------- */

/* The embedding of one token. Tied embeddings are read from the packed output matrix, so the
 * caller can release the row-major copy (ek_model_tensor_released). */
static void embed_row(const ek_model *m, int token, float *y) {
    const ek_mat *w = &m->tok_embd;
    if (m->output.data == w->data && m->output.packed) {
        const size_t group = EK_X8 * w->row_bytes;
        ek_x8_get(w->type)->to_float((const char *)m->output.packed + (size_t)(token / EK_X8) * group, token % EK_X8, y,
                                     (int)w->n_in);
        return;
    }
    ek_type_get(w->type)->to_float((const char *)w->data + (size_t)token * w->row_bytes, y, (int)w->n_in);
}

/* The rows of one sequence in a forward chunk. */
typedef struct {
    ek_seq *s;
    const int32_t *tokens;
    int n;
    int logits_mode; /* its logits: none, its last row's, or every row's */
} ek_span;

/* Append each span's tokens to its sequence and run all rows through the weights as one batch;
 * attention runs span by span over each sequence's own cache. The logit rows the spans ask for go
 * to logits one after another, in span order. */
static void forward_chunk(ek_model *m, const ek_span *sp, int n_spans, float *logits) {
    const ek_config *cf = &m->cfg;
    const int E = cf->n_embd, half = cf->rope_dim / 2;

    int n = 0;
    for (int i = 0; i < n_spans; i++) {
        ek_kv_store_append(&sp[i].s->kv, sp[i].n);
        for (int t = 0; t < sp[i].n; t++, n++) {
            m->row_seq[n] = sp[i].s;
            m->row_pos[n] = sp[i].s->n_past + t;
            embed_row(m, sp[i].tokens[t], m->x + (size_t)n * E);
        }
    }
    if (cf->embd_scale > 0.0f)
        for (size_t i = 0; i < (size_t)n * E; i++) m->x[i] *= cf->embd_scale;
    for (int t = 0; t < n; t++) {
        const double pos = (double)m->row_pos[t];
        for (int i = 0; i < half; i++) {
            const double theta = pos * m->inv_freq[i];
            m->rope_cos[(size_t)t * half + i] = (float)cos(theta);
            m->rope_sin[(size_t)t * half + i] = (float)sin(theta);
        }
        for (int i = 0; m->inv_freq_swa && i < half; i++) {
            const double theta = pos * m->inv_freq_swa[i];
            m->rope_cos_swa[(size_t)t * half + i] = (float)cos(theta);
            m->rope_sin_swa[(size_t)t * half + i] = (float)sin(theta);
        }
    }

    for (int l = 0; l < cf->n_layer; l++) {
        const ek_layer *L = &m->layers[l];
        norm_ctx nc = {.m = m, .n_tok = n, .w = L->attn_norm};
        run_rows(m, norm_task, &nc, &nc.next, n);
        mm_job qkv[3] = {{&L->wq, m->q, m->q_dim, NULL}, {&L->wk, m->k, m->kv_dim, NULL}, {&L->wv, m->v, m->kv_dim, NULL}};
        matmul(m, m->xb, n, E, qkv, 3);
        qkv_post_ctx pc = {.m = m, .layer = l, .n_tok = n, .L = L};
        run_rows(m, qkv_post_task, &pc, &pc.next, n);
        for (int i = 0, r = 0; i < n_spans; r += sp[i++].n)
            attention(m, sp[i].s, l, r, sp[i].n, m->xb + (size_t)r * m->q_dim);
        mm_job o = {&L->wo, m->proj, E, NULL};
        matmul(m, m->xb, n, m->q_dim, &o, 1);
        if (L->post_attn_norm) {
            nc.w = L->post_attn_norm;
            run_rows(m, post_norm_task, &nc, &nc.next, n);
        }
        add_into(m->x, m->proj, (size_t)n * E);

        nc.w = L->ffn_norm;
        run_rows(m, norm_task, &nc, &nc.next, n);
        mm_job gu[2] = {{&L->w_gate, m->gate, cf->n_ff, NULL}, {&L->w_up, m->up, cf->n_ff, NULL}};
        matmul(m, m->xb, n, E, gu, 2);
        run_rows(m, swiglu_task, &nc, &nc.next, n);
        mm_job d = {&L->w_down, m->proj, E, NULL};
        matmul(m, m->gate, n, cf->n_ff, &d, 1);
        if (L->post_ffn_norm) {
            nc.w = L->post_ffn_norm;
            run_rows(m, post_norm_task, &nc, &nc.next, n);
        }
        add_into(m->x, m->proj, (size_t)n * E);
    }

    int n_out = 0;
    for (int i = 0, r = 0; i < n_spans; r += sp[i++].n) {
        const int mode = sp[i].logits_mode;
        const int first = mode == EK_LOGITS_ALL ? 0 : mode == EK_LOGITS_LAST ? sp[i].n - 1 : sp[i].n;
        for (int t = first; t < sp[i].n; t++, n_out++)
            rmsnorm(m->xb + (size_t)n_out * E, m->x + (size_t)(r + t) * E, m->output_norm, E, cf->norm_eps);
    }
    if (n_out) {
        const int n_chunks = (cf->n_vocab + MM_ROWS_CHUNK - 1) / MM_ROWS_CHUNK;
        /* one row with statistics on (a feature-reading KV policy): its next-token statistics
         * come with the matmul, chunk by chunk (ek_last_logit_stats) */
        ek_seq *one = NULL;
        for (int i = 0; n_out == 1 && i < n_spans; i++)
            if (sp[i].logits_mode != EK_LOGITS_NONE) one = sp[i].s;
        const int fused = one && one->collect_stats;
        mm_job oj = {&m->output, logits, cf->n_vocab, fused ? m->logit_parts : NULL};
        matmul(m, m->xb, n_out, E, &oj, 1);
        if (fused) {
            ek_logit_merge(m->logit_parts, n_chunks, &one->last_stats[0], &one->last_stats[1], &one->last_stats[2]);
            one->last_stats_valid = 1;
        } else if (n_out > 1) { /* a batch step: the same statistics of each one-row span, after the matmul */
            for (int i = 0, row = 0; i < n_spans; i++) {
                const int rows = sp[i].logits_mode == EK_LOGITS_ALL ? sp[i].n : sp[i].logits_mode == EK_LOGITS_LAST;
                ek_seq *s = sp[i].s;
                if (rows == 1 && s->collect_stats) {
                    const float *x = logits + (size_t)row * cf->n_vocab;
                    for (int c = 0; c < n_chunks; c++) {
                        const int r0 = c * MM_ROWS_CHUNK;
                        ek_logit_partial(x + r0, cf->n_vocab - r0 < MM_ROWS_CHUNK ? cf->n_vocab - r0 : MM_ROWS_CHUNK,
                                         m->logit_parts + 3 * c);
                    }
                    ek_logit_merge(m->logit_parts, n_chunks, &s->last_stats[0], &s->last_stats[1], &s->last_stats[2]);
                    s->last_stats_valid = 1;
                }
                row += rows;
            }
        }
    }
    for (int i = 0; i < n_spans; i++) sp[i].s->n_past += sp[i].n;
}

int ek_seq_last_logit_stats(const ek_seq *s, float *out) {
    if (!s || !out || !s->last_stats_valid) return -1;
    memcpy(out, s->last_stats, sizeof(s->last_stats));
    return 0;
}
int ek_last_logit_stats(const ek_model *m, float *out) { return m ? ek_seq_last_logit_stats(m->seq, out) : -1; }

static int check_tokens(ek_model *m, const int32_t *tokens, int n) {
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.n_vocab)
            return fail(m, EK_ERR_TOKEN, "token id %d at index %d is out of range [0, %d)", tokens[i], i, m->cfg.n_vocab);
    return EK_OK;
}

int ek_forward_seq(ek_seq *s, const int32_t *tokens, int n, int logits_mode, float *logits) {
    ek_model *m = s->m;
    if (!m->finalized) return fail(m, EK_ERR_INVALID, "model is not finalized");
    s->last_stats_valid = 0;
    if (n <= 0 || !tokens) return fail(m, EK_ERR_INVALID, "forward needs at least one token");
    if (logits_mode < EK_LOGITS_NONE || logits_mode > EK_LOGITS_ALL)
        return fail(m, EK_ERR_INVALID, "invalid logits mode %d", logits_mode);
    if (logits_mode != EK_LOGITS_NONE && !logits) return fail(m, EK_ERR_INVALID, "logits buffer is NULL");
    if (check_tokens(m, tokens, n)) return EK_ERR_TOKEN;
    if ((int64_t)s->n_past + n > m->cfg.n_ctx)
        return fail(m, EK_ERR_CONTEXT, "context overflow: %d tokens in context + %d new > n_ctx %d", s->n_past, n,
                    m->cfg.n_ctx);
    for (int i = 0; i < n; i += m->cfg.n_batch) {
        const int nb = n - i < m->cfg.n_batch ? n - i : m->cfg.n_batch;
        const int last = i + nb == n;
        ek_span sp = {s, tokens + i, nb, EK_LOGITS_NONE};
        float *out = NULL;
        if (logits_mode == EK_LOGITS_ALL) {
            sp.logits_mode = EK_LOGITS_ALL;
            out = logits + (size_t)i * m->cfg.n_vocab;
        } else if (logits_mode == EK_LOGITS_LAST && last) {
            sp.logits_mode = EK_LOGITS_LAST;
            out = logits;
        }
        forward_chunk(m, &sp, 1, out);
    }
    return EK_OK;
}

int ek_forward(ek_model *m, const int32_t *tokens, int n, int logits_mode, float *logits) {
    return ek_forward_seq(m->seq, tokens, n, logits_mode, logits);
}

int ek_forward_batch(ek_model *m, ek_seq *const *seqs, int n_seqs, const int32_t *tokens, const int32_t *counts,
                     float *logits) {
    if (!m->finalized) return fail(m, EK_ERR_INVALID, "model is not finalized");
    if (n_seqs <= 0 || !seqs || !tokens || !counts)
        return fail(m, EK_ERR_INVALID, "a batch needs at least one sequence, its tokens and counts");
    /* validate everything first: a refused call changes no sequence */
    int64_t total = 0;
    for (int i = 0; i < n_seqs; i++) {
        const ek_seq *s = seqs[i];
        if (!s || s->m != m) return fail(m, EK_ERR_INVALID, "batch sequence %d is not a sequence of this model", i);
        for (int j = 0; j < i; j++)
            if (seqs[j] == s) return fail(m, EK_ERR_INVALID, "batch sequences %d and %d are the same sequence", j, i);
        if (counts[i] <= 0)
            return fail(m, EK_ERR_INVALID, "batch sequence %d: token count %d, at least 1 needed", i, counts[i]);
        if ((int64_t)s->n_past + counts[i] > m->cfg.n_ctx)
            return fail(m, EK_ERR_CONTEXT,
                        "batch sequence %d: context overflow: %d tokens in context + %d new > n_ctx %d", i, s->n_past,
                        counts[i], m->cfg.n_ctx);
        total += counts[i];
    }
    if (total > INT32_MAX) return fail(m, EK_ERR_INVALID, "batch of %lld tokens is too large", (long long)total);
    if (check_tokens(m, tokens, (int)total)) return EK_ERR_TOKEN;
    for (int i = 0; i < n_seqs; i++) seqs[i]->last_stats_valid = 0;
    /* passes of at most n_batch rows, sequences in order; a sequence that does not fit whole ends
     * a pass and goes on in the next, so the sequences finishing in one pass are consecutive and
     * their logit rows land in consecutive rows of logits */
    ek_span sp[64];
    const int B = m->cfg.n_batch;
    const int32_t *tp = tokens;
    int i = 0, used = 0; /* the first sequence not finished, and how many of its tokens ran */
    while (i < n_seqs) {
        int rows = 0, ns = 0, first_out = -1;
        while (i < n_seqs && rows < B && ns < (int)(sizeof sp / sizeof *sp)) {
            const int take = counts[i] - used < B - rows ? counts[i] - used : B - rows;
            const int finishes = used + take == counts[i];
            sp[ns++] = (ek_span){seqs[i], tp, take, finishes && logits ? EK_LOGITS_LAST : EK_LOGITS_NONE};
            if (finishes && first_out < 0) first_out = i;
            tp += take;
            rows += take;
            if (finishes) i++, used = 0;
            else used += take;
        }
        forward_chunk(m, sp, ns, first_out >= 0 && logits ? logits + (size_t)first_out * m->cfg.n_vocab : NULL);
    }
    return EK_OK;
}

int ek_truncate_seq(ek_seq *s, int n_past) {
    if (n_past < 0 || n_past > s->n_past)
        return fail(s->m, EK_ERR_INVALID, "cannot truncate to %d: context holds %d tokens", n_past, s->n_past);
    s->n_past = n_past;
    ek_kv_store_truncate(&s->kv, n_past);
    return EK_OK;
}

int ek_truncate(ek_model *m, int n_past) { return ek_truncate_seq(m->seq, n_past); }

/* ------------------------------------------------------------------------- */
/* mixed-precision KV                                                          */
/* ------------------------------------------------------------------------- */

int ek_seq_kv_configure(ek_seq *s, int group_bits8, int group_bits4, int group_bits2, int flags) {
    ek_model *m = s->m;
    if (s->n_past != 0) return fail(m, EK_ERR_INVALID, "KV layout can only change while the context is empty");
    if (flags & ~EK_KV_FLAGS) return fail(m, EK_ERR_INVALID, "unknown KV layout flags %#x", flags);
    int g[KVP_COUNT];
    ek_kv_group_sizes(m->cfg.head_dim, group_bits8, group_bits4, group_bits2, g); /* each row names its group */
    if (ek_kv_store_configure(&s->kv, g, flags & EK_KV_ROTATE, flags & EK_KV_CENTER_KEYS, flags & EK_KV_FIT_GRID))
        return fail(m, EK_ERR_INVALID,
                    "invalid KV layout: groups (%d, %d, %d) must be multiples of 32 that divide head_dim %d; "
                    "rotation needs a power-of-two head_dim",
                    group_bits8, group_bits4, group_bits2, m->cfg.head_dim);
    return EK_OK;
}

int ek_seq_kv_rotating(const ek_seq *s) { return s->kv.rotate; }
int ek_seq_kv_centering(const ek_seq *s) { return s->kv.center; }
int ek_seq_kv_fitting(const ek_seq *s) { return s->kv.fit; }

int ek_seq_kv_set_layer_bits(ek_seq *s, int layer, const int32_t *pos, const int32_t *k_bits, const int32_t *v_bits,
                             int n) {
    ek_model *m = s->m;
    if (layer < -1 || layer >= m->cfg.n_layer)
        return fail(m, EK_ERR_INVALID, "layer %d is not in the model (0..%d, or -1 for all layers)", layer,
                    m->cfg.n_layer - 1);
    /* validate everything first: a rejected call changes nothing */
    int differs = 0;
    for (int i = 0; i < n; i++) {
        if (pos[i] < 0 || pos[i] >= s->n_past)
            return fail(m, EK_ERR_INVALID, "position %d is not in the context (0..%d)", pos[i], s->n_past - 1);
        const int kp = ek_kv_prec_from_bits(k_bits[i]), vp = ek_kv_prec_from_bits(v_bits[i]);
        if (kp < 0 || vp < 0)
            return fail(m, EK_ERR_INVALID, "bit-widths must be 16, 8, 4, 3 or 2 (got k=%d, v=%d at position %d)",
                        k_bits[i], v_bits[i], pos[i]);
        if ((kp != KVP_F16 || vp != KVP_F16) && m->cfg.head_dim % 32)
            return fail(m, EK_ERR_INVALID, "quantized KV needs head_dim to be a multiple of 32 (it is %d)",
                        m->cfg.head_dim);
        if (layer >= 0 && !s->kv.split) {
            int ck, cv;
            ek_kv_store_prec(&s->kv, layer, pos[i], &ck, &cv);
            differs |= ck != kp || cv != vp;
        }
    }
    /* one layer's bits leave the shared map only when they change something */
    if (layer >= 0 && !s->kv.split) {
        if (!differs) return EK_OK;
        if (ek_kv_store_split(&s->kv)) return fail(m, EK_ERR_NOMEM, "out of memory for per-layer KV maps");
    }
    for (int i = 0; i < n; i++)
        ek_kv_store_set_prec(&s->kv, layer, pos[i], ek_kv_prec_from_bits(k_bits[i]), ek_kv_prec_from_bits(v_bits[i]));
    return EK_OK;
}

int ek_kv_set_bits(ek_model *m, const int32_t *pos, const int32_t *k_bits, const int32_t *v_bits, int n) {
    return ek_seq_kv_set_layer_bits(m->seq, -1, pos, k_bits, v_bits, n);
}

int ek_seq_kv_get_layer_bits(const ek_seq *s, int layer, int32_t *k_bits, int32_t *v_bits) {
    if (layer < 0 || layer >= s->m->cfg.n_layer) return EK_ERR_INVALID;
    for (int j = 0; j < s->n_past; j++) {
        int kp, vp;
        ek_kv_store_prec(&s->kv, layer, j, &kp, &vp);
        k_bits[j] = ek_kv_prec(kp)->bits;
        v_bits[j] = ek_kv_prec(vp)->bits;
    }
    return EK_OK;
}

int ek_seq_kv_layer_maps(const ek_seq *s) { return s->kv.split ? s->m->cfg.n_layer : 1; }

size_t ek_seq_kv_data_bytes(const ek_seq *s) { return ek_kv_store_data_bytes(&s->kv); }

int ek_seq_kv_read(const ek_seq *s, int layer, int pos, float *k, float *v) {
    if (layer < 0 || layer >= s->m->cfg.n_layer || pos < 0 || pos >= s->n_past) return EK_ERR_INVALID;
    ek_kv_store_get(&s->kv, layer, pos, k, v);
    return EK_OK;
}

void ek_seq_set_collect_stats(ek_seq *s, int on) { s->collect_stats = on != 0; }
const double *ek_seq_attn_stat_sum(const ek_seq *s) { return s->kv.att_sum; }
const double *ek_seq_attn_stat_sumsq(const ek_seq *s) { return s->kv.att_sumsq; }
const int32_t *ek_seq_attn_stat_count(const ek_seq *s) { return s->kv.att_count; }

/* the same calls on the default sequence */
int ek_kv_configure(ek_model *m, int group_bits8, int group_bits4, int group_bits2, int flags) {
    return ek_seq_kv_configure(m->seq, group_bits8, group_bits4, group_bits2, flags);
}
int ek_kv_rotating(const ek_model *m) { return ek_seq_kv_rotating(m->seq); }
int ek_kv_centering(const ek_model *m) { return ek_seq_kv_centering(m->seq); }
int ek_kv_fitting(const ek_model *m) { return ek_seq_kv_fitting(m->seq); }
int ek_kv_set_layer_bits(ek_model *m, int layer, const int32_t *pos, const int32_t *k_bits, const int32_t *v_bits,
                         int n) {
    return ek_seq_kv_set_layer_bits(m->seq, layer, pos, k_bits, v_bits, n);
}
int ek_kv_get_layer_bits(const ek_model *m, int layer, int32_t *k_bits, int32_t *v_bits) {
    return ek_seq_kv_get_layer_bits(m->seq, layer, k_bits, v_bits);
}
int ek_kv_get_bits(const ek_model *m, int32_t *k_bits, int32_t *v_bits) {
    return ek_seq_kv_get_layer_bits(m->seq, 0, k_bits, v_bits);
}
int ek_kv_layer_maps(const ek_model *m) { return ek_seq_kv_layer_maps(m->seq); }
size_t ek_kv_data_bytes(const ek_model *m) { return ek_seq_kv_data_bytes(m->seq); }
int ek_kv_read(const ek_model *m, int layer, int pos, float *k, float *v) {
    return ek_seq_kv_read(m->seq, layer, pos, k, v);
}
void ek_set_collect_stats(ek_model *m, int on) { ek_seq_set_collect_stats(m->seq, on); }
const double *ek_attn_stat_sum(const ek_model *m) { return ek_seq_attn_stat_sum(m->seq); }
const double *ek_attn_stat_sumsq(const ek_model *m) { return ek_seq_attn_stat_sumsq(m->seq); }
const int32_t *ek_attn_stat_count(const ek_model *m) { return ek_seq_attn_stat_count(m->seq); }

/* One layer's attention over the cache, for ek_bench_attention (testing.c). flatten inlines
 * attention() here, so GCC still inlines it into forward_chunk too, as before the benchmarks
 * moved out (without it, forward_chunk called an out-of-line copy). */
__attribute__((flatten)) void ek_model_attention(ek_model *m, int layer, int n_tok, float *out) {
    attention(m, m->seq, layer, 0, n_tok, out);
}
