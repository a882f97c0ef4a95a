#include "kv_quant.h"

#include <math.h>
#include <string.h>

#include "simd.h"

#define CH 32 /* values per packing chunk */

/* ------------------------------------------------------------------------- */
/* sizes                                                                      */
/* ------------------------------------------------------------------------- */

size_t ek_kv_bytes_f16(int n, int g) { return (size_t)n * sizeof(ek_fp16); }
static size_t rec_bytes_q(int n, int g, int bits) { return (size_t)n * bits / 8 + (size_t)(n / g) * 2 * sizeof(ek_fp16); }
size_t ek_kv_bytes_q8(int n, int g) { return rec_bytes_q(n, g, 8); }
size_t ek_kv_bytes_q4(int n, int g) { return rec_bytes_q(n, g, 4); }
size_t ek_kv_bytes_q2(int n, int g) { return rec_bytes_q(n, g, 2); }
size_t ek_kv_bytes_q3(int n, int g) { return rec_bytes_q(n, g, 3); }
size_t ek_kv_bytes_q6(int n, int g) { return rec_bytes_q(n, g, 6); }

/* ------------------------------------------------------------------------- */
/* quantize (scalar: runs once per token, off the hot path)                   */
/* ------------------------------------------------------------------------- */

static inline float sanitize(float v) {
    if (v != v) return NAN; /* handled by the caller: stored as the minimum */
    return v > 65504.0f ? 65504.0f : (v < -65504.0f ? -65504.0f : v);
}

/* The grid of a group is min/max (no value clipped) unless the store fits grids (EK_KV_FIT_GRID).
 * The fit starts from min/max and tries the grids of a few clipped ranges, each refined by
 * least-squares steps on its codes, keeping the one with the smallest squared error. Every
 * candidate is read back through fp16, as dequant will read it, and only steps no larger than the
 * min/max step are accepted, so the result is never worse than min/max and every bound stated in
 * min/max steps still holds.
 * Arithmetic is float32 in a fixed order (8 accumulator lanes, then the lanes in order; the file is
 * built without FMA contraction), so the NumPy reference in tests/test_kv.py mirrors it exactly.
 * 8-bit groups keep min/max: their error is already far below anything measurable. */
static const float FIT_SHRINK[] = {1.0f, 0.8f}; /* ranges tried, relative to max - min */
#define FIT_STEPS 2                                /* least-squares refinements of each */
#define LANES 8

/* Codes of x (n % 8 == 0, finite) on the grid (d, m) and their squared error. */
static float grid_codes(const float *x, int n, int qmax, float d, float m, uint8_t *codes) {
    const float id = d > 0.0f ? 1.0f / d : 0.0f, top = (float)qmax;
    float acc[LANES] = {0};
    for (int i = 0; i < n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            float q = rintf((x[i + l] - m) * id);
            q = q < 0.0f ? 0.0f : q;
            q = q > top ? top : q;
            const float e = x[i + l] - (q * d + m);
            codes[i + l] = (uint8_t)q;
            acc[l] += e * e;
        }
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* Least-squares grid through codes c: x ~ d c + m. 0 if degenerate (one distinct code). */
static int grid_lsq(const float *x, const uint8_t *c, int n, float *d, float *m) {
    float a[4][LANES] = {{0}};
    for (int i = 0; i < n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            const float q = (float)c[i + l];
            a[0][l] += q; a[1][l] += x[i + l]; a[2][l] += q * q; a[3][l] += q * x[i + l];
        }
    float s[4] = {0};
    for (int k = 0; k < 4; k++)
        for (int l = 0; l < LANES; l++) s[k] += a[k][l];
    const double den = (double)n * s[2] - (double)s[0] * s[0];
    if (!(den > 0)) return 0;
    const double dd = ((double)n * s[3] - (double)s[0] * s[1]) / den;
    *d = (float)dd;
    *m = (float)(((double)s[1] - dd * s[0]) / n);
    return *d > 0.0f;
}

/* Codes for one group, and its fp16 scale and minimum. */
static void quantize_group(const float *x, int n, int bits, int fit, uint8_t *codes, ek_fp16 *d_out, ek_fp16 *m_out) {
    const int qmax = (1 << bits) - 1;
    float xs[1024], lo = INFINITY, hi = -INFINITY;
    int nan = 0;
    for (int i = 0; i < n; i++) {
        xs[i] = sanitize(x[i]);
        if (xs[i] != xs[i]) { nan = 1; continue; }
        lo = fminf(lo, xs[i]);
        hi = fmaxf(hi, xs[i]);
    }
    if (lo > hi) lo = hi = 0.0f; /* all NaN */
    /* min/max: codes against the fp16-rounded minimum and scale that dequant will read */
    ek_fp16 mh = ek_fp32_to_fp16(lo), dh = ek_fp32_to_fp16((hi - ek_fp16_to_fp32(mh)) / (float)qmax);
    if (!fit || nan || bits >= 8 || n % LANES) { /* NaN -> code 0; such groups keep min/max */
        const float d = ek_fp16_to_fp32(dh), m = ek_fp16_to_fp32(mh), id = d > 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < n; i++) {
            const int q = xs[i] != xs[i] ? 0 : (int)lrintf((xs[i] - m) * id);
            codes[i] = (uint8_t)(q < 0 ? 0 : (q > qmax ? qmax : q));
        }
        *d_out = dh;
        *m_out = mh;
        return;
    }
    const float d_max = ek_fp16_to_fp32(dh);
    float best = grid_codes(xs, n, qmax, d_max, ek_fp16_to_fp32(mh), codes);
    uint8_t trial[1024];
    for (size_t s = 0; s < sizeof FIT_SHRINK / sizeof FIT_SHRINK[0]; s++) {
        /* the full range starts from the min/max codes; a clipped one from its own grid */
        float d, m;
        int step = 0;
        if (FIT_SHRINK[s] == 1.0f) {
            memcpy(trial, codes, (size_t)n);
            step = 1;
        } else {
            const float half = 0.5f * (hi - lo) * FIT_SHRINK[s];
            m = 0.5f * (lo + hi) - half;
            d = 2.0f * half / (float)qmax;
        }
        for (; step <= FIT_STEPS; step++) {
            if (step > 0 && !grid_lsq(xs, trial, n, &d, &m)) break;
            const ek_fp16 ch = ek_fp32_to_fp16(m), sh = ek_fp32_to_fp16(d);
            const float dr = ek_fp16_to_fp32(sh), mr = ek_fp16_to_fp32(ch);
            if (!(dr > 0.0f && dr <= d_max && fabsf(mr) <= 65504.0f)) break; /* NaN and inf fail too */
            const float err = grid_codes(xs, n, qmax, dr, mr, trial);
            if (err < best) {
                best = err; dh = sh; mh = ch;
                memcpy(codes, trial, (size_t)n);
            }
        }
    }
    *d_out = dh;
    *m_out = mh;
}

void ek_kv_encode_f16(const float *x, uint8_t *rec, int n, int g, int fit) {
    ek_fp16 *h = (ek_fp16 *)rec;
    for (int i = 0; i < n; i++) {
        float v = sanitize(x[i]);
        h[i] = ek_fp32_to_fp16(v != v ? 0.0f : v);
    }
}

/* Each layout packs one chunk of 32 codes (kv_quant.h) and reads one code back (the reference). */
typedef void (*pack_fn)(const uint8_t *cc, uint8_t *p);
typedef int (*code_fn)(const uint8_t *rec, int c, int j); /* code j of chunk c */

static void pack_q8(const uint8_t *cc, uint8_t *p) { memcpy(p, cc, CH); }
static int code_q8(const uint8_t *rec, int c, int j) { return rec[c * CH + j]; }

static void pack_q4(const uint8_t *cc, uint8_t *p) {
    for (int j = 0; j < 16; j++) p[j] = (uint8_t)(cc[j] | (cc[j + 16] << 4));
}
static int code_q4(const uint8_t *rec, int c, int j) {
    const uint8_t b = rec[c * 16 + (j & 15)];
    return j < 16 ? (b & 15) : (b >> 4);
}

static void pack_q2(const uint8_t *cc, uint8_t *p) { /* the low 2 bits of each code */
    for (int j = 0; j < 8; j++)
        p[j] = (uint8_t)((cc[j] & 3) | (cc[j + 8] & 3) << 2 | (cc[j + 16] & 3) << 4 | (cc[j + 24] & 3) << 6);
}
static int code_q2(const uint8_t *rec, int c, int j) { return (rec[c * 8 + (j & 7)] >> (2 * (j >> 3))) & 3; }

static void pack_q3(const uint8_t *cc, uint8_t *p) { /* the 2-bit layout, then the mask of bit 2 */
    pack_q2(cc, p);
    for (int j = 0; j < 4; j++) {
        uint8_t b = 0;
        for (int t = 0; t < 8; t++) b |= (uint8_t)((cc[8 * j + t] >> 2) & 1) << t;
        p[8 + j] = b;
    }
}
static int code_q3(const uint8_t *rec, int c, int j) {
    const uint8_t *r = rec + c * 12;
    return ((r[j & 7] >> (2 * (j >> 3))) & 3) | ((r[8 + (j >> 3)] >> (j & 7)) & 1) << 2;
}

static void pack_q6(const uint8_t *cc, uint8_t *p) { /* the low nibbles as the 4-bit layout, then bits 4-5 as the 2-bit one */
    uint8_t lo[CH], hi[CH];
    for (int j = 0; j < CH; j++) {
        lo[j] = cc[j] & 15;
        hi[j] = cc[j] >> 4;
    }
    pack_q4(lo, p);
    pack_q2(hi, p + 16);
}
static int code_q6(const uint8_t *rec, int c, int j) {
    const uint8_t *r = rec + c * 24;
    return code_q4(r, 0, j) | code_q2(r + 16, 0, j) << 4;
}

static void quantize_q(const float *x, uint8_t *rec, int n, int g, int fit, int bits, pack_fn pack) {
    uint8_t codes[1024];
    ek_fp16 *dm = (ek_fp16 *)(rec + (size_t)n * bits / 8);
    const int ng = n / g;
    for (int k = 0; k < ng; k++) quantize_group(x + k * g, g, bits, fit, codes + k * g, &dm[k], &dm[ng + k]);
    for (int c = 0; c < n; c += CH) pack(codes + c, rec + (size_t)c * bits / 8);
}

void ek_kv_encode_q8(const float *x, uint8_t *rec, int n, int g, int fit) { quantize_q(x, rec, n, g, fit, 8, pack_q8); }
void ek_kv_encode_q4(const float *x, uint8_t *rec, int n, int g, int fit) { quantize_q(x, rec, n, g, fit, 4, pack_q4); }
void ek_kv_encode_q2(const float *x, uint8_t *rec, int n, int g, int fit) { quantize_q(x, rec, n, g, fit, 2, pack_q2); }
void ek_kv_encode_q3(const float *x, uint8_t *rec, int n, int g, int fit) { quantize_q(x, rec, n, g, fit, 3, pack_q3); }
void ek_kv_encode_q6(const float *x, uint8_t *rec, int n, int g, int fit) { quantize_q(x, rec, n, g, fit, 6, pack_q6); }

/* ------------------------------------------------------------------------- */
/* dequantize: reference                                                      */
/* ------------------------------------------------------------------------- */

void ek_kv_decode_f16_ref(const uint8_t *rec, float *y, int n, int g) {
    for (int i = 0; i < n; i++) y[i] = ek_fp16_to_fp32(((const ek_fp16 *)rec)[i]);
}

static void dequant_q_ref(const uint8_t *rec, float *y, int n, int g, int bits, code_fn code) {
    const ek_fp16 *dm = (const ek_fp16 *)(rec + (size_t)n * bits / 8);
    const int ng = n / g;
    for (int i = 0; i < n; i++)
        y[i] = code(rec, i / CH, i % CH) * ek_fp16_to_fp32(dm[i / g]) + ek_fp16_to_fp32(dm[ng + i / g]);
}
void ek_kv_decode_q8_ref(const uint8_t *rec, float *y, int n, int g) { dequant_q_ref(rec, y, n, g, 8, code_q8); }
void ek_kv_decode_q4_ref(const uint8_t *rec, float *y, int n, int g) { dequant_q_ref(rec, y, n, g, 4, code_q4); }
void ek_kv_decode_q2_ref(const uint8_t *rec, float *y, int n, int g) { dequant_q_ref(rec, y, n, g, 2, code_q2); }
void ek_kv_decode_q3_ref(const uint8_t *rec, float *y, int n, int g) { dequant_q_ref(rec, y, n, g, 3, code_q3); }
void ek_kv_decode_q6_ref(const uint8_t *rec, float *y, int n, int g) { dequant_q_ref(rec, y, n, g, 6, code_q6); }

/* ------------------------------------------------------------------------- */
/* dequantize: SIMD (the attention inner loop calls these once per record)    */
/* ------------------------------------------------------------------------- */
#if defined(EK_AVX2)

void ek_kv_decode_f16(const uint8_t *rec, float *y, int n, int g) { ek_fp16_to_fp32_row((const ek_fp16 *)rec, y, n); }

static inline __attribute__((always_inline)) void dequant_q_simd(const uint8_t *rec, float *y, int n, int g, int bits) {
    const ek_fp16 *dm = (const ek_fp16 *)(rec + (size_t)n * bits / 8);
    const int ng = n / g;
    for (int c = 0; c < n; c += CH) {
        const __m256 d = _mm256_set1_ps(ek_h2f(dm[c / g])), m = _mm256_set1_ps(ek_h2f(dm[ng + c / g]));
        __m256 v[4];
        ek_kv_chunk_codes(rec, c / CH, v, bits);
        for (int b = 0; b < 4; b++) _mm256_storeu_ps(y + c + 8 * b, _mm256_fmadd_ps(v[b], d, m));
    }
}

void ek_kv_decode_q3(const uint8_t *rec, float *y, int n, int g) { dequant_q_simd(rec, y, n, g, 3); }
void ek_kv_decode_q6(const uint8_t *rec, float *y, int n, int g) { dequant_q_simd(rec, y, n, g, 6); }

#elif defined(EK_NEON) && defined(__aarch64__)

void ek_kv_decode_f16(const uint8_t *rec, float *y, int n, int g) {
    const ek_fp16 *h = (const ek_fp16 *)rec;
    for (int i = 0; i < n; i += 4) vst1q_f32(y + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + i))));
}

/* 16 codes (bytes) -> 16 floats d*c + m */
static inline void deq16(uint8x16_t q, float32x4_t d, float32x4_t m, float *y) {
    uint16x8_t a = vmovl_u8(vget_low_u8(q)), b = vmovl_u8(vget_high_u8(q));
    vst1q_f32(y, vfmaq_f32(m, vcvtq_f32_u32(vmovl_u16(vget_low_u16(a))), d));
    vst1q_f32(y + 4, vfmaq_f32(m, vcvtq_f32_u32(vmovl_u16(vget_high_u16(a))), d));
    vst1q_f32(y + 8, vfmaq_f32(m, vcvtq_f32_u32(vmovl_u16(vget_low_u16(b))), d));
    vst1q_f32(y + 12, vfmaq_f32(m, vcvtq_f32_u32(vmovl_u16(vget_high_u16(b))), d));
}

static inline __attribute__((always_inline)) void dequant_q_simd(const uint8_t *rec, float *y, int n, int g, int bits) {
    const ek_fp16 *dm = (const ek_fp16 *)(rec + (size_t)n * bits / 8);
    const int ng = n / g;
    const uint8_t *p = rec;
    for (int c = 0; c < n; c += CH) {
        const float32x4_t d = vdupq_n_f32(ek_h2f(dm[c / g])), m = vdupq_n_f32(ek_h2f(dm[ng + c / g]));
        uint8x16_t lo, hi;
        if (bits == 8) {
            lo = vld1q_u8(p); hi = vld1q_u8(p + 16); p += 32;
        } else if (bits == 4) {
            uint8x16_t t = vld1q_u8(p);
            lo = vandq_u8(t, vdupq_n_u8(0x0f)); hi = vshrq_n_u8(t, 4); p += 16;
        } else {
            uint8x8_t t = vld1_u8(p), k = vdup_n_u8(3);
            lo = vcombine_u8(vand_u8(t, k), vand_u8(vshr_n_u8(t, 2), k));
            hi = vcombine_u8(vand_u8(vshr_n_u8(t, 4), k), vshr_n_u8(t, 6));
            p += 8;
        }
        deq16(lo, d, m, y + c);
        deq16(hi, d, m, y + c + 16);
    }
}

#else
void ek_kv_decode_f16(const uint8_t *rec, float *y, int n, int g) { ek_kv_decode_f16_ref(rec, y, n, g); }
#endif

#if defined(EK_AVX2) || (defined(EK_NEON) && defined(__aarch64__))
void ek_kv_decode_q8(const uint8_t *rec, float *y, int n, int g) { dequant_q_simd(rec, y, n, g, 8); }
void ek_kv_decode_q4(const uint8_t *rec, float *y, int n, int g) { dequant_q_simd(rec, y, n, g, 4); }
void ek_kv_decode_q2(const uint8_t *rec, float *y, int n, int g) { dequant_q_simd(rec, y, n, g, 2); }
#else /* plain C: the reference */
void ek_kv_decode_q8(const uint8_t *rec, float *y, int n, int g) { ek_kv_decode_q8_ref(rec, y, n, g); }
void ek_kv_decode_q4(const uint8_t *rec, float *y, int n, int g) { ek_kv_decode_q4_ref(rec, y, n, g); }
void ek_kv_decode_q2(const uint8_t *rec, float *y, int n, int g) { ek_kv_decode_q2_ref(rec, y, n, g); }
#endif
#if !defined(EK_AVX2) /* NEON and plain C: the reference */
void ek_kv_decode_q3(const uint8_t *rec, float *y, int n, int g) { ek_kv_decode_q3_ref(rec, y, n, g); }
void ek_kv_decode_q6(const uint8_t *rec, float *y, int n, int g) { ek_kv_decode_q6_ref(rec, y, n, g); }
#endif

/* ------------------------------------------------------------------------- */
/* rotation                                                                   */
/* ------------------------------------------------------------------------- */

static void fwht(float *x, int n) {
    for (int h = 1; h < n; h *= 2)
        for (int i = 0; i < n; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                const float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
}

void ek_rotate(float *x, const float *signs, int n) {
    for (int i = 0; i < n; i++) x[i] *= signs[i];
    fwht(x, n);
    const float s = 1.0f / sqrtf((float)n);
    for (int i = 0; i < n; i++) x[i] *= s;
}

void ek_unrotate(float *x, const float *signs, int n) {
    fwht(x, n);
    const float s = 1.0f / sqrtf((float)n);
    for (int i = 0; i < n; i++) x[i] *= s * signs[i];
}
