/* AVX-512 paths of the fused attention (builds with AVX512F/BW/VL and VNNI).
 *
 * Weighted value sum in integers: for a tile of records and one query head,
 *     o[i] += sum_j w_j * (d_j * u_ji + m_j)
 * is computed as scale * sum_j qw_j * u_ji + sum_j w_j * m_j, where qw_j is
 * w_j * d_j rounded against the tile's largest (qw = rint(w * d * Q / max),
 * scale = max / Q; per head and quantization group). 8-bit values: Q = 32767,
 * two records' codes per int32 lane as int16, vpdpwssd; 4-, 3- and 2-bit values:
 * Q = 255, four records' codes per lane as bytes, vpdpbusd (half the
 * multiplies; a weight's rounding error, at most max / 510, stays under 1/30
 * of the 4-bit quantization step of the tile's heaviest record).
 *
 * The kernel accumulates into a (gs, head_dim) float buffer in its own value
 * order ("o_perm"); ek_x512_values_unpermute adds it into the real output
 * once per range.
 *
 * Key scores (4- and 2-bit keys with one group per record): the same integer
 * dot products with the int8 query as the AVX2 path, 16 records at a time
 * with their codes transposed so each int32 lane is one record; the same
 * float epilogue, so scores equal the AVX2 path's exactly.
 */
#ifndef EDGEKV_KV_ATTENTION_X512_H
#define EDGEKV_KV_ATTENTION_X512_H

#include <stddef.h>
#include <stdint.h>

#include "kv_attention_int.h"
#include "simd.h"

#if defined(EK_AVX512)
/* 1 if head_dim hd and gs query heads fit the integer value sums (which precisions have one: their
 * rows in kv_types.c, kernels ek_x512_values_q*). */
int ek_x512_values_shape_ok(int hd, int gs);
/* The largest rounded weight for values of `bits`: 32767 (8-bit), 255 (4-, 3- and 2-bit). */
int ek_x512_weight_max(int bits);
/* The value kernels (ek_x512_values_q8/q4/q3/q2, kv_types.h): fold n (<= ATTN_CHUNK) value records at
 * base (stride bytes apart), groups of g, into o_perm with weights w[h * ATTN_CHUNK + j] (<= 1:
 * exponentials of score - running max). Return -1, touching nothing, if a weight is NaN, inf or >= 2
 * (the caller then takes the float path for this tile). */
/* 1 if the kernel's value order for `bits` is the natural one (o_perm can be the output itself). */
int ek_x512_values_in_order(int bits);
/* o[h][i] += o_perm[h][position of value i] for gs heads. */
void ek_x512_values_unpermute(const float *o_perm, float *o, int gs, int hd, int bits);

/* 1 if keys with groups of g (one per record), head_dim hd and gs query heads fit the 512-bit scoring
 * kernels (which precisions have one: kv_types.c, ek_x512_score_q*). */
int ek_x512_keys_shape_ok(int hd, int g, int gs);
/* The int8 query per head and unit as 16 groups of 4 values in the order the transposed codes
 * come (kv_attention_x512.c), each broadcast to a register by the scoring loop; built once per range. */
typedef struct {
    int32_t q[QI_MAX_GS][QI_MAX_UNITS][16];
} query512;
void ek_x512_query(const qi8_query *qi, int hd, int gs, int qorder, query512 *qz); /* qorder: EK_QORDER_* */
/* Prefetch the first records of a run of n (the scoring loop prefetches a fixed distance ahead of
 * itself, so without this a run's first records arrive on demand, one miss after another). */
void ek_x512_prefetch_start(const uint8_t *base, size_t stride, int n);
/* The key kernels (ek_x512_score_q4/q2, kv_types.h): sc[h * ATTN_CHUNK + j] for n (<= ATTN_CHUNK) key
 * records at base (stride bytes apart), and tmax[h] = the largest of head h's n scores (NaN skipped;
 * -inf if all are NaN). */
#endif

#endif
