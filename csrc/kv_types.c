/* The table of KV precisions (kv_types.h): one row per precision. */
#include "kv_types.h"

#include "edgekv.h"

#if defined(EK_AVX512)
#define X512(score, values) , score, values
#else
#define X512(score, values)
#endif
#if defined(EK_AVX2)
#define AVX2(score, values) , score, values
#else
#define AVX2(score, values)
#endif
#if defined(EK_NEON_KV)
#define NEON(score, values) , score, values
#else
#define NEON(score, values)
#endif

static const ek_kv_type TYPES[KVP_COUNT] = {
    /* bits, group, record bytes, encode, decode (SIMD, reference), int8-query order,
     * AVX2 (score, values), AVX-512 (score, values), NEON (score, values) */
    [KVP_F16] = {16, EK_KVG_HEAD, ek_kv_bytes_f16, ek_kv_encode_f16, ek_kv_decode_f16, ek_kv_decode_f16_ref,
                 EK_QORDER_NONE AVX2(NULL, NULL) X512(NULL, NULL)
                     NEON(ek_kv_score_f16_neon, ek_kv_values_f16_neon)},
    [KVP_Q8] = {8, EK_KVG_8, ek_kv_bytes_q8, ek_kv_encode_q8, ek_kv_decode_q8, ek_kv_decode_q8_ref,
                EK_QORDER_NONE AVX2(NULL, ek_kv_values_q8_avx2) X512(NULL, ek_x512_values_q8)
                     NEON(ek_kv_score_q8_neon, ek_kv_values_q8_neon)},
    [KVP_Q4] = {4, EK_KVG_4, ek_kv_bytes_q4, ek_kv_encode_q4, ek_kv_decode_q4, ek_kv_decode_q4_ref,
                EK_QORDER_NIBBLE AVX2(ek_kv_score_q4_avx2, ek_kv_values_q4_avx2) X512(ek_x512_score_q4, ek_x512_values_q4)
                     NEON(ek_kv_score_q4_neon, ek_kv_values_q4_neon)},
    [KVP_Q2] = {2, EK_KVG_2, ek_kv_bytes_q2, ek_kv_encode_q2, ek_kv_decode_q2, ek_kv_decode_q2_ref,
                EK_QORDER_CRUMB AVX2(ek_kv_score_q2_avx2, ek_kv_values_q2_avx2) X512(ek_x512_score_q2, ek_x512_values_q2)
                     NEON(ek_kv_score_q2_neon, ek_kv_values_q2_neon)},
    /* 3-bit: the 4-bit group; AVX-512 keys take the AVX2 kernel */
    [KVP_Q3] = {3, EK_KVG_4, ek_kv_bytes_q3, ek_kv_encode_q3, ek_kv_decode_q3, ek_kv_decode_q3_ref,
                EK_QORDER_CRUMB AVX2(ek_kv_score_q3_avx2, ek_kv_values_q3_avx2) X512(NULL, ek_x512_values_q3)
                     NEON(ek_kv_score_q3_neon, ek_kv_values_q3_neon)},
    /* 6-bit: the 4-bit group; codes unpack in the 4-bit order (low nibbles) plus 2 high bits, so
     * keys take the integer scoring; AVX-512 has no 6-bit kernel (the AVX2 ones run) */
    [KVP_Q6] = {6, EK_KVG_4, ek_kv_bytes_q6, ek_kv_encode_q6, ek_kv_decode_q6, ek_kv_decode_q6_ref,
                EK_QORDER_NIBBLE AVX2(ek_kv_score_q6_avx2, ek_kv_values_q6_avx2) X512(NULL, NULL)
                     NEON(ek_kv_score_q6_neon, ek_kv_values_q6_neon)},
};

const ek_kv_type *ek_kv_prec(int p) { return p >= 0 && p < KVP_COUNT ? &TYPES[p] : NULL; }

int ek_kv_prec_from_bits(int bits) {
    for (int p = 0; p < KVP_COUNT; p++)
        if (TYPES[p].bits == bits) return p;
    return -1;
}

void ek_kv_group_sizes(int head_dim, int g8, int g4, int g2, int group[KVP_COUNT]) {
    const int by_knob[EK_KVG_COUNT] = {[EK_KVG_HEAD] = head_dim, [EK_KVG_8] = g8, [EK_KVG_4] = g4, [EK_KVG_2] = g2};
    for (int p = 0; p < KVP_COUNT; p++) group[p] = by_knob[TYPES[p].group];
}

int ek_kv_precisions(int32_t *bits, int32_t *group_bits, int max) {
    static const int knob_bits[EK_KVG_COUNT] = {[EK_KVG_HEAD] = 16, [EK_KVG_8] = 8, [EK_KVG_4] = 4, [EK_KVG_2] = 2};
    for (int p = 0; p < KVP_COUNT && p < max; p++) {
        if (bits) bits[p] = TYPES[p].bits;
        if (group_bits) group_bits[p] = knob_bits[TYPES[p].group];
    }
    return KVP_COUNT;
}
