/* edgekv public C API: the header the Python binding mirrors (python/edgekv/_native.py hands the
 * part between cffi-begin and cffi-end to cffi, followed by the same block of edgekv_testing.h,
 * the entry points for tests and benchmarks).
 *
 * Ownership: Python parses GGUF and keeps the weight bytes alive (memory-mapped
 * or converted); the model only borrows pointers to them. Every function that
 * can fail returns a negative code and leaves a message in ek_model_error().
 * A failed call leaves the model's state (context, cache) as it was.
 */
#ifndef EDGEKV_H
#define EDGEKV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cffi-begin: python/edgekv/_native.py feeds everything up to cffi-end to cffi.cdef */
#define EK_ABI_VERSION 12 /* 2: ek_model_tensor_released, ek_logit_stats, ek_last_logit_stats; 3: ek_attn_value_tile, ek_attn_value_weight_max; 4: ek_convert_target, ek_convert_weights; 5: KV layout flags (key centering), ek_kv_centering, 3-bit KV records; 6: EK_KV_FIT_GRID, ek_kv_fitting, ek_kv_quant_roundtrip's EK_RT_FIT; 7: has_qk_norm, EK_T_ATTN_Q_NORM/K_NORM, EK_T_ROPE_FREQS; 8: KV precision per (layer, position): ek_kv_set_layer_bits, ek_kv_get_layer_bits, ek_kv_layer_maps; 9: sequences (ek_seq_*, ek_forward_seq, ek_truncate_seq, ek_forward_batch); 10: ek_kv_precisions (the table of KV precisions); 11: gemma3 config fields (ffn_geglu ... rope_base_swa), EK_T_ATTN_POST_NORM/FFN_POST_NORM; 12: EK_TYPE_PACKED_X8, ek_pack_weights (borrowed packed weights) */

typedef struct {
    int n_vocab;
    int n_embd;
    int n_layer;
    int n_head;
    int n_head_kv;
    int head_dim;
    int n_ff;
    int n_ctx;       /* context window this model instance allocates */
    int rope_dim;    /* dimensions rotated per head (<= head_dim, even) */
    int rope_neox;   /* 0: rotate adjacent pairs (llama GGUF); 1: rotate halves (qwen2) */
    float rope_base;
    float norm_eps;
    int has_qkv_bias;
    int has_qk_norm; /* 1: RMS-norm each head of q and k before RoPE (qwen3) */
    int n_threads;
    int n_batch;     /* max tokens per internal forward chunk */
    /* gemma3; 0 leaves each off */
    int ffn_geglu;       /* 1: GELU (tanh approximation) gate instead of SiLU */
    int has_post_norms;  /* 1: RMS-norm attention and FFN outputs before the residual add */
    float embd_scale;    /* > 0: token embeddings times this (gemma: sqrt(n_embd)) */
    float attn_scale;    /* > 0: query scale instead of 1/sqrt(head_dim) */
    int swa_window;      /* > 0: sliding-window layers attend to the last swa_window positions */
    int swa_period;      /* with swa_window: layer l slides unless l % swa_period == swa_period - 1 */
    float rope_base_swa; /* with swa_window: RoPE base of the sliding-window layers (no RoPE factors) */
} ek_config;

/* Tensor kinds; per-layer kinds take a layer index, global ones take -1. */
enum {
    EK_T_TOK_EMBD = 0,
    EK_T_OUTPUT_NORM,
    EK_T_OUTPUT, /* optional: absent means tied to the token embedding */
    EK_T_ATTN_NORM,
    EK_T_ATTN_Q,
    EK_T_ATTN_K,
    EK_T_ATTN_V,
    EK_T_ATTN_O,
    EK_T_ATTN_Q_BIAS,
    EK_T_ATTN_K_BIAS,
    EK_T_ATTN_V_BIAS,
    EK_T_FFN_NORM,
    EK_T_FFN_GATE,
    EK_T_FFN_UP,
    EK_T_FFN_DOWN,
    EK_T_ATTN_Q_NORM, /* (head_dim), with has_qk_norm */
    EK_T_ATTN_K_NORM,
    EK_T_ROPE_FREQS, /* optional, global (rope_dim/2): angle divisors per dimension (Llama 3) */
    EK_T_ATTN_POST_NORM, /* (n_embd), with has_post_norms */
    EK_T_FFN_POST_NORM,
    EK_T_COUNT
};

/* Error codes */
enum {
    EK_OK = 0,
    EK_ERR_INVALID = -1,  /* bad argument, shape or state */
    EK_ERR_NOMEM = -2,    /* allocation failed */
    EK_ERR_CONTEXT = -3,  /* would exceed the context window */
    EK_ERR_TOKEN = -4,    /* token id out of range */
};

enum { EK_LOGITS_NONE = 0, EK_LOGITS_LAST = 1, EK_LOGITS_ALL = 2 };

typedef struct ek_model ek_model;
typedef struct ek_seq ek_seq;

int ek_abi_version(void);
const char *ek_simd(void); /* "avx2", "neon", "neon+dotprod" or "scalar" */

/* Bytes of one row of n values of a GGML type; 0 if the type is not native or n is not whole blocks. */
size_t ek_type_row_bytes(int type, int64_t n);

ek_model *ek_model_create(const ek_config *cfg, char *err, size_t err_len);
void ek_model_free(ek_model *m);
const char *ek_model_error(const ek_model *m);

/* Borrow a tensor. n_in: values per row (GGUF ne[0]); n_out: rows (ne[1], 1 for vectors). */
int ek_model_set_tensor(ek_model *m, int kind, int layer, int type, const void *data, int64_t n_in,
                        int64_t n_out, size_t n_bytes);
/* Check that every required tensor is present; the model is usable only after this succeeds.
 * Matrices with a row-interleaved kernel in this build are copied into that layout here. */
int ek_model_finalize(ek_model *m);
/* 1 if the model no longer reads the borrowed bytes of this tensor (they were repacked into a
 * copy of its own at finalize), so the caller may release them; 0 otherwise. */
int ek_model_tensor_released(const ek_model *m, int kind, int layer);

/* Append n tokens to the context and run them. logits: NULL for EK_LOGITS_NONE,
 * else n_vocab floats (LAST) or n * n_vocab floats (ALL). */
int ek_forward(ek_model *m, const int32_t *tokens, int n, int logits_mode, float *logits);

int ek_n_past(const ek_model *m);
int ek_n_ctx(const ek_model *m);
/* Drop every cached token at position >= n_past (0 clears the context). */
int ek_truncate(ek_model *m, int n_past);

/* KV cache memory: bytes held for the tokens in context, and per token. */
size_t ek_kv_bytes_used(const ek_model *m);
size_t ek_kv_bytes_per_token(const ek_model *m);

/* ---- mixed-precision KV store ----
 * Tokens enter at 16 bits; a policy moves them to fewer (keys and values separately): the
 * bit-widths ek_kv_precisions lists. group_bits8/4/2: quantization group sizes (multiples of 32 dividing
 * head_dim); flags: EK_KV_ROTATE, randomized Hadamard rotation of quantized records;
 * EK_KV_CENTER_KEYS, quantized keys stored minus a per-(layer, head) mean fixed at the
 * first key quantization, which attention adds back as a score offset (exact; see
 * kv_store.h); EK_KV_FIT_GRID, each group's grid (scale, minimum) fitted to its values for
 * the least squared error instead of its min/max (kv_quant.c; same record format, slower
 * encoding). Configure only while the context is empty. */
enum { EK_KV_ROTATE = 1, EK_KV_CENTER_KEYS = 2, EK_KV_FIT_GRID = 4, EK_KV_FLAGS = 7 /* all of them */ };
int ek_kv_configure(ek_model *m, int group_bits8, int group_bits4, int group_bits2, int flags);
/* The KV precisions this library has (csrc/kv_types.c, one row each), in the store's id order:
 * bits[i] its bit-width (16 first: where tokens enter) and group_bits[i] which of ek_kv_configure's
 * group sizes it uses (8, 4 or 2; 16 = the whole head). Fills at most max entries (either array may
 * be NULL) and returns how many precisions there are. */
int ek_kv_precisions(int32_t *bits, int32_t *group_bits, int max);
int ek_kv_rotating(const ek_model *m);
int ek_kv_centering(const ek_model *m);
int ek_kv_fitting(const ek_model *m);
/* Re-encode n cached positions at the given bit-widths (any of ek_kv_precisions), in every layer. */
int ek_kv_set_bits(ek_model *m, const int32_t *pos, const int32_t *k_bits, const int32_t *v_bits, int n);
/* The same in one layer (0..n_layer-1), or in all (-1). The first call that gives a layer bits
 * other than the rest gives every layer its own position map (ek_kv_layer_maps), until the context
 * is emptied: map bytes (ek_kv_bytes_used) grow from n_past * 5 to n_layer * n_past * 5. */
int ek_kv_set_layer_bits(ek_model *m, int layer, const int32_t *pos, const int32_t *k_bits, const int32_t *v_bits,
                         int n);
/* Bit-widths of every cached position (n_past entries each) in layer 0 / in one layer. */
int ek_kv_get_bits(const ek_model *m, int32_t *k_bits, int32_t *v_bits);
int ek_kv_get_layer_bits(const ek_model *m, int layer, int32_t *k_bits, int32_t *v_bits);
/* Position maps the store holds: 1 (shared by all layers) or n_layer. */
int ek_kv_layer_maps(const ek_model *m);
/* Bytes of quantized records only (no map): average bits = 8 * this / (n_past * per-token elements). */
size_t ek_kv_data_bytes(const ek_model *m);
/* Dequantized keys and values of one cached position in one layer, (n_head_kv * head_dim) each. */
int ek_kv_read(const ek_model *m, int layer, int pos, float *k, float *v);

/* Last-layer attention received by each cached position, over heads and queries:
 * sum and sum of squares of probabilities, and the number of samples (n_ctx entries,
 * valid for positions < n_past). Pointers stay valid for the model's lifetime. */
void ek_set_collect_stats(ek_model *m, int on);
const double *ek_attn_stat_sum(const ek_model *m);
const double *ek_attn_stat_sumsq(const ek_model *m);
const int32_t *ek_attn_stat_count(const ek_model *m);

/* Next-token statistics of n_rows logit rows (logit_stats.c): per row the max logit, log of
 * sum(exp(logit - max)) and the entropy in nats; NaN for a row holding NaN or inf. */
int ek_logit_stats(const float *logits, int n_rows, int n_vocab, float *max_logit, float *log_s, float *entropy);

/* With attention statistics on (ek_set_collect_stats), a forward call whose logits are one row
 * also computes that row's statistics, as ek_logit_stats would, chunk by chunk inside the output
 * matmul: out[3] = max logit, log s, entropy. 0 if the last forward call computed them, else -1. */
int ek_last_logit_stats(const ek_model *m, float *out);

/* ---- sequences ----
 * A model's weights serve any number of sequences; each ek_seq holds its own KV store (layout,
 * precisions, attention statistics) and position. Every ek_* call above that takes no seq acts
 * on the model's default sequence (ek_model_seq); the ek_seq_* calls below are the same calls on
 * a given sequence, with errors left in ek_model_error() of its model. Calls on one model and its
 * sequences must not overlap (they share the model's scratch and threads): callers on several
 * threads hold one lock per model. Free every sequence (other than the default) before its model.
 * ek_seq_create: a new empty sequence with the default KV layout (configure it while empty);
 * NULL on failure (message in ek_model_error). */
ek_seq *ek_seq_create(ek_model *m);
void ek_seq_free(ek_seq *s);
ek_seq *ek_model_seq(ek_model *m);
int ek_forward_seq(ek_seq *s, const int32_t *tokens, int n, int logits_mode, float *logits);
int ek_truncate_seq(ek_seq *s, int n_past);
int ek_seq_n_past(const ek_seq *s);
size_t ek_seq_kv_bytes_used(const ek_seq *s);
int ek_seq_kv_configure(ek_seq *s, int group_bits8, int group_bits4, int group_bits2, int flags);
int ek_seq_kv_rotating(const ek_seq *s);
int ek_seq_kv_centering(const ek_seq *s);
int ek_seq_kv_fitting(const ek_seq *s);
int ek_seq_kv_set_layer_bits(ek_seq *s, int layer, const int32_t *pos, const int32_t *k_bits, const int32_t *v_bits,
                             int n);
int ek_seq_kv_get_layer_bits(const ek_seq *s, int layer, int32_t *k_bits, int32_t *v_bits);
int ek_seq_kv_layer_maps(const ek_seq *s);
size_t ek_seq_kv_data_bytes(const ek_seq *s);
int ek_seq_kv_read(const ek_seq *s, int layer, int pos, float *k, float *v);
void ek_seq_set_collect_stats(ek_seq *s, int on);
const double *ek_seq_attn_stat_sum(const ek_seq *s);
const double *ek_seq_attn_stat_sumsq(const ek_seq *s);
const int32_t *ek_seq_attn_stat_count(const ek_seq *s);
int ek_seq_last_logit_stats(const ek_seq *s, float *out);

/* One step of n_seqs distinct sequences of this model in one pass over the weights: sequence i
 * appends counts[i] >= 1 tokens (taken in order from tokens: sequence 0's, then 1's, ...; a
 * decode step is 1, a prompt chunk more) and, when logits is not NULL, gets the logits of its last
 * token in row i of logits (n_seqs, n_vocab). The matmuls run once over all rows (at most n_batch
 * per pass; more go in several passes); attention runs per sequence over its own store at its own
 * position and precisions. Each sequence's result is what ek_forward_seq gives it alone up to float
 * summation order (docs/architecture.md). A refused call (bad sequence, token, count or context
 * overflow of any sequence) changes no sequence. */
int ek_forward_batch(ek_model *m, ek_seq *const *seqs, int n_seqs, const int32_t *tokens, const int32_t *counts,
                     float *logits);

/* ---- weight conversion at load (weight_convert.c) ----
 * GGUF types the kernels do not run: Q4_K -> Q4_1 (codes kept, scales rounded to fp16),
 * Q5_0 -> Q8_0 (exact), Q6_K -> Q8_0 (requantized). ek_convert_target: the EK_TYPE_* a source
 * GGML type id becomes for rows of n_in values, or EK_ERR_INVALID when there is no C conversion.
 * ek_convert_weights: converts n_rows rows; src_bytes / dst_bytes must be the exact sizes; returns
 * the destination type or EK_ERR_INVALID. */
int ek_convert_target(int src_type, int64_t n_in);
int ek_convert_weights(int src_type, const void *src, size_t src_bytes, int64_t n_in, int64_t n_rows, void *dst,
                       size_t dst_bytes);

/* ---- weights converted once (python/edgekv/weight_cache.py) ----
 * ek_pack_weights: the row-interleaved copy of a matrix that the model would make at load (x8
 * kernels), written to dst (n_rows * row bytes): 1 if written, 0 if this build runs the type as
 * rows (dst untouched), EK_ERR_INVALID on bad arguments. A matrix given to ek_model_set_tensor
 * with type | EK_TYPE_PACKED_X8 is such a copy: the model borrows it as is (no copy; dst must be
 * 64-byte aligned and outlive the model), and ek_model_tensor_released stays 0 for it. */
#define EK_TYPE_PACKED_X8 0x100
int ek_pack_weights(int type, const void *src, size_t src_bytes, int64_t n_in, int64_t n_rows, void *dst,
                    size_t dst_bytes);

/* cffi-end */

#ifdef __cplusplus
}
#endif

#endif
