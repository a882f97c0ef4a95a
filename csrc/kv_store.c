#include "kv_store.h"

#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define EK_HAVE_MMAP 1
#endif

static int is_pow2(int x) { return x > 0 && (x & (x - 1)) == 0; }

static void map_layout(const ek_kv_store *s, ek_kv_map *mp) {
    for (int kp = 0; kp < KVP_COUNT; kp++)
        for (int vp = 0; vp < KVP_COUNT; vp++) {
            ek_kv_pool *p = &mp->pools[KV_POOL(kp, vp)];
            p->kp = kp;
            p->vp = vp;
            p->k_bytes = ek_kv_prec(kp)->record_bytes(s->head_dim, s->group[kp]);
            p->v_bytes = ek_kv_prec(vp)->record_bytes(s->head_dim, s->group[vp]);
            p->rec_bytes = p->k_bytes + p->v_bytes;
            p->layer0 = mp->layer0;
        }
}

static void set_layout(ek_kv_store *s) {
    map_layout(s, &s->shared);
    if (s->per_layer)
        for (int l = 0; l < s->n_layer; l++) map_layout(s, &s->per_layer[l]);
}

/* Zeroed memory whose pages are only committed when written. calloc promises that only while it
 * maps the block itself: once a freed block has raised glibc's mmap threshold, the next pools come
 * from the heap and are zeroed, i.e. committed, in full, and a process that opens and closes
 * sessions grows by the whole reservation each time (benchmarks/results/serve_load.md). A header
 * before the block keeps its size and the 64-byte alignment. */
#define LAZY_HEADER 64
static void *lazy_zalloc(size_t n) {
#ifdef EK_HAVE_MMAP
    void *p = mmap(NULL, n + LAZY_HEADER, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    *(size_t *)p = n + LAZY_HEADER;
    return (uint8_t *)p + LAZY_HEADER;
#else
    return calloc(n, 1);
#endif
}

static void lazy_free(void *q) {
    if (!q) return;
#ifdef EK_HAVE_MMAP
    uint8_t *p = (uint8_t *)q - LAZY_HEADER;
    munmap(p, *(size_t *)p);
#else
    free(q);
#endif
}

static void map_free(ek_kv_map *mp) {
    for (int i = 0; i < KV_NPOOLS; i++) {
        lazy_free(mp->pools[i].data);
        free(mp->pools[i].pos);
        mp->pools[i].data = NULL;
        mp->pools[i].pos = NULL;
    }
    free(mp->pool_of); free(mp->slot_of);
    mp->pool_of = NULL; mp->slot_of = NULL;
}

/* Pools reserve room for the whole context in untouched pages (lazy_zalloc): memory is only
 * committed as slots fill. Sized for the largest possible record so reconfiguring the groups never
 * needs a new block. */
static int map_alloc(const ek_kv_store *s, ek_kv_map *mp, int layer0, int n_layers) {
    memset(mp, 0, sizeof *mp);
    mp->layer0 = layer0;
    mp->n_layers = n_layers;
    mp->pool_of = (uint8_t *)calloc((size_t)s->n_ctx, 1);
    mp->slot_of = (int32_t *)calloc((size_t)s->n_ctx, sizeof(int32_t));
    if (!mp->pool_of || !mp->slot_of) goto fail;
    const size_t max_rec = 2 * ek_kv_prec(KVP_F16)->record_bytes(s->head_dim, s->head_dim);
    for (int i = 0; i < KV_NPOOLS; i++) {
        ek_kv_pool *p = &mp->pools[i];
        p->data = (uint8_t *)lazy_zalloc((size_t)n_layers * s->n_kv_head * s->n_ctx * max_rec);
        p->pos = (int32_t *)calloc((size_t)s->n_ctx, sizeof(int32_t));
        if (!p->data || !p->pos) goto fail;
    }
    map_layout(s, mp);
    return 0;
fail:
    map_free(mp);
    return -1;
}

int ek_kv_store_init(ek_kv_store *s, int n_layer, int n_kv_head, int head_dim, int n_ctx) {
    memset(s, 0, sizeof *s);
    s->n_layer = n_layer;
    s->n_kv_head = n_kv_head;
    s->head_dim = head_dim;
    s->n_ctx = n_ctx;
    for (int p = 0; p < KVP_COUNT; p++) s->group[p] = head_dim % 64 == 0 ? 64 : 32;
    s->group[KVP_F16] = head_dim;
    s->signs = (float *)malloc(sizeof(float) * head_dim);
    s->att_sum = (double *)calloc((size_t)n_ctx, sizeof(double));
    s->att_sumsq = (double *)calloc((size_t)n_ctx, sizeof(double));
    s->att_count = (int32_t *)calloc((size_t)n_ctx, sizeof(int32_t));
    s->k_center = (float *)calloc((size_t)n_layer * n_kv_head * head_dim, sizeof(float));
    if (!s->k_center || !s->signs || !s->att_sum || !s->att_sumsq || !s->att_count) goto fail;
    /* fixed signs (xorshift): the same rotation on every machine and run */
    uint32_t r = 0x2545F491u;
    for (int i = 0; i < head_dim; i++) {
        r ^= r << 13; r ^= r >> 17; r ^= r << 5;
        s->signs[i] = (r & 1) ? -1.0f : 1.0f;
    }
    if (map_alloc(s, &s->shared, 0, n_layer)) goto fail;
    s->rotate = is_pow2(head_dim) && head_dim % 32 == 0;
    return 0;
fail:
    ek_kv_store_free(s);
    return -1;
}

void ek_kv_store_free(ek_kv_store *s) {
    map_free(&s->shared);
    if (s->per_layer)
        for (int l = 0; l < s->n_layer; l++) map_free(&s->per_layer[l]);
    free(s->per_layer); s->per_layer = NULL;
    s->split = 0;
    free(s->k_center); s->k_center = NULL;
    free(s->signs); free(s->att_sum); free(s->att_sumsq); free(s->att_count);
    s->signs = NULL;
    s->att_sum = s->att_sumsq = NULL; s->att_count = NULL;
}

int ek_kv_store_split(ek_kv_store *s) {
    if (s->split) return 0;
    if (!s->per_layer) {
        ek_kv_map *pl = (ek_kv_map *)calloc((size_t)s->n_layer, sizeof(ek_kv_map));
        if (!pl) return -1;
        for (int l = 0; l < s->n_layer; l++)
            if (map_alloc(s, &pl[l], l, 1)) {
                for (int i = 0; i <= l; i++) map_free(&pl[i]);
                free(pl);
                return -1;
            }
        s->per_layer = pl;
    }
    const ek_kv_map *sh = &s->shared;
    for (int l = 0; l < s->n_layer; l++) {
        ek_kv_map *mp = &s->per_layer[l];
        memcpy(mp->pool_of, sh->pool_of, (size_t)s->n);
        memcpy(mp->slot_of, sh->slot_of, sizeof(int32_t) * s->n);
        for (int i = 0; i < KV_NPOOLS; i++) {
            const ek_kv_pool *a = &sh->pools[i];
            ek_kv_pool *b = &mp->pools[i];
            b->n = a->n;
            memcpy(b->pos, a->pos, sizeof(int32_t) * a->n);
            for (int h = 0; h < s->n_kv_head && a->n; h++) /* slots 0..n-1 of a (layer, head) are contiguous */
                memcpy(ek_kv_rec(s, b, l, h, 0), ek_kv_rec(s, a, l, h, 0), (size_t)a->n * a->rec_bytes);
        }
    }
    s->split = 1;
    return 0;
}

int ek_kv_store_configure(ek_kv_store *s, const int group[KVP_COUNT], int rotate, int center, int fit) {
    if (s->n != 0) return -1;
    for (int p = KVP_Q8; p < KVP_COUNT; p++) {
        const int g = group[p];
        if (g < 32 || g % 32 || s->head_dim % g) return -1;
    }
    if (rotate && (!is_pow2(s->head_dim) || s->head_dim % 32)) return -1;
    for (int p = KVP_Q8; p < KVP_COUNT; p++) s->group[p] = group[p];
    s->rotate = rotate;
    s->center = center != 0;
    s->fit = fit != 0;
    s->center_ready = 0;
    set_layout(s);
    return 0;
}

/* The maps in use: the shared one, or the per-layer ones. */
static int n_maps(const ek_kv_store *s) { return s->split ? s->n_layer : 1; }
static ek_kv_map *map_at(ek_kv_store *s, int i) { return s->split ? &s->per_layer[i] : &s->shared; }

void ek_kv_store_append(ek_kv_store *s, int count) {
    for (int mi = 0; mi < n_maps(s); mi++) {
        ek_kv_map *mp = map_at(s, mi);
        ek_kv_pool *p = &mp->pools[KV_POOL(KVP_F16, KVP_F16)];
        for (int i = 0; i < count; i++) {
            const int pos = s->n + i;
            mp->pool_of[pos] = KV_POOL(KVP_F16, KVP_F16);
            mp->slot_of[pos] = p->n;
            p->pos[p->n++] = pos;
        }
    }
    for (int i = 0; i < count; i++) {
        const int pos = s->n + i;
        s->att_sum[pos] = s->att_sumsq[pos] = 0.0;
        s->att_count[pos] = 0;
    }
    s->n += count;
}

void ek_kv_store_put(ek_kv_store *s, int layer, int pos, const float *k, const float *v) {
    /* new tokens are FP16/FP16: records are two fp16 vectors */
    const ek_kv_map *mp = ek_kv_map_of(s, layer);
    const ek_kv_pool *p = &mp->pools[mp->pool_of[pos]];
    const ek_kv_type *kt = ek_kv_prec(p->kp), *vt = ek_kv_prec(p->vp);
    for (int h = 0; h < s->n_kv_head; h++) {
        uint8_t *rec = ek_kv_rec(s, p, layer, h, mp->slot_of[pos]);
        kt->quantize(k + (size_t)h * s->head_dim, rec, s->head_dim, s->group[p->kp], s->fit);
        vt->quantize(v + (size_t)h * s->head_dim, rec + p->k_bytes, s->head_dim, s->group[p->vp], s->fit);
    }
}

/* Remove a slot by moving the pool's last slot into it. */
static void pool_remove(const ek_kv_store *s, ek_kv_map *mp, ek_kv_pool *p, int slot) {
    const int last = p->n - 1;
    if (slot != last) {
        for (int l = mp->layer0; l < mp->layer0 + mp->n_layers; l++)
            for (int h = 0; h < s->n_kv_head; h++)
                memcpy(ek_kv_rec(s, p, l, h, slot), ek_kv_rec(s, p, l, h, last), p->rec_bytes);
        const int moved = p->pos[last];
        p->pos[slot] = moved;
        mp->slot_of[moved] = slot;
    }
    p->n = last;
}

/* One head's vector of a record, as floats in the unrotated basis; center: the key center
 * (NULL for values and uncentered keys), added back to quantized records. */
static void record_to_float(const ek_kv_store *s, int prec, const uint8_t *rec, float *x, const float *center) {
    ek_kv_prec(prec)->dequant_ref(rec, x, s->head_dim, s->group[prec]);
    if (prec == KVP_F16) return;
    if (s->rotate) ek_unrotate(x, s->signs, s->head_dim);
    if (center)
        for (int i = 0; i < s->head_dim; i++) x[i] += center[i];
}

static void float_to_record(const ek_kv_store *s, int prec, float *x, uint8_t *rec, const float *center) {
    if (prec != KVP_F16) {
        if (center)
            for (int i = 0; i < s->head_dim; i++) x[i] -= center[i];
        if (s->rotate) ek_rotate(x, s->signs, s->head_dim);
    }
    ek_kv_prec(prec)->quantize(x, rec, s->head_dim, s->group[prec], s->fit);
}

/* Fix the key centers: per (layer, head), the mean of the keys at positions 1..n-1 (position 0
 * alone when it is the only one). Called before the first key leaves 16 bits, so every key is
 * still an fp16 record. */
static void set_key_centers(ek_kv_store *s) {
    const int hd = s->head_dim, p0 = s->n > 1 ? 1 : 0;
    float x[1024];
    double acc[1024];
    for (int l = 0; l < s->n_layer; l++)
        for (int h = 0; h < s->n_kv_head; h++) {
            for (int i = 0; i < hd; i++) acc[i] = 0.0;
            const ek_kv_map *mp = ek_kv_map_of(s, l);
            for (int pos = p0; pos < s->n; pos++) {
                const ek_kv_pool *p = &mp->pools[mp->pool_of[pos]];
                record_to_float(s, p->kp, ek_kv_rec(s, p, l, h, mp->slot_of[pos]), x, NULL);
                for (int i = 0; i < hd; i++) acc[i] += x[i];
            }
            float *c = s->k_center + ((size_t)l * s->n_kv_head + h) * hd;
            for (int i = 0; i < hd; i++) c[i] = (float)(acc[i] / (s->n - p0)); /* n >= 1: a position is moving */
        }
    s->center_ready = 1;
}

static void map_set_prec(ek_kv_store *s, ek_kv_map *mp, int pos, int kp, int vp) {
    ek_kv_pool *src = &mp->pools[mp->pool_of[pos]];
    const int dst_id = KV_POOL(kp, vp);
    if (&mp->pools[dst_id] == src) return;
    ek_kv_pool *dst = &mp->pools[dst_id];
    const int from = mp->slot_of[pos], to = dst->n;
    float x[1024];
    for (int l = mp->layer0; l < mp->layer0 + mp->n_layers; l++)
        for (int h = 0; h < s->n_kv_head; h++) {
            const uint8_t *a = ek_kv_rec(s, src, l, h, from);
            uint8_t *b = ek_kv_rec(s, dst, l, h, to);
            const float *c = ek_kv_center(s, l, h);
            if (src->kp == kp) {
                memcpy(b, a, src->k_bytes);
            } else {
                record_to_float(s, src->kp, a, x, c);
                float_to_record(s, kp, x, b, c);
            }
            if (src->vp == vp) {
                memcpy(b + dst->k_bytes, a + src->k_bytes, src->v_bytes);
            } else {
                record_to_float(s, src->vp, a + src->k_bytes, x, NULL);
                float_to_record(s, vp, x, b + dst->k_bytes, NULL);
            }
        }
    dst->pos[to] = pos;
    dst->n++;
    pool_remove(s, mp, src, from);
    mp->pool_of[pos] = (uint8_t)dst_id;
    mp->slot_of[pos] = to;
}

void ek_kv_store_set_prec(ek_kv_store *s, int layer, int pos, int kp, int vp) {
    if (s->center && !s->center_ready && kp != KVP_F16) set_key_centers(s);
    if (layer >= 0) {
        map_set_prec(s, &s->per_layer[layer], pos, kp, vp); /* the caller split the store */
        return;
    }
    for (int mi = 0; mi < n_maps(s); mi++) map_set_prec(s, map_at(s, mi), pos, kp, vp);
}

void ek_kv_store_truncate(ek_kv_store *s, int n) {
    for (int mi = 0; mi < n_maps(s); mi++) {
        ek_kv_map *mp = map_at(s, mi);
        for (int pos = s->n - 1; pos >= n; pos--) pool_remove(s, mp, &mp->pools[mp->pool_of[pos]], mp->slot_of[pos]);
    }
    if (n < s->n) s->n = n;
    if (s->n == 0) {
        s->center_ready = 0; /* a new context sets new centers */
        if (s->split) { /* back to one shared map (left as it was at the split) */
            for (int i = 0; i < KV_NPOOLS; i++) s->shared.pools[i].n = 0;
            s->split = 0;
        }
    }
}

size_t ek_kv_store_data_bytes(const ek_kv_store *s) {
    size_t b = 0;
    for (int mi = 0; mi < n_maps(s); mi++) {
        const ek_kv_map *mp = s->split ? &s->per_layer[mi] : &s->shared;
        size_t mb = 0;
        for (int i = 0; i < KV_NPOOLS; i++) mb += (size_t)mp->pools[i].n * mp->pools[i].rec_bytes;
        b += mb * mp->n_layers;
    }
    return b * s->n_kv_head;
}

size_t ek_kv_store_bytes(const ek_kv_store *s) {
    return ek_kv_store_data_bytes(s) + (size_t)n_maps(s) * s->n * (sizeof(uint8_t) + sizeof(int32_t));
}

void ek_kv_store_get(const ek_kv_store *s, int layer, int pos, float *k, float *v) {
    const ek_kv_map *mp = ek_kv_map_of(s, layer);
    const ek_kv_pool *p = &mp->pools[mp->pool_of[pos]];
    for (int h = 0; h < s->n_kv_head; h++) {
        const uint8_t *rec = ek_kv_rec(s, p, layer, h, mp->slot_of[pos]);
        record_to_float(s, p->kp, rec, k + (size_t)h * s->head_dim, ek_kv_center(s, layer, h));
        record_to_float(s, p->vp, rec + p->k_bytes, v + (size_t)h * s->head_dim, NULL);
    }
}
