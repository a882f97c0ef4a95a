/* Attention of a group of query heads that share one KV head (grouped-query
 * attention), over FP16 key/value rows stored contiguously per head.
 *
 * q:      (gs, head_dim) float, already scaled by 1/sqrt(head_dim)
 * K, V:   (n_pos, head_dim) fp16 rows of one KV head
 * out:    (gs, head_dim) float
 * scores: (gs, n_pos) float scratch; holds the attention probabilities after the call
 */
#ifndef EDGEKV_ATTENTION_H
#define EDGEKV_ATTENTION_H

#include "quant.h"

void ek_attend_f16(const ek_fp16 *K, const ek_fp16 *V, int n_pos, int head_dim, const float *q, int gs,
                   float *out, float *scores);
void ek_attend_f16_ref(const ek_fp16 *K, const ek_fp16 *V, int n_pos, int head_dim, const float *q, int gs,
                       float *out, float *scores);

/* In-place softmax of n floats. */
void ek_softmax(float *x, int n);

#endif
