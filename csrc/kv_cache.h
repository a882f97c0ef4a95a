/* KV cache: one record per (layer, token) holding that token's keys and values
 * for every KV head. Today every record is FP16; the layout keeps each head's
 * positions contiguous so attention streams one head at a time, and the
 * per-token record is the unit a mixed-precision store will re-encode.
 */
#ifndef EDGEKV_KV_CACHE_H
#define EDGEKV_KV_CACHE_H

#include <stddef.h>

#include "quant.h"

typedef struct {
    int n_layer, n_kv_head, head_dim, n_ctx;
    int n;          /* tokens stored (positions 0..n-1) */
    ek_fp16 *k;     /* (layer, kv_head, n_ctx, head_dim) */
    ek_fp16 *v;     /* (layer, kv_head, n_ctx, head_dim) */
} ek_kv_cache;

int ek_kv_init(ek_kv_cache *kv, int n_layer, int n_kv_head, int head_dim, int n_ctx);
void ek_kv_free(ek_kv_cache *kv);

/* Store one token's keys and values (n_kv_head * head_dim floats each) for one layer. */
void ek_kv_write(ek_kv_cache *kv, int layer, int pos, const float *k, const float *v);

static inline const ek_fp16 *ek_kv_k(const ek_kv_cache *kv, int layer, int head, int pos) {
    return kv->k + (((size_t)layer * kv->n_kv_head + head) * kv->n_ctx + pos) * kv->head_dim;
}
static inline const ek_fp16 *ek_kv_v(const ek_kv_cache *kv, int layer, int head, int pos) {
    return kv->v + (((size_t)layer * kv->n_kv_head + head) * kv->n_ctx + pos) * kv->head_dim;
}

size_t ek_kv_cache_bytes_per_token(const ek_kv_cache *kv);

#endif
