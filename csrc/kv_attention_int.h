/* The int8 query that 6-, 4-, 3- and 2-bit keys are scored against, shared by the AVX2 and AVX-512 paths of
 * the fused attention (built by qi8_prepare in kv_attention.c, which documents the code order). */
#ifndef EDGEKV_KV_ATTENTION_INT_H
#define EDGEKV_KV_ATTENTION_INT_H

#include "simd.h"

#define QI_MAX_GS 8
#define QI_MAX_UNITS 4 /* units of 64 values: head_dim <= 256 */

#if defined(EK_AVX2)
typedef struct {
    float scale[QI_MAX_GS];
    float qsum[QI_MAX_GS][2 * QI_MAX_UNITS]; /* per head and group: sum of the int8 query */
    __m256i qa[QI_MAX_GS][QI_MAX_UNITS], qb[QI_MAX_GS][QI_MAX_UNITS]; /* in the codes' unpack order */
    int8_t q8[QI_MAX_GS][64 * QI_MAX_UNITS]; /* in value order */
} qi8_query;
#endif

#endif
