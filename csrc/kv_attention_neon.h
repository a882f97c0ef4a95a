/* NEON paths of the fused attention (aarch64; kv_attention_neon.c): the key scores and value sums
 * that the KV precisions' rows name (kv_types.c), read straight from the records, G query heads per
 * record read (G <= 8, a compile-time constant, so the accumulators stay in registers).
 *
 * Keys: 6-, 4-, 3- and 2-bit keys (where ek_attn_int_keys says so) are scored against the int8
 * query as on AVX2: integer dot products of the codes (in value order: NEON unpacks a 32-value chunk
 * into two registers in order, so the query needs no reordering) with q8, `sdot` on +dotprod, else
 * vmull_s8 / vmlal_s8 (four products of |code| <= 63 and |q8| <= 127 per int16 lane, <= 32004)
 * and vpadalq_s16; then s * (d * isum + m * sum(q8)) per group, in the AVX2 kernel's float order
 * for one group per record. 16- and 8-bit keys (scored with the float query) are converted in
 * registers, each chunk dequantized once (fma(m, code, d)) for all heads and dotted with the query
 * in the order the read-then-dot path used, so their scores equal that path's bit for bit.
 *
 * Values: every precision dequantized in registers (as above) and summed into accumulators that
 * start from o, record by record in the order of the read-then-sum path, so they give that path's
 * bits exactly (for 3- and 6-bit values too, whose old read was the plain-C m + code * d: a code
 * times an fp16 scale is exact in float, so the fused and the two-step forms agree).
 */
#ifndef EDGEKV_KV_ATTENTION_NEON_H
#define EDGEKV_KV_ATTENTION_NEON_H

#include <stddef.h>
#include <stdint.h>

#include "kv_attention_int.h"
#include "simd.h"

#if defined(EK_NEON) && defined(__aarch64__)
#define EK_NEON_KV 1 /* the build has the NEON KV kernels (the rows' score_neon / values_neon) */

typedef struct {
    const float *q;                          /* (gs, hd) the query as given (16- and 8-bit keys) */
    float scale[QI_MAX_GS];                  /* int8 query: s = max|q| / 127 per head */
    float qsum[QI_MAX_GS][2 * QI_MAX_UNITS]; /* per head and group: sum of q8 */
    int8_t q8[QI_MAX_GS][64 * QI_MAX_UNITS]; /* per head, in value order (ek_attn_query_i8's rule) */
} ek_neon_query;

/* Build the query for keys with groups of g: int8 = 1 for rows scored against the int8 query (the
 * caller has checked ek_attn_int_keys), 0 for the float query. -1 for a non-finite int8 query (the
 * caller then takes the float path, as every build does). */
int ek_neon_query_prepare(ek_neon_query *qn, const float *q, int gs, int hd, int g, int int8);
/* Shapes the kernels take: gs <= QI_MAX_GS query heads, head_dim a multiple of 8 (16-bit records)
 * or of 32 (quantized ones, always). */
int ek_neon_keys_ok(int hd, int gs);
int ek_neon_values_ok(int hd, int gs);
#endif

#endif
