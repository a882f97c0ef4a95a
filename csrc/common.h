/* What every part of the core shares: the fp16 storage type and its portable conversions
 * (defined in quant.c; simd.h adds the fast scalar one for hot loops), the always-inline
 * marker of the SIMD kernels, and the address of activation row r. */
#ifndef EDGEKV_COMMON_H
#define EDGEKV_COMMON_H

#include <stddef.h>
#include <stdint.h>

typedef uint16_t ek_fp16;

/* fp16 <-> fp32 (portable bit manipulation; SIMD paths convert in bulk) */
float ek_fp16_to_fp32(ek_fp16 h);
ek_fp16 ek_fp32_to_fp16(float f);
void ek_fp16_to_fp32_row(const ek_fp16 *x, float *y, int n);
void ek_fp32_to_fp16_row(const float *x, ek_fp16 *y, int n);

/* kernels whose loops must unroll at compile-time-constant arguments: inline even at -O1 */
#define EK_INLINE static inline __attribute__((always_inline))

/* activation rows (quantized or float) lie stride bytes apart */
#define EK_ACT_ROW(act, stride, r) ((const void *)((const char *)(act) + (size_t)(r) * (stride)))

#endif
