/* The model's state, shared by model.c and the test and benchmark entries (testing.c); nothing
 * outside the library sees it (edgekv.h declares ek_model and ek_seq as opaque structs).
 *
 * ek_model: the weights and config (read-only after finalize) and the scratch of one forward pass
 * (activations, attention partials): forward calls on one model run one at a time.
 * ek_seq: one sequence over those weights: its KV store (with its attention statistics), n_past
 * and the statistics of its last logits. */
#ifndef EDGEKV_MODEL_H
#define EDGEKV_MODEL_H

#include "edgekv.h"
#include "kv_store.h"
#include "threadpool.h"

/* A borrowed weight matrix: n_out rows of n_in values; packed (owned, or NULL) holds the same
 * rows interleaved 8 by 8 for the x8 kernels (quant_x8.c) and is what the matmul reads. */
typedef struct {
    const void *data;
    int type;
    int64_t n_in, n_out;
    size_t row_bytes;
    void *packed;
} ek_mat;

typedef struct {
    const float *attn_norm;     /* (n_embd) */
    ek_mat wq, wk, wv, wo;
    const float *bq, *bk, *bv;  /* (q_dim), (kv_dim), (kv_dim) or NULL */
    const float *q_norm, *k_norm; /* (head_dim) or NULL (has_qk_norm) */
    const float *ffn_norm;      /* (n_embd) */
    const float *post_attn_norm, *post_ffn_norm; /* (n_embd) or NULL (has_post_norms) */
    ek_mat w_gate, w_up, w_down;
} ek_layer;

struct ek_seq {
    ek_model *m;
    ek_kv_store kv;
    int n_past;
    int collect_stats;   /* accumulate last-layer attention statistics per cached token */
    float last_stats[3]; /* max logit, log s, entropy of the last call's logits, when valid */
    int last_stats_valid;
};

struct ek_model {
    ek_config cfg;
    int q_dim, kv_dim, group;   /* n_head*head_dim, n_head_kv*head_dim, n_head/n_head_kv */
    int finalized;

    ek_mat tok_embd, output;
    const float *output_norm;
    ek_layer *layers;

    ek_seq *seq;         /* the default sequence: what the ek_* calls without a seq act on */
    ek_pool *pool;
    float *logit_parts;  /* (n_vocab / MM_ROWS_CHUNK + 1, 3) partials of one row of logits */

    /* scratch, sized for n_batch tokens */
    ek_seq **row_seq;  /* (n_batch) the sequence of each row of a forward chunk */
    int *row_pos;      /* (n_batch) its position in that sequence */
    float *x;          /* (n_batch, n_embd) residual stream */
    float *xb;         /* (n_batch, max(n_embd, q_dim)) normed input / attention output */
    float *q;          /* (n_batch, q_dim) */
    float *k, *v;      /* (n_batch, kv_dim) */
    float *gate, *up;  /* (n_batch, n_ff) */
    float *proj;       /* (n_batch, n_embd) output of Wo and Wdown, added into x */
    void *act;         /* (n_batch, act row bytes) quantized activations */
    size_t act_stride;
    float *rope_cos, *rope_sin; /* (n_batch, rope_dim/2) */
    float *inv_freq;   /* (rope_dim/2), divided by the rope_freqs factors when given */
    float *rope_cos_swa, *rope_sin_swa, *inv_freq_swa; /* the same for sliding-window layers, or NULL */
    float attn_scale;  /* query scale: cfg.attn_scale, else 1/sqrt(head_dim) */
    float *q_rot;      /* (n_batch, q_dim) scaled query, rotated for quantized keys */
    float *raw;        /* (n_head, n_ctx) decode: last-layer raw scores by position */
    float *th_raw;     /* (n_threads, group, n_ctx) prefill: the same per thread */
    double *th_stats;  /* (n_threads, 3, n_ctx) prefill: per-thread sum, sumsq, count */
    float *th_scratch; /* (n_threads, attention scratch + partial) */
    size_t th_scratch_floats;
    float *parts;      /* (max_tasks, partial) decode: one partial per task */
    void *tasks;       /* (max_tasks) decode task list */
    int max_tasks;

    char err[512];
};

/* One layer's attention of the n_tok queries in m->q / m->q_rot over the default sequence's cache
 * into out (model.c). */
void ek_model_attention(ek_model *m, int layer, int n_tok, float *out);

#endif
