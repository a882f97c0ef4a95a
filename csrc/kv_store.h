/* Mixed-precision KV store.
 *
 * Every token's keys and values (all layers, all KV heads) live in one pool,
 * chosen by the pair (key precision, value precision): 5 x 5 = 25 pools. A
 * pool is a dense run of slots, so each attention kernel streams contiguous
 * records of one precision pair; a position map says where each token is.
 * Moving a token to another pool re-encodes its records and fills the hole it
 * leaves with the pool's last slot (one record moves, nothing else).
 *
 * Tokens enter in FP16/FP16 (pool 0), unrotated, so an all-FP16 cache gives
 * exactly the plain FP16 attention. Quantized records are stored rotated
 * (randomized Hadamard, when enabled): attention rotates the query for
 * quantized keys and un-rotates the output gathered from quantized values.
 *
 * Key centering (when enabled): quantized key records hold k - c, with c one
 * fixed vector per (layer, KV head). Softmax ignores a score offset shared by
 * every position, and q.k = q.(k - c) + q.c, so attention adds q.c to the
 * scores of quantized keys and stays exact; what changes is that the
 * per-channel offset keys carry (large in a few channels, the same for every
 * token) no longer widens each token's quantization range. c is the mean of
 * the 16-bit keys at positions 1..n-1 (position 0, an attention sink, is
 * unlike the rest) at the moment the first key is quantized, and stays fixed
 * until the store is emptied.
 */
#ifndef EDGEKV_KV_STORE_H
#define EDGEKV_KV_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "kv_quant.h"

#define KV_NPOOLS (KVP_COUNT * KVP_COUNT)
#define KV_POOL(kp, vp) ((kp) * KVP_COUNT + (vp))

typedef struct {
    int kp, vp;           /* key / value precision ids */
    size_t k_bytes;       /* bytes of one key record (one layer, one head) */
    size_t v_bytes;
    size_t rec_bytes;     /* k_bytes + v_bytes */
    int n;                /* live slots */
    int layer0;           /* first layer whose records data holds */
    uint8_t *data;        /* (layer - layer0, kv_head, n_ctx, rec_bytes): [key record | value record] */
    int32_t *pos;         /* (n_ctx) position held by each slot */
} ek_kv_pool;

/* A precision map: the 25 pools and where each position sits, for layers layer0..layer0+n_layers-1. */
typedef struct {
    ek_kv_pool pools[KV_NPOOLS];
    uint8_t *pool_of;     /* (n_ctx) pool id of each position */
    int32_t *slot_of;     /* (n_ctx) slot of each position in its pool */
    int layer0, n_layers;
} ek_kv_map;

typedef struct {
    int n_layer, n_kv_head, head_dim, n_ctx;
    int group[KVP_COUNT]; /* quantization group size per precision (ignored for FP16) */
    int rotate;
    float *signs;         /* (head_dim) random signs of the rotation */
    int center;           /* center quantized keys (see above) */
    int center_ready;     /* k_center is fixed (set at the first key quantization) */
    int fit;              /* fit each group's grid to its values (kv_quant.c) instead of min/max */
    float *k_center;      /* (n_layer, n_kv_head, head_dim) */
    int n;                /* tokens stored: positions 0..n-1 */
    /* Precision per (layer, position). While every layer has the same bits, one shared map holds
     * all layers (the map costs what it did before maps went per layer). The first call that gives
     * one layer other bits splits the store: each layer gets its own map, a copy of the shared one
     * (same slot order, so layers that keep their bits attend bit-identically), and keeps it until
     * the context is emptied. The attention of layer l reads only ek_kv_map_of(s, l). */
    ek_kv_map shared;
    ek_kv_map *per_layer; /* (n_layer), allocated at the first split and kept for reuse */
    int split;            /* per_layer is in use */
    /* last-layer attention statistics per position, over heads and queries */
    double *att_sum, *att_sumsq; /* (n_ctx) */
    int32_t *att_count;          /* (n_ctx) */
} ek_kv_store;

int ek_kv_store_init(ek_kv_store *s, int n_layer, int n_kv_head, int head_dim, int n_ctx);
void ek_kv_store_free(ek_kv_store *s);

/* Group sizes, rotation, key centering and grid fitting; only while the store is empty. 0 = ok, -1 = invalid. */
int ek_kv_store_configure(ek_kv_store *s, const int group[KVP_COUNT], int rotate, int center, int fit);

/* The key center of (layer, head), or NULL while keys are not centered. */
static inline const float *ek_kv_center(const ek_kv_store *s, int layer, int head) {
    return s->center_ready ? s->k_center + ((size_t)layer * s->n_kv_head + head) * s->head_dim : NULL;
}

static inline const ek_kv_map *ek_kv_map_of(const ek_kv_store *s, int layer) {
    return s->split ? &s->per_layer[layer] : &s->shared;
}

/* Give every layer its own map (no-op when split). 0 = ok, -1 = out of memory (nothing changed). */
int ek_kv_store_split(ek_kv_store *s);

/* Append positions n..n+count-1 as FP16/FP16 slots (records filled by ek_kv_store_put). */
void ek_kv_store_append(ek_kv_store *s, int count);
/* Write one token's keys and values for one layer: (n_kv_head, head_dim) floats each. */
void ek_kv_store_put(ek_kv_store *s, int layer, int pos, const float *k, const float *v);
/* Re-encode one position at new precisions (ids) in one layer, or in all layers (layer -1).
 * A single layer needs a split store (ek_kv_store_split). */
void ek_kv_store_set_prec(ek_kv_store *s, int layer, int pos, int kp, int vp);
/* Precision ids of one position in one layer. */
static inline void ek_kv_store_prec(const ek_kv_store *s, int layer, int pos, int *kp, int *vp) {
    const ek_kv_map *mp = ek_kv_map_of(s, layer);
    const ek_kv_pool *p = &mp->pools[mp->pool_of[pos]];
    *kp = p->kp;
    *vp = p->vp;
}
/* Drop positions >= n. */
void ek_kv_store_truncate(ek_kv_store *s, int n);

static inline uint8_t *ek_kv_rec(const ek_kv_store *s, const ek_kv_pool *p, int layer, int head, int slot) {
    return p->data + (((size_t)(layer - p->layer0) * s->n_kv_head + head) * s->n_ctx + slot) * p->rec_bytes;
}

/* Exact memory: record bytes of all live slots plus the position maps (one, or one per layer when split). */
size_t ek_kv_store_bytes(const ek_kv_store *s);
/* Record bytes only (for average bits per element). */
size_t ek_kv_store_data_bytes(const ek_kv_store *s);

/* Dequantized keys/values of one position (rotation undone): (n_kv_head, head_dim) floats each. */
void ek_kv_store_get(const ek_kv_store *s, int layer, int pos, float *k, float *v);

#endif
