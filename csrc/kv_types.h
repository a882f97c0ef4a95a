/* The KV precisions: one row each (kv_types.c).
 *
 * A row holds everything the store and the attention need to know about one precision: its bits,
 * which configured group size it uses, its record layout (bytes of a record; codes first, then the
 * fp16 scales and minimums, see kv_quant.h), encode and decode (compiled SIMD and plain-C
 * reference), how its keys are scored and its values summed in each ISA. A kernel left NULL means
 * "this ISA has none for this precision": the attention then takes the next one down (AVX-512 ->
 * AVX2 -> dequantize the tile and work in float; NEON -> dequantize), which is always correct, only
 * slower.
 *
 * Nothing outside the table and its kernels branches on bits: the store, the attention, the model
 * and the Python package (ek_kv_precisions) read the rows. Adding a precision = an id below, a row
 * in kv_types.c, and its kernels (encode/decode in kv_quant.c, the codes' unpack in kv_quant.h and
 * kv_attention.c).
 */
#ifndef EDGEKV_KV_TYPES_H
#define EDGEKV_KV_TYPES_H

#include <stddef.h>
#include <stdint.h>

#include "kv_attention_int.h"
#include "kv_attention_neon.h"
#include "kv_attention_x512.h"
#include "simd.h"

/* Precision ids: index into the table and into pool ids (KV_POOL). FP16 (id 0) is where tokens
 * enter: stored unrotated and uncentered, so an all-FP16 cache is plain attention. */
enum { KVP_F16 = 0, KVP_Q8 = 1, KVP_Q4 = 2, KVP_Q2 = 3, KVP_Q3 = 4, KVP_Q6 = 5, KVP_COUNT = 6 };

/* Which of ek_kv_configure's group sizes a precision uses (FP16: the whole head). */
enum { EK_KVG_HEAD = 0, EK_KVG_8 = 1, EK_KVG_4 = 2, EK_KVG_2 = 3, EK_KVG_COUNT = 4 };

/* Order of the int8 query for integer key scoring (AVX2, qi8_prepare; AVX-512, ek_x512_query):
 * the order in which a unit's codes come out of its unpack. */
enum { EK_QORDER_NONE = 0, EK_QORDER_NIBBLE = 1 /* 4-bit layout */, EK_QORDER_CRUMB = 2 /* 2-bit layout */ };

typedef void (*ek_kv_encode_fn)(const float *x, uint8_t *rec, int n, int g, int fit);
typedef void (*ek_kv_decode_fn)(const uint8_t *rec, float *y, int n, int g);
#if defined(EK_AVX2)
/* sc[h * ATTN_CHUNK + j] for n key records at base (stride bytes apart) against the int8 query;
 * tmp: scratch of gs * ATTN_CHUNK * 8 floats */
typedef void (*ek_kv_score_avx2_fn)(const qi8_query *qi, const uint8_t *base, size_t stride, int n, int hd, int g,
                                    int gs, float *sc, float *tmp);
/* o[h] += sum_j w[h * ATTN_CHUNK + j] * value record j, for n value records at base */
typedef void (*ek_kv_values_avx2_fn)(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs,
                                     float *o);
#endif
#if defined(EK_AVX512)
/* as ek_x512_score_tile / ek_x512_values_accum (kv_attention_x512.h) for one precision */
typedef void (*ek_kv_score_x512_fn)(const qi8_query *qi, const query512 *qz, const uint8_t *base, size_t stride, int n,
                                    int hd, int gs, float *sc, float *tmax);
typedef int (*ek_kv_values_x512_fn)(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs,
                                    float *o_perm);
#endif
#if defined(EK_NEON_KV)
/* as the AVX2 kernels, for one precision, the query from ek_neon_query_prepare (kv_attention_neon.h) */
typedef void (*ek_kv_score_neon_fn)(const ek_neon_query *qn, const uint8_t *base, size_t stride, int n, int hd, int g,
                                    int gs, float *sc);
typedef void (*ek_kv_values_neon_fn)(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs,
                                     float *o);
#endif

typedef struct {
    int bits;                                /* storage bits per value (16: FP16) */
    int group;                               /* EK_KVG_*: the configured group size it uses */
    size_t (*record_bytes)(int n, int g);    /* bytes of one record of n values, groups of g */
    ek_kv_encode_fn quantize;                /* float -> record; x already rotated where the store rotates */
    ek_kv_decode_fn dequant, dequant_ref;    /* record -> float: compiled SIMD path, plain-C reference */
    int qorder;                              /* != NONE: keys scored against the int8-rounded query, in
                                                every build (kv_attention.h), codes unpacked in this order */
#if defined(EK_AVX2)
    ek_kv_score_avx2_fn score_avx2;          /* integer key scoring (NULL: dequantize, float) */
    ek_kv_values_avx2_fn values_avx2;        /* value sum from the codes in registers (NULL: dequantize) */
#endif
#if defined(EK_AVX512)
    ek_kv_score_x512_fn score_x512;          /* one group per record only (NULL: the AVX2 kernel) */
    ek_kv_values_x512_fn values_x512;        /* integer value sums (NULL: the AVX2 kernel) */
#endif
#if defined(EK_NEON_KV)
    ek_kv_score_neon_fn score_neon;          /* keys scored from the records (NULL: dequantize, float) */
    ek_kv_values_neon_fn values_neon;        /* value sum from the records (NULL: dequantize) */
#endif
} ek_kv_type;

/* The row of precision id p (NULL if out of range), and the id of a bit width (-1 if none). */
const ek_kv_type *ek_kv_prec(int p);
int ek_kv_prec_from_bits(int bits);
/* Group size of every precision from ek_kv_configure's sizes: group[p] for p < KVP_COUNT. */
void ek_kv_group_sizes(int head_dim, int g8, int g4, int g2, int group[KVP_COUNT]);

/* ---- the kernels the rows name ---- */
/* kv_quant.c */
size_t ek_kv_bytes_f16(int n, int g);
size_t ek_kv_bytes_q8(int n, int g), ek_kv_bytes_q4(int n, int g), ek_kv_bytes_q3(int n, int g),
    ek_kv_bytes_q2(int n, int g), ek_kv_bytes_q6(int n, int g);
void ek_kv_encode_f16(const float *x, uint8_t *rec, int n, int g, int fit);
void ek_kv_encode_q8(const float *x, uint8_t *rec, int n, int g, int fit);
void ek_kv_encode_q4(const float *x, uint8_t *rec, int n, int g, int fit);
void ek_kv_encode_q3(const float *x, uint8_t *rec, int n, int g, int fit);
void ek_kv_encode_q2(const float *x, uint8_t *rec, int n, int g, int fit);
void ek_kv_encode_q6(const float *x, uint8_t *rec, int n, int g, int fit);
void ek_kv_decode_f16(const uint8_t *rec, float *y, int n, int g), ek_kv_decode_f16_ref(const uint8_t *rec, float *y, int n, int g);
void ek_kv_decode_q8(const uint8_t *rec, float *y, int n, int g), ek_kv_decode_q8_ref(const uint8_t *rec, float *y, int n, int g);
void ek_kv_decode_q4(const uint8_t *rec, float *y, int n, int g), ek_kv_decode_q4_ref(const uint8_t *rec, float *y, int n, int g);
void ek_kv_decode_q3(const uint8_t *rec, float *y, int n, int g), ek_kv_decode_q3_ref(const uint8_t *rec, float *y, int n, int g);
void ek_kv_decode_q2(const uint8_t *rec, float *y, int n, int g), ek_kv_decode_q2_ref(const uint8_t *rec, float *y, int n, int g);
void ek_kv_decode_q6(const uint8_t *rec, float *y, int n, int g), ek_kv_decode_q6_ref(const uint8_t *rec, float *y, int n, int g);
#if defined(EK_AVX2)
/* kv_attention.c */
void ek_kv_score_q4_avx2(const qi8_query *qi, const uint8_t *base, size_t stride, int n, int hd, int g, int gs, float *sc, float *tmp);
void ek_kv_score_q3_avx2(const qi8_query *qi, const uint8_t *base, size_t stride, int n, int hd, int g, int gs, float *sc, float *tmp);
void ek_kv_score_q2_avx2(const qi8_query *qi, const uint8_t *base, size_t stride, int n, int hd, int g, int gs, float *sc, float *tmp);
void ek_kv_score_q6_avx2(const qi8_query *qi, const uint8_t *base, size_t stride, int n, int hd, int g, int gs, float *sc, float *tmp);
void ek_kv_values_q8_avx2(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o);
void ek_kv_values_q4_avx2(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o);
void ek_kv_values_q3_avx2(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o);
void ek_kv_values_q2_avx2(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o);
void ek_kv_values_q6_avx2(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o);
#endif
#if defined(EK_AVX512)
/* kv_attention_x512.c */
void ek_x512_score_q4(const qi8_query *qi, const query512 *qz, const uint8_t *base, size_t stride, int n, int hd, int gs, float *sc, float *tmax);
void ek_x512_score_q2(const qi8_query *qi, const query512 *qz, const uint8_t *base, size_t stride, int n, int hd, int gs, float *sc, float *tmax);
int ek_x512_values_q8(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o_perm);
int ek_x512_values_q4(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o_perm);
int ek_x512_values_q2(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o_perm);
int ek_x512_values_q3(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs, float *o_perm);
#endif
#if defined(EK_NEON_KV)
/* kv_attention_neon.c */
#define EK_NEON_KERNELS(P)                                                                                           \
    void ek_kv_score_##P##_neon(const ek_neon_query *qn, const uint8_t *base, size_t stride, int n, int hd, int g,    \
                                int gs, float *sc);                                                                  \
    void ek_kv_values_##P##_neon(const uint8_t *base, size_t stride, int n, int hd, int g, const float *w, int gs,     \
                                 float *o);
EK_NEON_KERNELS(f16)
EK_NEON_KERNELS(q8)
EK_NEON_KERNELS(q6)
EK_NEON_KERNELS(q4)
EK_NEON_KERNELS(q3)
EK_NEON_KERNELS(q2)
#undef EK_NEON_KERNELS
#endif

#endif
