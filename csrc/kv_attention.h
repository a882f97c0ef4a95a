/* Fused attention over the mixed-precision KV store.
 *
 * A query group (the gs query heads that share one KV head) attends to the
 * store pool by pool, tile by tile (ATTN_CHUNK records): a tile is scored,
 * then folded into a running (max m, sum l, weighted values o) per head:
 * online softmax. No dequantized copy of the cache is built. GQA pays off
 * here: each record is unpacked once for all gs heads.
 *
 * How a tile is read depends on the build and the precision's row in the table
 * of precisions (kv_types.c; a kernel it lacks falls back to the next below):
 *   - 6-, 4-, 3- and 2-bit keys (AVX2): integer dot products of the codes with an int8
 *     copy of the query (vpdpbusd / vpmaddubsw), scale and minimum applied per
 *     group afterwards (see ek_attn_query_i8 for the query rounding, which
 *     the other builds apply too); with AVX-512, 4- and 2-bit keys with one
 *     group per record 16 records at a time, transposed (kv_attention_x512.h),
 *     same scores;
 *   - quantized values: with AVX-512, 8-, 4- and 2-bit values as integer sums
 *     of the codes against weight * scale rounded per tile (8 bits for 4-
 *     and 2-bit values, 15 for 8-bit; kv_attention_x512.h,
 *     ek_attn_value_weight_max); AVX2 (and 6- and 3-bit values under AVX-512):
 *     codes converted to float in registers and summed with weight * scale;
 *     the minimum's share added once per group in both;
 *   - NEON: every precision's keys and values read straight from the records
 *     (kv_attention_neon.h; 6-, 4-, 3- and 2-bit keys as integer dot products
 *     with the int8 query);
 *   - FP16 and 8-bit keys (AVX2), shapes no kernel takes, and every precision in
 *     scalar builds: the tile is dequantized into an L1-sized scratch and
 *     processed in float.
 * Partials from different chunks, pools or threads merge by log-sum-exp, so
 * work can be split across heads, pools and positions.
 *
 * Keys in FP16 pools are scored with the plain query, quantized keys with the
 * rotated query; values from FP16 pools sum into o_plain, quantized ones into
 * o_rot, which is rotated back once at the end.
 */
#ifndef EDGEKV_KV_ATTENTION_H
#define EDGEKV_KV_ATTENTION_H

#include "kv_store.h"

#ifndef ATTN_CHUNK
#define ATTN_CHUNK 64 /* records per tile: scored, then their values accumulated (tiles stay in L1) */
#endif

typedef struct {
    const ek_kv_store *s;
    int layer, head;     /* KV head */
    int gs;              /* query heads sharing it */
    const float *q;      /* (gs, head_dim) scaled query, plain basis */
    const float *q_rot;  /* (gs, head_dim) scaled query, rotated basis (== q without rotation) */
    int max_pos;         /* causal limit: positions > max_pos are not attended */
    float *raw;          /* optional (gs, n_ctx): raw scores by position, for statistics */
    int min_pos;         /* sliding window: positions < min_pos are not attended either (0: none) */
} ek_attn_args;

typedef struct {
    float *m, *l;        /* (gs) running max and sum of exp */
    float *o_plain;      /* (gs, head_dim) */
    float *o_rot;        /* (gs, head_dim) */
} ek_attn_partial;

/* Floats of scratch a partial needs, and of scratch for ek_attend_range. */
size_t ek_attn_partial_floats(int gs, int head_dim);
size_t ek_attn_scratch_floats(int gs, int head_dim);

/* Lay a partial out over buf (ek_attn_partial_floats floats) and clear it. */
void ek_attn_partial_init(ek_attn_partial *p, float *buf, int gs, int head_dim);

/* Attend to slots [j0, j1) of one pool, folding them into part. */
void ek_attend_range(const ek_attn_args *a, const ek_kv_pool *pool, int j0, int j1, ek_attn_partial *part,
                     float *scratch);
/* Attend to the whole store. */
void ek_attend_all(const ek_attn_args *a, ek_attn_partial *part, float *scratch);

/* into <- into (+) from */
void ek_attn_merge(ek_attn_partial *into, const ek_attn_partial *from, int gs, int head_dim);
/* out (gs, head_dim) = (o_plain + R^T o_rot) / l */
void ek_attn_finish(const ek_attn_partial *p, const ek_kv_store *s, int gs, float *out);

/* Where ek_attn_int_keys(kp, head_dim, gs) says so (6-, 4-, 3- and 2-bit keys, head_dim a multiple of 64
 * up to 256, gs <= 8), keys are scored against the int8-rounded query s * q8, in every build (AVX2
 * and NEON with integer dot products, plain C in float, so builds agree up to float rounding); q8
 * and s come from ek_attn_query_i8 on each head's (rotated, scaled) query: s = max|q| / 127,
 * q8 = rint(q / s). It returns -1 for a non-finite query (then the plain query is used). */
int ek_attn_query_i8(const float *q, int n, int8_t *q8, float *scale);
/* out (gs, hd) = s * q8 of each head of q (gs, hd): the query those keys are scored with; -1 (out
 * unspecified) when any head is non-finite or hd > 256, and then every head uses the plain query. */
int ek_attn_query_rounded(const float *q, int gs, int hd, float *out);
int ek_attn_int_keys(int kp, int head_dim, int gs);
/* 1 if values of precision id vp, head_dim and gs query heads take the AVX-512 integer value sum. */
int ek_attn_values_x512(int vp, int head_dim, int gs);

/* x[i] = exp(x[i] - m); returns the sum. */
float ek_exp_shift(float *x, int n, float m);

#endif
