/* edgekv's entry points for tests and benchmarks (csrc/testing.c): kernels run directly on the
 * caller's data, what the build's attention kernels round, and timings. Inference never needs
 * them; they are part of the library and of its ABI all the same (a change here bumps
 * EK_ABI_VERSION in edgekv.h). python/edgekv/_native.py hands cffi the part between cffi-begin and
 * cffi-end after edgekv.h's, so it may use edgekv.h's types.
 */
#ifndef EDGEKV_TESTING_H
#define EDGEKV_TESTING_H

#include "edgekv.h"

#ifdef __cplusplus
extern "C" {
#endif

/* cffi-begin: python/edgekv/_native.py feeds everything up to cffi-end to cffi.cdef */
/* Weight kernels: out[t * n_out + r] = dot(W row r, x row t).
 * x: (n_tok, n_in) float32; impl 0 = plain C reference, 1 = compiled SIMD path; for types with a
 * row-interleaved layout (Q4_0, Q4_1, Q8_0; else EK_ERR_INVALID): 2 = the rows repacked 8 by 8
 * with the SIMD x8 kernel (the reference where the build has none), 3 = repacked, reference x8
 * kernel. Rows past the last multiple of 8 take the row kernels, as in the model. */
int ek_matmul(int type, const void *w, int64_t n_in, int64_t n_out, const float *x, int n_tok, float *out,
              int impl);
/* Quantize and dequantize one record of n values (tests): bits any of ek_kv_precisions, group g; impl flags:
 * EK_RT_SIMD dequantizes with the compiled SIMD path (else the plain-C reference), EK_RT_FIT
 * encodes with the fitted grid (EK_KV_FIT_GRID). */
enum { EK_RT_SIMD = 1, EK_RT_FIT = 2 };
int ek_kv_quant_roundtrip(int bits, const float *x, int n, int g, float *y, int impl);
/* Attention of gs query heads (plain basis, unscaled) over n_pos fp32 keys/values that
 * are stored at the given per-position bits into a scratch store (flags as ek_kv_configure, group
 * for every precision); out (gs, head_dim).
 * k_deq/v_deq (optional, n_pos * head_dim): the stored values read back, rotation undone (and the
 * key center added back: with EK_KV_CENTER_KEYS a quantized key j scores q_key . (k_deq_j - c) + q . c,
 * c the mean of the fp16 keys at positions 1..n_pos-1).
 * q_key (optional, n_prec * gs * head_dim, n_prec = ek_kv_precisions(NULL, NULL, 0)): for each key
 * precision (in ek_kv_precisions order), the query its keys were scored with, scaled by
 * 1/sqrt(head_dim), plain basis: the float query, or, for keys scored with integers (6-, 4-, 3-, 2-bit,
 * head_dim a multiple of 64; kv_types.c), the int8-rounded query rotated back. */
int ek_kv_attention_test(const float *q, int gs, const float *k, const float *v, const int32_t *k_bits,
                         const int32_t *v_bits, int n_pos, int head_dim, int group, int flags, float *out,
                         float *k_deq, float *v_deq, float *q_key);
/* Values at v_bits, head_dim, gs query heads: 0 if the build sums them in float, else the tile size T
 * of the integer value sum, which rounds each weight * scale to an integer in 0..Q (Q =
 * ek_attn_value_weight_max: 32767 for 8-bit values, 255 for 4- and 2-bit) against the largest in its
 * tile (T consecutive slots of a pool), an error <= 1/(2Q) of that largest per weight. */
int ek_attn_value_tile(int v_bits, int head_dim, int gs);
int ek_attn_value_weight_max(int v_bits, int head_dim, int gs);

/* ---- benchmarks (benchmarks/kernels.py) ----
 * ek_bench_fill_kv: replace the context with n synthetic positions (random keys and values,
 * stored at k_bits/v_bits); logits are meaningless until the context is truncated to 0.
 * ek_bench_attention: seconds for one decode-step attention over all layers (median of iters),
 * the query sitting at the last position, attention statistics off. ek_bench_read_bandwidth: bytes/s of a sequential
 * read of a buffer of n_bytes by n_threads threads (best of iters). */
int ek_bench_fill_kv(ek_model *m, int n, int k_bits, int v_bits, uint32_t seed);
double ek_bench_attention(ek_model *m, int iters);
double ek_bench_read_bandwidth(size_t n_bytes, int n_threads, int iters);
/* cffi-end */

#ifdef __cplusplus
}
#endif

#endif
