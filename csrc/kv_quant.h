/* KV record formats: one head's keys or values for one token, stored at
 * 16, 8, 6, 4, 3 or 2 bits (the rows of kv_types.c).
 *
 * FP16 records are the raw fp16 vector. Quantized records use asymmetric
 * per-group quantization along the head dimension:
 *     x[i] ~= code[i] * d[g] + m[g],   g = i / group
 * laid out as [codes][d: fp16 x n_groups][m: fp16 x n_groups]. The grid (d, m) of a group is its
 * min/max, or (fit, below 8 bits) the grid of least squared error among a few candidates
 * (kv_quant.c); the format and every reader are the same either way.
 * Code packing works in chunks of 32 values (so head_dim % 32 == 0):
 *     8-bit: byte i                       = code i
 *     4-bit: byte j of a chunk            = code j | code j+16 << 4
 *     2-bit: byte j of a chunk (j < 8)    = codes j, j+8, j+16, j+24 in bits 0-1, 2-3, 4-5, 6-7
 *     3-bit: 12 bytes a chunk: the low 2 bits of the codes as the 2-bit layout (8 bytes), then
 *            their high bits as a 32-bit little-endian mask (bit j = code j's bit 2)
 *     6-bit: 24 bytes a chunk: the low 4 bits of the codes as the 4-bit layout (16 bytes), then
 *            their bits 4-5 as the 2-bit layout (8 bytes)
 * so a SIMD unpack of a chunk yields its 32 codes in order. 3-bit records share the 4-bit
 * group size (ek_kv_configure has no separate knob). AVX2 builds unpack them like the others
 * (ek_kv_chunk_codes), so 3-bit values take the fused float value sum; 3-bit keys are scored with
 * integer dot products like 4- and 2-bit keys (kv_attention.c). 6-bit records (the 4-bit group
 * size too) are read the same way in AVX2 builds, their codes in the 4-bit order. NEON and plain-C
 * builds use the reference for 3- and 6-bit records.
 *
 * Quantized records hold the vector after a randomized Hadamard rotation
 * (when the store enables it): R x = H (s * x) / sqrt(n), with fixed signs s.
 * Rotation spreads outlier channels over the group so a shared scale fits.
 *
 * Non-finite input: NaN is stored as the group minimum, +-inf are clamped to
 * +-65504 (the fp16 range), so a record never holds NaN or inf.
 */
#ifndef EDGEKV_KV_QUANT_H
#define EDGEKV_KV_QUANT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kv_types.h"
#include "quant.h"
#include "simd.h"

#if defined(EK_AVX2)
/* Codes of chunk c (values 32c .. 32c+31) of a quantized record at `bits`, as 4 x 8 floats in
 * value order: the unpack both dequantization and the fused value sum use. */
static inline __attribute__((always_inline)) void ek_kv_chunk_codes(const uint8_t *r, int c, __m256 v[4], int bits) {
    __m128i q[4];
    if (bits == 8) {
        const __m128i a = _mm_loadu_si128((const __m128i *)(r + 32 * c)), b = _mm_loadu_si128((const __m128i *)(r + 32 * c + 16));
        q[0] = a; q[1] = _mm_srli_si128(a, 8); q[2] = b; q[3] = _mm_srli_si128(b, 8);
    } else if (bits == 4) {
        const __m128i t = _mm_loadu_si128((const __m128i *)(r + 16 * c)), k = _mm_set1_epi8(0x0f);
        const __m128i lo = _mm_and_si128(t, k), hi = _mm_and_si128(_mm_srli_epi16(t, 4), k);
        q[0] = lo; q[1] = _mm_srli_si128(lo, 8); q[2] = hi; q[3] = _mm_srli_si128(hi, 8);
    } else if (bits == 6) { /* the low nibbles as 4-bit codes; bits 4-5 added below */
        const __m128i t = _mm_loadu_si128((const __m128i *)(r + 24 * c)), k = _mm_set1_epi8(0x0f);
        const __m128i lo = _mm_and_si128(t, k), hi = _mm_and_si128(_mm_srli_epi16(t, 4), k);
        const __m128i h = _mm_loadl_epi64((const __m128i *)(r + 24 * c + 16)), k3 = _mm_set1_epi8(3);
        /* crumb s of high byte j is value j + 8s: v[b] (values 8b .. 8b+7) takes crumb b, times 16 */
        q[0] = _mm_or_si128(lo, _mm_slli_epi16(_mm_and_si128(h, k3), 4));
        q[1] = _mm_or_si128(_mm_srli_si128(lo, 8), _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, 2), k3), 4));
        q[2] = _mm_or_si128(hi, _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, 4), k3), 4));
        q[3] = _mm_or_si128(_mm_srli_si128(hi, 8), _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, 6), k3), 4));
    } else { /* 2-bit, or the low 2 bits of a 3-bit chunk (12 bytes: 8 of them, then the high-bit mask) */
        const uint8_t *lo = bits == 3 ? r + 12 * c : r + 8 * c;
        const __m128i t = _mm_loadl_epi64((const __m128i *)lo), k = _mm_set1_epi8(3);
        q[0] = _mm_and_si128(t, k); q[1] = _mm_and_si128(_mm_srli_epi16(t, 2), k);
        q[2] = _mm_and_si128(_mm_srli_epi16(t, 4), k); q[3] = _mm_and_si128(_mm_srli_epi16(t, 6), k);
    }
    for (int b = 0; b < 4; b++) v[b] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q[b]));
    if (bits == 3) { /* + 4 where the chunk's high-bit mask has the value's bit; v[b] holds codes 8b .. 8b+7 */
        uint32_t mask;
        memcpy(&mask, r + 12 * c + 8, sizeof mask);
        const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        for (int b = 0; b < 4; b++) {
            const __m256i hb = _mm256_and_si256(_mm256_set1_epi32((int)(mask >> (8 * b))), lane);
            v[b] = _mm256_add_ps(v[b], _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(hb, lane)), _mm256_set1_ps(4.0f)));
        }
    }
}
#endif

/* In-place randomized Hadamard rotation and its inverse (n a power of two). */
void ek_rotate(float *x, const float *signs, int n);
void ek_unrotate(float *x, const float *signs, int n);

#endif
