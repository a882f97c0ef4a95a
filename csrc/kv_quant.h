/* KV record formats: one head's keys or values for one token, stored at
 * 16, 8, 4 or 2 bits.
 *
 * FP16 records are the raw fp16 vector. Quantized records use asymmetric
 * per-group quantization along the head dimension:
 *     x[i] ~= code[i] * d[g] + m[g],   g = i / group
 * laid out as [codes][d: fp16 x n_groups][m: fp16 x n_groups].
 * Code packing works in chunks of 32 values (so head_dim % 32 == 0):
 *     8-bit: byte i                       = code i
 *     4-bit: byte j of a chunk            = code j | code j+16 << 4
 *     2-bit: byte j of a chunk (j < 8)    = codes j, j+8, j+16, j+24 in bits 0-1, 2-3, 4-5, 6-7
 * so a SIMD unpack of a chunk yields its 32 codes in order.
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

#include "quant.h"

/* Precision ids: index into the trait table and into pool ids. */
enum { KVP_F16 = 0, KVP_Q8 = 1, KVP_Q4 = 2, KVP_Q2 = 3, KVP_COUNT = 4 };

typedef struct {
    int bits;
    /* bytes of one record of n values with groups of g */
    size_t (*record_bytes)(int n, int g);
    /* float -> record; x is already rotated where the store rotates */
    void (*quantize)(const float *x, uint8_t *rec, int n, int g);
    /* record -> float (compiled SIMD path) and its plain-C reference */
    void (*dequant)(const uint8_t *rec, float *y, int n, int g);
    void (*dequant_ref)(const uint8_t *rec, float *y, int n, int g);
} ek_kv_prec_traits;

const ek_kv_prec_traits *ek_kv_prec(int prec);
int ek_kv_prec_from_bits(int bits); /* -1 if not 16/8/4/2 */

/* In-place randomized Hadamard rotation and its inverse (n a power of two). */
void ek_rotate(float *x, const float *signs, int n);
void ek_unrotate(float *x, const float *signs, int n);

#endif
