/* Row-interleaved ("x8") weights: 8 rows of a Q4_0 / Q4_1 / Q8_0 matrix stored block by block.
 *
 * Why: one u8 x s8 dot (vpdpbusd) against a broadcast group of 4 activations advances all 8 rows,
 * with no per-block horizontal sums (which held the row kernels to half the memory bandwidth;
 * docs/decisions.md).
 *
 * Layout of block b of rows r = 0..7 (as many bytes as the 8 source blocks):
 *   Q4_0x8: d[8] fp16, qs[128];  Q4_1x8: d[8], m[8] fp16, qs[128];  Q8_0x8: d[8] fp16, qs[256].
 *   Q4: qs[32c + 4r + i] = code(r, 8c + i) | code(r, 8c + 4 + i) << 4   (c = 0..3, i = 0..3),
 *       so a 32-byte load gives groups 2c (low nibbles) and 2c + 1 (high nibbles) for all rows.
 *   Q8: qs[32j + 4r + i] = w(r, 4j + i) + 128 as u8                    (j = 0..7, i = 0..3):
 *       vpdpbusd wants its unsigned operand in the register that is reused across tokens.
 *
 * The SIMD kernels take up to 8 tokens per call where the build has 32 vector registers (AVX-512VL):
 * the weights of a block are loaded once for all of them, so a catch-up or prefill batch of 8
 * tokens reads each group of 8 rows once. They also prefetch the next group of 8 rows (the matmul
 * walks groups in memory order): a batch pass is compute-bound, and without the prefetch each
 * group's first pass stalls on memory the core could have been fetching meanwhile.
 *
 * NEON: with +dotprod, sdot by lane dots 4 rows' codes with one broadcast group of 4 activations
 * per instruction (the 16-byte halves of a 32-byte chunk are rows 0-3 and 4-7); without it,
 * vmull_s8/vmlal_s8 against a group repeated twice, then pairwise adds. Q8_0's stored w + 128 goes
 * back to signed with one xor (NEON has no u8 x s8 dot before i8mm).
 *
 * The kernels accumulate, per row and block, (float)isum * (d * d_a) plus the block's offset
 * term (m * s_a for Q4_1, -8 d * s_a for Q4_0), in block order: the same sums as the row kernels
 * in quant.c up to the order of float additions. The plain C reference below reads the same
 * layout and is what the tests compare the SIMD kernel against.
 */
#include <string.h>

#include "quant.h"
#include "simd.h"

#define X8 EK_X8

typedef struct {
    ek_fp16 d[X8];
    uint8_t qs[X8 * QK / 2];
} block_q4_0x8;
typedef struct {
    ek_fp16 d[X8];
    ek_fp16 m[X8];
    uint8_t qs[X8 * QK / 2];
} block_q4_1x8;
typedef struct {
    ek_fp16 d[X8];
    int8_t qs[X8 * QK];
} block_q8_0x8;
static_assert(sizeof(block_q4_0x8) == X8 * sizeof(block_q4_0), "Q4_0x8 keeps the bytes of 8 blocks");
static_assert(sizeof(block_q4_1x8) == X8 * sizeof(block_q4_1), "Q4_1x8 keeps the bytes of 8 blocks");
static_assert(sizeof(block_q8_0x8) == X8 * sizeof(block_q8_0), "Q8_0x8 keeps the bytes of 8 blocks");

/* code k (0..31) of a GGUF Q4 block: k < 16 in the low nibble of qs[k], else the high one of qs[k-16] */
static inline int q4_code(const uint8_t *qs, int k) { return k < 16 ? qs[k] & 15 : qs[k - 16] >> 4; }

/* a Q8_0x8 weight back from its stored u8 form (w + 128) */
static inline int q8_weight(int8_t stored) { return (int8_t)(stored ^ 0x80); }

/* interleave the codes of 8 Q4 blocks (one per row) */
static void pack_q4_codes(const uint8_t *const qs[X8], uint8_t *out) {
    for (int c = 0; c < 4; c++)
        for (int r = 0; r < X8; r++)
            for (int i = 0; i < 4; i++)
                out[32 * c + 4 * r + i] = (uint8_t)(q4_code(qs[r], 8 * c + i) | q4_code(qs[r], 8 * c + 4 + i) << 4);
}

/* ------------------------------------------------------------------------- */
/* repacking: 8 rows of row_bytes each (n values per row) -> n / QK x8 blocks  */
/* ------------------------------------------------------------------------- */

/* Q4_0 / Q4_1: the blocks share a layout up to the minimum (d, [m,] qs), as do the x8 blocks
 * (d[8], [m[8],] qs[128]), so one loop serves both */
static void repack_q4(const void *rows, size_t row_bytes, void *dst, int n, int has_min) {
    const size_t src_bytes = has_min ? sizeof(block_q4_1) : sizeof(block_q4_0);
    const size_t dst_bytes = has_min ? sizeof(block_q4_1x8) : sizeof(block_q4_0x8);
    const size_t head = (has_min ? 2 : 1) * sizeof(ek_fp16); /* d [, m] before the codes */
    for (int b = 0; b < n / QK; b++) {
        uint8_t *o = (uint8_t *)dst + (size_t)b * dst_bytes;
        ek_fp16 *d8 = (ek_fp16 *)o;
        const uint8_t *qs[X8];
        for (int r = 0; r < X8; r++) {
            const uint8_t *src = (const uint8_t *)rows + (size_t)r * row_bytes + (size_t)b * src_bytes;
            memcpy(&d8[r], src, sizeof(ek_fp16));
            if (has_min) memcpy(&d8[X8 + r], src + sizeof(ek_fp16), sizeof(ek_fp16));
            qs[r] = src + head;
        }
        pack_q4_codes(qs, o + X8 * head);
    }
}
static void repack_q4_0(const void *rows, size_t row_bytes, void *dst, int n) { repack_q4(rows, row_bytes, dst, n, 0); }
static void repack_q4_1(const void *rows, size_t row_bytes, void *dst, int n) { repack_q4(rows, row_bytes, dst, n, 1); }

static void repack_q8_0(const void *rows, size_t row_bytes, void *dst, int n) {
    block_q8_0x8 *o = (block_q8_0x8 *)dst;
    for (int b = 0; b < n / QK; b++, o++)
        for (int r = 0; r < X8; r++) {
            const block_q8_0 *src = (const block_q8_0 *)((const char *)rows + (size_t)r * row_bytes) + b;
            o->d[r] = src->d;
            for (int j = 0; j < QK / 4; j++)
                for (int i = 0; i < 4; i++) o->qs[32 * j + 4 * r + i] = (int8_t)(src->qs[4 * j + i] ^ 0x80);
        }
}

/* ------------------------------------------------------------------------- */
/* one row back to floats (the token embedding, when it is also the packed     */
/* output matrix): row r (0..7) of a group of 8                                */
/* ------------------------------------------------------------------------- */

static void row_q4_x8(const uint8_t *w8, size_t bsz, int has_min, int r, float *y, int n) {
    for (int b = 0; b < n / QK; b++, y += QK) {
        const uint8_t *blk = w8 + (size_t)b * bsz;
        const ek_fp16 *d = (const ek_fp16 *)blk;
        const uint8_t *qs = blk + (has_min ? 2 : 1) * X8 * sizeof(ek_fp16);
        const float dw = ek_fp16_to_fp32(d[r]), mw = has_min ? ek_fp16_to_fp32(d[X8 + r]) : -8.0f * dw;
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < 4; i++) {
                const uint8_t byte = qs[32 * c + 4 * r + i];
                y[8 * c + i] = (float)(byte & 15) * dw + mw;
                y[8 * c + 4 + i] = (float)(byte >> 4) * dw + mw;
            }
    }
}
static void row_q4_0_x8(const void *w8, int r, float *y, int n) { row_q4_x8(w8, sizeof(block_q4_0x8), 0, r, y, n); }
static void row_q4_1_x8(const void *w8, int r, float *y, int n) { row_q4_x8(w8, sizeof(block_q4_1x8), 1, r, y, n); }
static void row_q8_0_x8(const void *w8, int r, float *y, int n) {
    const block_q8_0x8 *wb = (const block_q8_0x8 *)w8;
    for (int b = 0; b < n / QK; b++, y += QK) {
        const float d = ek_fp16_to_fp32(wb[b].d[r]);
        for (int k = 0; k < QK; k++) y[k] = (float)q8_weight(wb[b].qs[32 * (k / 4) + 4 * r + k % 4]) * d;
    }
}

/* ------------------------------------------------------------------------- */
/* plain C reference: out[t * 8 + r] for tokens t < nx, rows r < 8             */
/* ------------------------------------------------------------------------- */

#define ACT(act, stride, t) ((const block_q8a *)EK_ACT_ROW(act, stride, t))

static void dot_q4_x8_ref(int n, const uint8_t *w8, size_t bsz, int has_min, const void *act, size_t stride, int nx,
                          float *out) {
    for (int t = 0; t < nx; t++) {
        const block_q8a *a = ACT(act, stride, t);
        float acc[X8] = {0};
        for (int b = 0; b < n / QK; b++) {
            const uint8_t *blk = w8 + (size_t)b * bsz;
            const ek_fp16 *d = (const ek_fp16 *)blk, *m = has_min ? d + X8 : NULL;
            const uint8_t *qs = blk + (has_min ? 2 : 1) * X8 * sizeof(ek_fp16);
            for (int r = 0; r < X8; r++) {
                int isum = 0;
                for (int c = 0; c < 4; c++)
                    for (int i = 0; i < 4; i++) {
                        const uint8_t byte = qs[32 * c + 4 * r + i];
                        isum += (byte & 15) * a[b].qs[8 * c + i] + (byte >> 4) * a[b].qs[8 * c + 4 + i];
                    }
                const float dw = ek_fp16_to_fp32(d[r]);
                const float mw = has_min ? ek_fp16_to_fp32(m[r]) : -8.0f * dw;
                acc[r] += (float)isum * (dw * a[b].d);
                acc[r] += mw * a[b].s;
            }
        }
        memcpy(out + (size_t)t * X8, acc, sizeof(acc));
    }
}

static void dot_q4_0_x8_ref(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
    dot_q4_x8_ref(n, (const uint8_t *)w8, sizeof(block_q4_0x8), 0, act, stride, nx, out);
}
static void dot_q4_1_x8_ref(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
    dot_q4_x8_ref(n, (const uint8_t *)w8, sizeof(block_q4_1x8), 1, act, stride, nx, out);
}

static void dot_q8_0_x8_ref(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
    const block_q8_0x8 *wb = (const block_q8_0x8 *)w8;
    for (int t = 0; t < nx; t++) {
        const block_q8a *a = ACT(act, stride, t);
        float acc[X8] = {0};
        for (int b = 0; b < n / QK; b++)
            for (int r = 0; r < X8; r++) {
                int isum = 0;
                for (int j = 0; j < QK / 4; j++)
                    for (int i = 0; i < 4; i++) isum += q8_weight(wb[b].qs[32 * j + 4 * r + i]) * a[b].qs[4 * j + i];
                acc[r] += (float)isum * (ek_fp16_to_fp32(wb[b].d[r]) * a[b].d);
            }
        memcpy(out + (size_t)t * X8, acc, sizeof(acc));
    }
}

/* ------------------------------------------------------------------------- */
/* AVX2 (vpdpbusd where the CPU has VNNI, else vpmaddubsw + vpmaddwd)          */
/* ------------------------------------------------------------------------- */
#if defined(EK_AVX2)
#if defined(__AVX512VL__)
#define X8_NX 8 /* 32 vector registers: 8 tokens' sums and accumulators stay in registers */
#else
#define X8_NX 4
#endif

/* the 4-byte activation group j of block a, broadcast to all 8 lanes */
EK_INLINE __m256i act_group(const block_q8a *a, int j) {
    int32_t g;
    memcpy(&g, a->qs + 4 * j, 4);
    return _mm256_set1_epi32(g);
}

/* block b of the next group of 8 rows, fetched while this group computes */
EK_INLINE void prefetch_next_group(const uint8_t *blk, size_t group_bytes, size_t bsz) {
    for (size_t c = 0; c < bsz; c += 64) _mm_prefetch((const char *)blk + group_bytes + c, _MM_HINT_T0);
}

/* s[t] += one register of codes (4 of each of the 8 rows) against activation group j of block b,
 * for every token: nx independent chains, so consecutive vpdpbusd never wait on each other */
EK_INLINE void group_dot(__m256i *s, __m256i w, const void *act, size_t stride, int b, int j, int nx) {
    for (int t = 0; t < nx; t++) s[t] = ek_dpbusd(s[t], w, act_group(ACT(act, stride, t) + b, j));
}

/* nx (1..X8_NX) is a compile-time constant at each call site, so the token loops unroll */
EK_INLINE void dot_q4_x8_avx2(int n, const uint8_t *w8, int has_min, const void *act, size_t stride, int nx,
                              float *out) {
    const size_t bsz = has_min ? sizeof(block_q4_1x8) : sizeof(block_q4_0x8);
    const size_t group_bytes = (size_t)(n / QK) * bsz;
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m256 acc[X8_NX];
    for (int t = 0; t < nx; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < n / QK; b++) {
        const uint8_t *blk = w8 + (size_t)b * bsz;
        prefetch_next_group(blk, group_bytes, bsz);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        const __m256 m = has_min ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)))
                                 : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
        const uint8_t *qs = blk + (has_min ? 32 : 16);
        __m256i s[X8_NX];
        for (int t = 0; t < nx; t++) s[t] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i p = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            group_dot(s, _mm256_and_si256(p, low4), act, stride, b, 2 * c, nx);
            group_dot(s, _mm256_and_si256(_mm256_srli_epi16(p, 4), low4), act, stride, b, 2 * c + 1, nx);
        }
        for (int t = 0; t < nx; t++) {
            const block_q8a *a = ACT(act, stride, t) + b;
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), _mm256_mul_ps(d, _mm256_set1_ps(a->d)), acc[t]);
            acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(a->s), acc[t]);
        }
    }
    for (int t = 0; t < nx; t++) _mm256_storeu_ps(out + (size_t)t * X8, acc[t]);
}

#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
/* Q8_0 with VNNI: the weights are stored as w + 128 (u8, vpdpbusd's unsigned operand) and the
 * extra 128 * sum(a) of each block is taken back through the activation block's s = d_a * sum(q_a):
 *   d_w d_a sum(w q_a) = d_w (d_a sum((w + 128) q_a) - 128 s). */
EK_INLINE void dot_q8_0_x8_avx2_n(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
    const block_q8_0x8 *wb = (const block_q8_0x8 *)w8;
    const size_t group_bytes = (size_t)(n / QK) * sizeof(block_q8_0x8);
    __m256 acc[X8_NX];
    for (int t = 0; t < nx; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < n / QK; b++) {
        prefetch_next_group((const uint8_t *)&wb[b], group_bytes, sizeof(block_q8_0x8));
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)wb[b].d));
        const __m256 d128 = _mm256_mul_ps(d, _mm256_set1_ps(-128.0f));
        __m256i s[X8_NX];
        for (int t = 0; t < nx; t++) s[t] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++)
            group_dot(s, _mm256_loadu_si256((const __m256i *)(wb[b].qs + 32 * j)), act, stride, b, j, nx);
        for (int t = 0; t < nx; t++) {
            const block_q8a *a = ACT(act, stride, t) + b;
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), _mm256_mul_ps(d, _mm256_set1_ps(a->d)), acc[t]);
            acc[t] = _mm256_fmadd_ps(d128, _mm256_set1_ps(a->s), acc[t]);
        }
    }
    for (int t = 0; t < nx; t++) _mm256_storeu_ps(out + (size_t)t * X8, acc[t]);
}
#else
/* Q8_0 without VNNI: |w| meets a with w's sign moved onto it (|w| <= 128 keeps a pair of
 * products inside int16 for vpmaddubsw) */
EK_INLINE void dot_q8_0_x8_avx2_n(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
    const block_q8_0x8 *wb = (const block_q8_0x8 *)w8;
    const size_t group_bytes = (size_t)(n / QK) * sizeof(block_q8_0x8);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256 acc[X8_NX];
    for (int t = 0; t < nx; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < n / QK; b++) {
        prefetch_next_group((const uint8_t *)&wb[b], group_bytes, sizeof(block_q8_0x8));
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)wb[b].d));
        __m256i w[8], wabs[8];
        for (int j = 0; j < 8; j++) {
            w[j] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb[b].qs + 32 * j)), flip);
            wabs[j] = _mm256_sign_epi8(w[j], w[j]);
        }
        for (int t = 0; t < nx; t++) {
            const block_q8a *a = ACT(act, stride, t) + b;
            __m256i s = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) s = ek_dpbusd(s, wabs[j], _mm256_sign_epi8(act_group(a, j), w[j]));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(a->d)), acc[t]);
        }
    }
    for (int t = 0; t < nx; t++) _mm256_storeu_ps(out + (size_t)t * X8, acc[t]);
}
#endif

#if X8_NX == 8
#define EK_X8_NX(CALL)                                                                                \
    switch (nx) {                                                                                     \
    case 8: CALL(8); break;                                                                           \
    case 7: CALL(7); break;                                                                           \
    case 6: CALL(6); break;                                                                           \
    case 5: CALL(5); break;                                                                           \
    case 4: CALL(4); break;                                                                           \
    case 3: CALL(3); break;                                                                           \
    case 2: CALL(2); break;                                                                           \
    default: CALL(1); break;                                                                          \
    }
#else
#define EK_X8_NX(CALL)                                                                                \
    switch (nx) {                                                                                     \
    case 4: CALL(4); break;                                                                           \
    case 3: CALL(3); break;                                                                           \
    case 2: CALL(2); break;                                                                           \
    default: CALL(1); break;                                                                          \
    }
#endif

static void dot_q4_0_x8_avx2(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
#define CALL(k) dot_q4_x8_avx2(n, (const uint8_t *)w8, 0, act, stride, k, out)
    EK_X8_NX(CALL)
#undef CALL
}
static void dot_q4_1_x8_avx2(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
#define CALL(k) dot_q4_x8_avx2(n, (const uint8_t *)w8, 1, act, stride, k, out)
    EK_X8_NX(CALL)
#undef CALL
}
static void dot_q8_0_x8_avx2(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
#define CALL(k) dot_q8_0_x8_avx2_n(n, w8, act, stride, k, out)
    EK_X8_NX(CALL)
#undef CALL
}
#define DOT_X8_BEST(t) dot_##t##_x8_avx2, X8_NX

/* ------------------------------------------------------------------------- */
/* NEON: sdot by lane with +dotprod (one instruction per 4 rows and group),    */
/* else vmull_s8/vmlal_s8 into int16 and pairwise adds into int32              */
/* ------------------------------------------------------------------------- */
#elif defined(EK_NEON) && defined(__aarch64__)
/* Tokens per call: with sdot each token holds two int32x4 sums, two float32x4 accumulators and
 * its activation block (6 of the 32 registers); without, four int16x8 / int32x4 sums instead, and
 * 4 tokens moved ~285 vector registers per kernel through the stack against 28-76 with 2 (Release
 * build's objdump). */
#if defined(__ARM_FEATURE_DOTPROD)
#define X8_NX 4
#else
#define X8_NX 2
#endif

EK_INLINE void prefetch_next_group(const uint8_t *blk, size_t group_bytes, size_t bsz) {
    for (size_t c = 0; c < bsz; c += 64) __builtin_prefetch(blk + group_bytes + c);
}

/* 4 fp16 scales of rows 4h..4h+3 */
EK_INLINE float32x4_t load_h4(const ek_fp16 *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

/* activation group j (4 bytes) of block a, repeated in both halves of 8 bytes */
EK_INLINE int8x8_t act_group8(const block_q8a *a, int j) {
    return vreinterpret_s8_s32(vld1_dup_s32((const int32_t *)(const void *)(a->qs + 4 * j)));
}

/* acc[t][h] (rows 4h..4h+3) += isum * (d * d_a) + m * s_a: the reference's two terms, fused */
EK_INLINE void x8_block_end(float32x4_t (*acc)[2], int32x4_t (*s)[2], const float32x4_t *d, const float32x4_t *m,
                            const void *act, size_t stride, int b, int nx) {
    for (int t = 0; t < nx; t++) {
        const block_q8a *a = ACT(act, stride, t) + b;
        for (int h = 0; h < 2; h++) {
            acc[t][h] = vfmaq_f32(acc[t][h], vcvtq_f32_s32(s[t][h]), vmulq_n_f32(d[h], a->d));
            if (m) acc[t][h] = vfmaq_n_f32(acc[t][h], m[h], a->s);
        }
    }
}

EK_INLINE void x8_store(float32x4_t (*acc)[2], int nx, float *out) {
    for (int t = 0; t < nx; t++) {
        vst1q_f32(out + (size_t)t * X8, acc[t][0]);
        vst1q_f32(out + (size_t)t * X8 + 4, acc[t][1]);
    }
}

#if defined(__ARM_FEATURE_DOTPROD)
/* s[t][h] += the 16 bytes w (4 rows x 4 codes) against activation group j, held in lane j % 4 of
 * A[t][j / 4]; j must be a constant (the lane is an immediate) */
#define X8_SDOT(w, h, j)                                                                               \
    for (int t = 0; t < nx; t++) s[t][h] = vdotq_laneq_s32(s[t][h], w, A[t][(j) / 4], (j) % 4)

/* chunk c of a Q4 block: the low nibbles are group 2c, the high ones group 2c + 1 */
#define X8_Q4_CHUNK(c)                                                                                 \
    for (int h = 0; h < 2; h++) {                                                                      \
        const uint8x16_t p = vld1q_u8(qs + 32 * (c) + 16 * h);                                         \
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(p, low4));                                   \
        const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(p, 4));                                    \
        X8_SDOT(lo, h, 2 * (c));                                                                       \
        X8_SDOT(hi, h, 2 * (c) + 1);                                                                   \
    }

EK_INLINE void dot_q4_x8_neon(int n, const uint8_t *w8, int has_min, const void *act, size_t stride, int nx,
                              float *out) {
    const size_t bsz = has_min ? sizeof(block_q4_1x8) : sizeof(block_q4_0x8);
    const size_t group_bytes = (size_t)(n / QK) * bsz;
    const uint8x16_t low4 = vdupq_n_u8(0x0f);
    float32x4_t acc[X8_NX][2];
    for (int t = 0; t < nx; t++) acc[t][0] = acc[t][1] = vdupq_n_f32(0.0f);
    for (int b = 0; b < n / QK; b++) {
        const uint8_t *blk = w8 + (size_t)b * bsz;
        prefetch_next_group(blk, group_bytes, bsz);
        const ek_fp16 *dh = (const ek_fp16 *)(const void *)blk;
        const float32x4_t d[2] = {load_h4(dh), load_h4(dh + 4)};
        const float32x4_t m[2] = {has_min ? load_h4(dh + 8) : vmulq_n_f32(d[0], -8.0f),
                                  has_min ? load_h4(dh + 12) : vmulq_n_f32(d[1], -8.0f)};
        const uint8_t *qs = blk + (has_min ? 32 : 16);
        int8x16_t A[X8_NX][2];
        int32x4_t s[X8_NX][2];
        for (int t = 0; t < nx; t++) {
            const block_q8a *a = ACT(act, stride, t) + b;
            A[t][0] = vld1q_s8(a->qs);
            A[t][1] = vld1q_s8(a->qs + 16);
            s[t][0] = s[t][1] = vdupq_n_s32(0);
        }
        X8_Q4_CHUNK(0)
        X8_Q4_CHUNK(1)
        X8_Q4_CHUNK(2)
        X8_Q4_CHUNK(3)
        x8_block_end(acc, s, d, m, act, stride, b, nx);
    }
    x8_store(acc, nx, out);
}

/* Q8_0: the stored w + 128 back to signed (xor 0x80), then sdot as for Q4 */
#define X8_Q8_GROUP(j)                                                                                 \
    for (int h = 0; h < 2; h++) {                                                                      \
        const int8x16_t w = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(qs + 32 * (j) + 16 * h), flip));     \
        X8_SDOT(w, h, j);                                                                              \
    }

EK_INLINE void dot_q8_0_x8_neon_n(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
    const block_q8_0x8 *wb = (const block_q8_0x8 *)w8;
    const size_t group_bytes = (size_t)(n / QK) * sizeof(block_q8_0x8);
    const uint8x16_t flip = vdupq_n_u8(0x80);
    float32x4_t acc[X8_NX][2];
    for (int t = 0; t < nx; t++) acc[t][0] = acc[t][1] = vdupq_n_f32(0.0f);
    for (int b = 0; b < n / QK; b++) {
        prefetch_next_group((const uint8_t *)&wb[b], group_bytes, sizeof(block_q8_0x8));
        const float32x4_t d[2] = {load_h4(wb[b].d), load_h4(wb[b].d + 4)};
        const uint8_t *qs = (const uint8_t *)wb[b].qs;
        int8x16_t A[X8_NX][2];
        int32x4_t s[X8_NX][2];
        for (int t = 0; t < nx; t++) {
            const block_q8a *a = ACT(act, stride, t) + b;
            A[t][0] = vld1q_s8(a->qs);
            A[t][1] = vld1q_s8(a->qs + 16);
            s[t][0] = s[t][1] = vdupq_n_s32(0);
        }
        X8_Q8_GROUP(0)
        X8_Q8_GROUP(1)
        X8_Q8_GROUP(2)
        X8_Q8_GROUP(3)
        X8_Q8_GROUP(4)
        X8_Q8_GROUP(5)
        X8_Q8_GROUP(6)
        X8_Q8_GROUP(7)
        x8_block_end(acc, s, d, NULL, act, stride, b, nx);
    }
    x8_store(acc, nx, out);
}
#else
/* no sdot: 8-byte halves of a register (rows 2p, 2p + 1, 4 bytes each) times a group repeated twice
 * with vmull_s8/vmlal_s8; int16 lanes then hold one row's products of one position in the group */

/* [r0, r0, r1, r1] (x) and [r2, r2, r3, r3] (y) partial sums -> [r0, r1, r2, r3] */
EK_INLINE int32x4_t pair_rows(int32x4_t x, int32x4_t y) { return vpaddq_s32(x, y); }

EK_INLINE void dot_q4_x8_neon(int n, const uint8_t *w8, int has_min, const void *act, size_t stride, int nx,
                              float *out) {
    const size_t bsz = has_min ? sizeof(block_q4_1x8) : sizeof(block_q4_0x8);
    const size_t group_bytes = (size_t)(n / QK) * bsz;
    const uint8x16_t low4 = vdupq_n_u8(0x0f);
    float32x4_t acc[X8_NX][2];
    for (int t = 0; t < nx; t++) acc[t][0] = acc[t][1] = vdupq_n_f32(0.0f);
    for (int b = 0; b < n / QK; b++) {
        const uint8_t *blk = w8 + (size_t)b * bsz;
        prefetch_next_group(blk, group_bytes, bsz);
        const ek_fp16 *dh = (const ek_fp16 *)(const void *)blk;
        const float32x4_t d[2] = {load_h4(dh), load_h4(dh + 4)};
        const float32x4_t m[2] = {has_min ? load_h4(dh + 8) : vmulq_n_f32(d[0], -8.0f),
                                  has_min ? load_h4(dh + 12) : vmulq_n_f32(d[1], -8.0f)};
        const uint8_t *qs = blk + (has_min ? 32 : 16);
        /* p16[t][q]: row pair q (rows 2q, 2q + 1); 8 products of at most 15 * 128 per lane fit int16 */
        int16x8_t p16[X8_NX][4];
        for (int t = 0; t < nx; t++)
            for (int q = 0; q < 4; q++) p16[t][q] = vdupq_n_s16(0);
        for (int c = 0; c < 4; c++)
            for (int h = 0; h < 2; h++) {
                const uint8x16_t p = vld1q_u8(qs + 32 * c + 16 * h);
                const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(p, low4));
                const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(p, 4));
                for (int t = 0; t < nx; t++) {
                    const block_q8a *a = ACT(act, stride, t) + b;
                    const int8x8_t g0 = act_group8(a, 2 * c), g1 = act_group8(a, 2 * c + 1);
                    p16[t][2 * h] = vmlal_s8(vmlal_s8(p16[t][2 * h], vget_low_s8(lo), g0), vget_low_s8(hi), g1);
                    p16[t][2 * h + 1] =
                        vmlal_s8(vmlal_s8(p16[t][2 * h + 1], vget_high_s8(lo), g0), vget_high_s8(hi), g1);
                }
            }
        int32x4_t s[X8_NX][2];
        for (int t = 0; t < nx; t++)
            for (int h = 0; h < 2; h++)
                s[t][h] = pair_rows(vpaddlq_s16(p16[t][2 * h]), vpaddlq_s16(p16[t][2 * h + 1]));
        x8_block_end(acc, s, d, m, act, stride, b, nx);
    }
    x8_store(acc, nx, out);
}

EK_INLINE void dot_q8_0_x8_neon_n(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
    const block_q8_0x8 *wb = (const block_q8_0x8 *)w8;
    const size_t group_bytes = (size_t)(n / QK) * sizeof(block_q8_0x8);
    const uint8x16_t flip = vdupq_n_u8(0x80);
    float32x4_t acc[X8_NX][2];
    for (int t = 0; t < nx; t++) acc[t][0] = acc[t][1] = vdupq_n_f32(0.0f);
    for (int b = 0; b < n / QK; b++) {
        prefetch_next_group((const uint8_t *)&wb[b], group_bytes, sizeof(block_q8_0x8));
        const float32x4_t d[2] = {load_h4(wb[b].d), load_h4(wb[b].d + 4)};
        const uint8_t *qs = (const uint8_t *)wb[b].qs;
        /* p32[t][q]: row pair q as [r, r, r + 1, r + 1]; groups j and j + 1 meet in int16 first
         * (two products of at most 128 * 127 fit) */
        int32x4_t p32[X8_NX][4];
        for (int t = 0; t < nx; t++)
            for (int q = 0; q < 4; q++) p32[t][q] = vdupq_n_s32(0);
        for (int j = 0; j < 8; j += 2)
            for (int h = 0; h < 2; h++) {
                const int8x16_t w0 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(qs + 32 * j + 16 * h), flip));
                const int8x16_t w1 = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(qs + 32 * (j + 1) + 16 * h), flip));
                for (int t = 0; t < nx; t++) {
                    const block_q8a *a = ACT(act, stride, t) + b;
                    const int8x8_t g0 = act_group8(a, j), g1 = act_group8(a, j + 1);
                    p32[t][2 * h] =
                        vpadalq_s16(p32[t][2 * h], vmlal_s8(vmull_s8(vget_low_s8(w0), g0), vget_low_s8(w1), g1));
                    p32[t][2 * h + 1] =
                        vpadalq_s16(p32[t][2 * h + 1], vmlal_s8(vmull_s8(vget_high_s8(w0), g0), vget_high_s8(w1), g1));
                }
            }
        int32x4_t s[X8_NX][2];
        for (int t = 0; t < nx; t++)
            for (int h = 0; h < 2; h++) s[t][h] = pair_rows(p32[t][2 * h], p32[t][2 * h + 1]);
        x8_block_end(acc, s, d, NULL, act, stride, b, nx);
    }
    x8_store(acc, nx, out);
}
#endif

#if X8_NX == 4
#define EK_X8_NX_NEON(CALL)                                                                           \
    switch (nx) {                                                                                     \
    case 4: CALL(4); break;                                                                           \
    case 3: CALL(3); break;                                                                           \
    case 2: CALL(2); break;                                                                           \
    default: CALL(1); break;                                                                          \
    }
#else
#define EK_X8_NX_NEON(CALL)                                                                           \
    switch (nx) {                                                                                     \
    case 2: CALL(2); break;                                                                           \
    default: CALL(1); break;                                                                          \
    }
#endif

static void dot_q4_0_x8_neon(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
#define CALL(k) dot_q4_x8_neon(n, (const uint8_t *)w8, 0, act, stride, k, out)
    EK_X8_NX_NEON(CALL)
#undef CALL
}
static void dot_q4_1_x8_neon(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
#define CALL(k) dot_q4_x8_neon(n, (const uint8_t *)w8, 1, act, stride, k, out)
    EK_X8_NX_NEON(CALL)
#undef CALL
}
static void dot_q8_0_x8_neon(int n, const void *w8, const void *act, size_t stride, int nx, float *out) {
#define CALL(k) dot_q8_0_x8_neon_n(n, w8, act, stride, k, out)
    EK_X8_NX_NEON(CALL)
#undef CALL
}
#define DOT_X8_BEST(t) dot_##t##_x8_neon, X8_NX
#else
#define DOT_X8_BEST(t) NULL, 0 /* no interleaved SIMD kernel in this build: matrices stay row-major */
#endif

/* ------------------------------------------------------------------------- */
/* the table                                                                  */
/* ------------------------------------------------------------------------- */

static const ek_x8_traits X8_TRAITS[EK_TYPE_COUNT] = {
    [EK_TYPE_Q4_0] = {repack_q4_0, DOT_X8_BEST(q4_0), dot_q4_0_x8_ref, row_q4_0_x8},
    [EK_TYPE_Q4_1] = {repack_q4_1, DOT_X8_BEST(q4_1), dot_q4_1_x8_ref, row_q4_1_x8},
    [EK_TYPE_Q8_0] = {repack_q8_0, DOT_X8_BEST(q8_0), dot_q8_0_x8_ref, row_q8_0_x8},
};

const ek_x8_traits *ek_x8_get(int type) {
    if (type < 0 || type >= EK_TYPE_COUNT || X8_TRAITS[type].repack == NULL) return NULL;
    return &X8_TRAITS[type];
}
