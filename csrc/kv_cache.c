#include "kv_cache.h"

#include <stdint.h>
#include <stdlib.h>

int ek_kv_init(ek_kv_cache *kv, int n_layer, int n_kv_head, int head_dim, int n_ctx) {
    kv->n_layer = n_layer;
    kv->n_kv_head = n_kv_head;
    kv->head_dim = head_dim;
    kv->n_ctx = n_ctx;
    kv->n = 0;
    size_t n_elem = (size_t)n_layer * n_kv_head * n_ctx * head_dim;
    if (n_elem / n_ctx / head_dim != (size_t)n_layer * n_kv_head || n_elem > SIZE_MAX / 4) return -1;
    /* calloc: pages are only touched (and counted as resident) as the context fills */
    kv->k = (ek_fp16 *)calloc(n_elem, sizeof(ek_fp16));
    kv->v = (ek_fp16 *)calloc(n_elem, sizeof(ek_fp16));
    if (!kv->k || !kv->v) {
        ek_kv_free(kv);
        return -1;
    }
    return 0;
}

void ek_kv_free(ek_kv_cache *kv) {
    free(kv->k);
    free(kv->v);
    kv->k = kv->v = NULL;
}

void ek_kv_write(ek_kv_cache *kv, int layer, int pos, const float *k, const float *v) {
    for (int h = 0; h < kv->n_kv_head; h++) {
        ek_fp32_to_fp16_row(k + h * kv->head_dim, (ek_fp16 *)ek_kv_k(kv, layer, h, pos), kv->head_dim);
        ek_fp32_to_fp16_row(v + h * kv->head_dim, (ek_fp16 *)ek_kv_v(kv, layer, h, pos), kv->head_dim);
    }
}

size_t ek_kv_cache_bytes_per_token(const ek_kv_cache *kv) {
    return (size_t)2 * kv->n_layer * kv->n_kv_head * kv->head_dim * sizeof(ek_fp16);
}
