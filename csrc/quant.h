/* Weight block formats and the per-type kernel table.
 *
 * The block layouts are GGUF's (ggml's): a model file's bytes are used as they
 * are, memory-mapped, with no conversion. Type ids are GGML's so Python can
 * pass a GGUF tensor's type straight through.
 *
 * Activations that meet a quantized weight are first quantized to block_q8a
 * (32 int8 values, fp32 scale, and the scaled sum used to fold in a weight
 * block's offset), so the inner loops are integer multiply-adds.
 */
#ifndef EDGEKV_QUANT_H
#define EDGEKV_QUANT_H

#include <assert.h>
#include <stddef.h>
#include <stdint.h>

#include "common.h"

#define QK 32 /* values per block in every quantized weight format here */

/* GGML type ids (only the ones that run natively). */
enum {
    EK_TYPE_F32 = 0,
    EK_TYPE_F16 = 1,
    EK_TYPE_Q4_0 = 2,
    EK_TYPE_Q4_1 = 3,
    EK_TYPE_Q8_0 = 8,
    EK_TYPE_COUNT = 9
};

/* Q4_0: value = (q - 8) * d; element i < 16 in low nibble of qs[i], i >= 16 in high nibble of qs[i-16]. */
typedef struct {
    ek_fp16 d;
    uint8_t qs[QK / 2];
} block_q4_0;
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must match GGUF");

/* Q4_1: value = q * d + m; same nibble order as Q4_0. */
typedef struct {
    ek_fp16 d;
    ek_fp16 m;
    uint8_t qs[QK / 2];
} block_q4_1;
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 must match GGUF");

/* Q8_0: value = q * d. */
typedef struct {
    ek_fp16 d;
    int8_t qs[QK];
} block_q8_0;
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must match GGUF");

/* Activation block (internal only): value = q * d, and s = d * sum(q). */
typedef struct {
    float d;
    float s;
    int8_t qs[QK];
} block_q8a;
static_assert(sizeof(block_q8a) == 40, "block_q8a layout");

/* ---- the kernel table ---- */

/* Dot products of one weight row with nx activation rows (nx in 1..4), written to out[0..nx).
 * act points at nx rows of act_row_bytes each, in the type's activation format. */
typedef void (*ek_dot_fn)(int n, const void *w_row, const void *act, size_t act_row_bytes, int nx,
                          float *out);

typedef struct {
    const char *name;
    int blck;              /* values per block */
    size_t block_bytes;    /* bytes per block */
    int act_is_q8;         /* activations quantized to block_q8a (else plain f32) */
    ek_dot_fn dot;         /* best compiled kernel (SIMD where available) */
    ek_dot_fn dot_ref;     /* plain C reference */
    void (*to_float)(const void *row, float *y, int n); /* dequantize one row */
} ek_type_traits;

/* NULL for a type that does not run natively. */
const ek_type_traits *ek_type_get(int type);

/* Bytes of one row of n values (n a multiple of the block size). */
size_t ek_row_bytes(int type, int64_t n);

/* Activation rows: bytes per row of n values, and quantization of one row. */
size_t ek_act_row_bytes(int type, int n);
void ek_quantize_act_row(int type, const float *x, void *y, int n);

/* ---- row-interleaved ("x8") weights (quant_x8.c) ----
 * A matrix whose row count is a multiple of EK_X8 can be repacked at load so that 8 rows are
 * stored block by block (same bytes); its dot kernel then computes 8 rows per pass with no
 * horizontal sums. Rows r0..r0+7 of the matrix live at packed + (r0 / 8) * 8 * row_bytes. */
#define EK_X8 8

#define EK_X8_MAX_NX 8 /* the most activation rows any build's x8 kernel takes per call */

/* Dot products of 8 interleaved rows with nx activation rows: out[t * 8 + r]. The SIMD kernel
 * takes nx in 1..max_nx; the reference any nx >= 1. */
typedef void (*ek_dot_x8_fn)(int n, const void *w8, const void *act, size_t act_row_bytes, int nx, float *out);

typedef struct {
    void (*repack)(const void *rows, size_t row_bytes, void *dst, int n); /* 8 rows of n values */
    ek_dot_x8_fn dot;     /* SIMD kernel; NULL where this build has none (then no repacking) */
    int max_nx;           /* activation rows per call of dot (<= EK_X8_MAX_NX) */
    ek_dot_x8_fn dot_ref; /* plain C reference on the same layout */
    void (*to_float)(const void *w8, int r, float *y, int n); /* row r (0..7) of a group, dequantized */
} ek_x8_traits;

/* NULL for a type with no interleaved layout. */
const ek_x8_traits *ek_x8_get(int type);

/* Reference quantizers for activations (also used by tests). */
void ek_quantize_row_q8a(const float *x, block_q8a *y, int n);     /* SIMD where compiled */
void ek_quantize_row_q8a_ref(const float *x, block_q8a *y, int n); /* plain C, the reference */

#endif
