/* GGUF weight types the kernels do not run, converted at load into ones they do.
 *
 * Each row of CONVERSIONS maps a source block format to a kernel type:
 *   Q4_K -> Q4_1: a Q4_K super-block of 256 is 8 sub-blocks of 32 with 4-bit codes, each
 *       value d * sc * q - dmin * mn (sc, mn 6-bit); a Q4_1 block is d' * q + m'. The codes are
 *       kept; only d' = fp16(d * sc) and m' = fp16(-dmin * mn) are rounded (relative error
 *       <= 2^-11 of a scale), so a weight moves by at most 2^-11 of its block's range. 5.0 bits
 *       per weight where Q8_0 would take 8.5, and closer to the file than requantizing would be.
 *   Q5_0 -> Q8_0: the 5-bit codes minus 16 are int8 values under the same scale: exact.
 *   Q6_K -> Q8_0: a Q8_0 block of 32 spans two Q6_K sub-blocks of 16 with different 8-bit scales,
 *       so the values are rebuilt (d * sc * q, float) and requantized to 8 bits with
 *       d = max|x| / 127, q = round(x / d) (halves away from zero), as llama.cpp's reference
 *       quantizer and gguf-py's do: an error <= d / 2 per weight.
 * Block layouts follow ggml (ggml-common.h) and the GGUF spec; the tests check each converter
 * against gguf-py's NumPy dequantizers.
 */
#include <math.h>
#include <string.h>

#include "edgekv.h"
#include "quant.h"

/* GGML type ids of the source formats */
enum { GGML_Q5_0 = 6, GGML_Q4_K = 12, GGML_Q6_K = 14 };
#define QK_K 256

typedef struct {
    ek_fp16 d;
    uint8_t qh[4];
    uint8_t qs[QK / 2];
} block_q5_0;
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 must match GGUF");

typedef struct {
    ek_fp16 d;
    ek_fp16 dmin;
    uint8_t scales[12]; /* 8 scales and 8 minimums, 6 bits each */
    uint8_t qs[QK_K / 2];
} block_q4_k;
static_assert(sizeof(block_q4_k) == 144, "block_q4_K must match GGUF");

typedef struct {
    uint8_t ql[QK_K / 2]; /* low 4 bits */
    uint8_t qh[QK_K / 4]; /* high 2 bits */
    int8_t scales[QK_K / 16];
    ek_fp16 d;
} block_q6_k;
static_assert(sizeof(block_q6_k) == 210, "block_q6_K must match GGUF");

/* scale and minimum of sub-block j (0..7) of a Q4_K block: 6 bits each, the last four split */
static void q4_k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* nb source blocks -> destination blocks (8 Q4_1 / 1 Q8_0 / 8 Q8_0 per source block) */
static void q4_k_to_q4_1(const void *src, void *dst, int64_t nb) {
    const block_q4_k *x = (const block_q4_k *)src;
    block_q4_1 *y = (block_q4_1 *)dst;
    for (int64_t b = 0; b < nb; b++, x++) {
        const float d = ek_fp16_to_fp32(x->d), dmin = ek_fp16_to_fp32(x->dmin);
        for (int j = 0; j < 8; j++, y++) {
            int sc, mn;
            q4_k_scale_min(x->scales, j, &sc, &mn);
            y->d = ek_fp32_to_fp16(d * (float)sc);
            y->m = ek_fp32_to_fp16(-dmin * (float)mn);
            /* sub-block j: the low (j even) or high (j odd) nibbles of qs[32 (j / 2) .. + 32) */
            const uint8_t *q = x->qs + 32 * (j / 2);
            const int shift = 4 * (j & 1);
            for (int i = 0; i < QK / 2; i++)
                y->qs[i] = (uint8_t)(((q[i] >> shift) & 15) | (((q[i + 16] >> shift) & 15) << 4));
        }
    }
}

static void q5_0_to_q8_0(const void *src, void *dst, int64_t nb) {
    const block_q5_0 *x = (const block_q5_0 *)src;
    block_q8_0 *y = (block_q8_0 *)dst;
    for (int64_t b = 0; b < nb; b++, x++, y++) {
        uint32_t qh;
        memcpy(&qh, x->qh, 4); /* bit i: the fifth bit of element i */
        y->d = x->d;
        for (int i = 0; i < QK / 2; i++) {
            y->qs[i] = (int8_t)(((x->qs[i] & 15) | (((qh >> i) & 1) << 4)) - 16);
            y->qs[i + 16] = (int8_t)(((x->qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - 16);
        }
    }
}

/* 32 floats -> one Q8_0 block (llama.cpp's reference rounding) */
static void quantize_q8_0_block(const float *v, block_q8_0 *y) {
    float amax = 0.0f;
    for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(v[i]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = ek_fp32_to_fp16(d);
    for (int i = 0; i < QK; i++) y->qs[i] = (int8_t)roundf(v[i] * id);
}

static void q6_k_to_q8_0(const void *src, void *dst, int64_t nb) {
    const block_q6_k *x = (const block_q6_k *)src;
    block_q8_0 *y = (block_q8_0 *)dst;
    for (int64_t b = 0; b < nb; b++, x++) {
        const float d = ek_fp16_to_fp32(x->d);
        float v[QK_K];
        /* two halves of 128: element 32 k + l (k = 0..3, l = 0..31) of a half takes 4 bits of
         * ql[l + 32 (k & 1)] (high nibble for k >= 2) and bits 2k, 2k+1 of qh[l], scale l / 16 + 2k */
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = x->ql + 64 * h, *qh = x->qh + 32 * h;
            const int8_t *sc = x->scales + 8 * h;
            for (int l = 0; l < 32; l++)
                for (int k = 0; k < 4; k++) {
                    const int lo = (ql[l + 32 * (k & 1)] >> (4 * (k >> 1))) & 15;
                    const int q = (lo | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
                    v[128 * h + 32 * k + l] = d * (float)sc[l / 16 + 2 * k] * (float)q;
                }
        }
        for (int i = 0; i < QK_K / QK; i++, y++) quantize_q8_0_block(v + QK * i, y);
    }
}

typedef struct {
    int src;        /* GGML type id */
    int dst;        /* EK_TYPE_* the kernels run */
    int block;      /* values per source block */
    size_t bytes;   /* bytes per source block */
    void (*convert)(const void *src, void *dst, int64_t n_blocks);
} conversion;

static const conversion CONVERSIONS[] = {
    {GGML_Q4_K, EK_TYPE_Q4_1, QK_K, sizeof(block_q4_k), q4_k_to_q4_1},
    {GGML_Q5_0, EK_TYPE_Q8_0, QK, sizeof(block_q5_0), q5_0_to_q8_0},
    {GGML_Q6_K, EK_TYPE_Q8_0, QK_K, sizeof(block_q6_k), q6_k_to_q8_0},
};

static const conversion *find(int src_type) {
    for (size_t i = 0; i < sizeof CONVERSIONS / sizeof *CONVERSIONS; i++)
        if (CONVERSIONS[i].src == src_type) return &CONVERSIONS[i];
    return NULL;
}

int ek_convert_target(int src_type, int64_t n_in) {
    const conversion *c = find(src_type);
    return c && n_in > 0 && n_in % c->block == 0 ? c->dst : EK_ERR_INVALID;
}

int ek_convert_weights(int src_type, const void *src, size_t src_bytes, int64_t n_in, int64_t n_rows, void *dst,
                       size_t dst_bytes) {
    const conversion *c = find(src_type);
    if (!c || !src || !dst || n_in <= 0 || n_rows <= 0 || n_in % c->block) return EK_ERR_INVALID;
    const int64_t n_blocks = n_in / c->block * n_rows;
    if (src_bytes != (size_t)n_blocks * c->bytes || dst_bytes != ek_row_bytes(c->dst, n_in) * (size_t)n_rows)
        return EK_ERR_INVALID;
    c->convert(src, dst, n_blocks);
    return c->dst;
}

/* The same test and the same repacking as the model's own at load (model.c, mat_pack), so a copy
 * made here once and borrowed later is the bytes the model would have made itself. */
int ek_x8_packs(int type, int64_t n_rows) {
    const ek_x8_traits *x8 = ek_x8_get(type);
    return x8 && x8->dot && n_rows > 0 && n_rows % EK_X8 == 0;
}

int ek_pack_weights(int type, const void *src, size_t src_bytes, int64_t n_in, int64_t n_rows, void *dst,
                    size_t dst_bytes) {
    const size_t row_bytes = ek_row_bytes(type, n_in);
    if (!src || !dst || n_rows <= 0 || row_bytes == 0 || src_bytes != row_bytes * (size_t)n_rows ||
        dst_bytes != src_bytes)
        return EK_ERR_INVALID;
    if (!ek_x8_packs(type, n_rows)) return 0;
    const ek_x8_traits *x8 = ek_x8_get(type);
    const size_t group = EK_X8 * row_bytes;
    for (int64_t g = 0; g < n_rows / EK_X8; g++)
        x8->repack((const char *)src + (size_t)g * group, row_bytes, (char *)dst + (size_t)g * group, (int)n_in);
    return 1;
}
