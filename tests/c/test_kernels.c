/* C kernel tests: every compiled SIMD kernel against its plain-C reference,
 * with explicit error bounds; runs natively and under qemu-aarch64 (NEON). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv_attention.h"
#include "edgekv.h"
#include "edgekv_testing.h"
#include "quant.h"
#include "simd.h"

static int failures = 0;

#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            failures++;                                    \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
            printf(__VA_ARGS__);                           \
            printf("\n");                                  \
        }                                                  \
    } while (0)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 32);
}
static float frand(void) { return (float)rnd() / 4294967296.0f * 2.0f - 1.0f; } /* [-1, 1) */

/* Normalized mean squared error of a against reference b. */
static double nmse(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return den > 0 ? num / den : num;
}

/* Random but valid weight bytes: random quant codes, sane fp16 scales. */
static void random_weights(int type, void *buf, int64_t n_in, int64_t n_out) {
    size_t rb = ek_type_row_bytes(type, n_in);
    unsigned char *p = (unsigned char *)buf;
    for (size_t i = 0; i < rb * (size_t)n_out; i++) p[i] = (unsigned char)rnd();
    if (type == EK_TYPE_F32) {
        float *f = (float *)buf;
        for (int64_t i = 0; i < n_in * n_out; i++) f[i] = frand();
    } else if (type == EK_TYPE_F16) {
        ek_fp16 *h = (ek_fp16 *)buf;
        for (int64_t i = 0; i < n_in * n_out; i++) h[i] = ek_fp32_to_fp16(frand());
    } else {
        const ek_type_traits *t = ek_type_get(type);
        int64_t nb = n_in / t->blck * n_out;
        for (int64_t b = 0; b < nb; b++) {
            unsigned char *blk = p + b * t->block_bytes;
            ek_fp16 d = ek_fp32_to_fp16(0.01f + 0.05f * (frand() + 1.0f));
            memcpy(blk, &d, 2);
            if (type == EK_TYPE_Q4_1) {
                ek_fp16 m = ek_fp32_to_fp16(-0.3f * (frand() + 1.0f));
                memcpy(blk + 2, &m, 2);
            }
        }
    }
}

static void test_matmul(void) {
    const int types[] = {EK_TYPE_F32, EK_TYPE_F16, EK_TYPE_Q4_0, EK_TYPE_Q4_1, EK_TYPE_Q8_0};
    const int n_ins[] = {32, 64, 576, 1536};
    const int n_toks[] = {1, 2, 3, 4, 6, 8, 9, 17}; /* x8 kernels take up to 2, 4 or 8 tokens per call */
    /* which x8 kernel impl 2 runs: every SIMD build has one for each interleaved type (NEON included) */
    for (size_t ti = 2; ti < sizeof types / sizeof *types; ti++) {
        const ek_x8_traits *x8 = ek_x8_get(types[ti]);
        CHECK(x8 != NULL, "%s has no interleaved layout", ek_type_get(types[ti])->name);
        if (!x8) continue;
        if (x8->dot)
            printf("x8 %s: %s kernel, up to %d tokens per call\n", ek_type_get(types[ti])->name, ek_simd(), x8->max_nx);
        else
            printf("x8 %s: no SIMD kernel in this build (matrices stay row-major)\n", ek_type_get(types[ti])->name);
        CHECK(x8->dot != NULL || strcmp(ek_simd(), "scalar") == 0, "%s: SIMD build (%s) without an x8 kernel",
              ek_type_get(types[ti])->name, ek_simd());
    }
    for (size_t ti = 0; ti < sizeof types / sizeof *types; ti++)
        for (size_t ii = 0; ii < sizeof n_ins / sizeof *n_ins; ii++)
            for (size_t ki = 0; ki < sizeof n_toks / sizeof *n_toks; ki++) {
                const int type = types[ti], n_in = n_ins[ii], n_tok = n_toks[ki], n_out = 17;
                void *w = malloc(ek_type_row_bytes(type, n_in) * n_out);
                float *x = (float *)malloc(sizeof(float) * n_in * n_tok);
                float *o_ref = (float *)malloc(sizeof(float) * n_out * n_tok);
                float *o_simd = (float *)malloc(sizeof(float) * n_out * n_tok);
                random_weights(type, w, n_in, n_out);
                for (int i = 0; i < n_in * n_tok; i++) x[i] = frand() * 3.0f;
                CHECK(ek_matmul(type, w, n_in, n_out, x, n_tok, o_ref, 0) == 0, "matmul ref failed");
                CHECK(ek_matmul(type, w, n_in, n_out, x, n_tok, o_simd, 1) == 0, "matmul simd failed");
                double e = nmse(o_simd, o_ref, (size_t)n_out * n_tok);
                CHECK(e < 1e-10, "matmul %s n_in=%d n_tok=%d: nmse %.3g >= 1e-10 (simd=%s)", ek_type_get(type)->name,
                      n_in, n_tok, e, ek_simd());
                /* rows interleaved 8 by 8 (16 of the 17; the last one row-major): SIMD and reference x8 */
                for (int impl = 2; ek_x8_get(type) && impl <= 3; impl++) {
                    CHECK(ek_matmul(type, w, n_in, n_out, x, n_tok, o_simd, impl) == 0, "matmul x8 failed");
                    e = nmse(o_simd, o_ref, (size_t)n_out * n_tok);
                    CHECK(e < 1e-10, "matmul %s x8 impl %d n_in=%d n_tok=%d: nmse %.3g >= 1e-10 (simd=%s)",
                          ek_type_get(type)->name, impl, n_in, n_tok, e, ek_simd());
                }
                free(w); free(x); free(o_ref); free(o_simd);
            }
}

/* Quantized activations: a q8a dot of float weights must stay close to the float dot. */
static void test_act_quant(void) {
    const int n = 256;
    float x[256], y[256];
    block_q8a q[256 / QK];
    for (int i = 0; i < n; i++) x[i] = frand() * 10.0f;
    ek_quantize_row_q8a(x, q, n);
    for (int b = 0; b < n / QK; b++) {
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            y[b * QK + j] = q[b].qs[j] * q[b].d;
            sum += q[b].qs[j];
        }
        CHECK(fabsf(q[b].s - q[b].d * sum) <= 1e-5f * fabsf(q[b].d * sum) + 1e-6f, "q8a block %d: s mismatch", b);
    }
    /* round-to-nearest: error at most half a step per value */
    for (int i = 0; i < n; i++) CHECK(fabsf(y[i] - x[i]) <= 0.5001f * q[i / QK].d, "q8a value %d off by %g", i, y[i] - x[i]);
    /* the SIMD quantizer writes the reference's blocks exactly (finite inputs), ties included */
    float t[256];
    block_q8a r[256 / QK];
    for (int rep = 0; rep < 200; rep++) {
        const float scale = powf(10.0f, (float)(rep % 9) - 4.0f);
        for (int i = 0; i < n; i++) t[i] = frand() * scale;
        if (rep % 3 == 0) /* exact halves of a step: amax = 127 so that x * id lands on k + 0.5 */
            for (int i = 0; i < n; i++) t[i] = (i % QK == 0) ? 127.0f : (float)((i * 7) % 254 - 127) + 0.5f;
        if (rep % 5 == 0) t[rep % n] = 0.0f, t[(rep + 1) % n] = -0.0f;
        ek_quantize_row_q8a(t, q, n);
        ek_quantize_row_q8a_ref(t, r, n);
        CHECK(memcmp(q, r, sizeof q) == 0, "q8a SIMD vs reference differ (rep %d)", rep);
    }
    float zeros[QK] = {0};
    ek_quantize_row_q8a(zeros, q, QK);
    CHECK(q[0].d == 0.0f && q[0].s == 0.0f, "all-zero block must quantize to d = 0");
}

static void test_fp16(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = ek_fp16_to_fp32((ek_fp16)h);
        if (isnan(f)) continue;
        if (ek_fp32_to_fp16(f) != h) bad++;
    }
    CHECK(bad == 0, "fp16 round trip failed for %d values", bad);
    CHECK(ek_fp32_to_fp16(65504.0f) == 0x7bff, "65504 must be the largest finite half");
    CHECK(ek_fp32_to_fp16(65520.0f) == 0x7c00, "65520 must round to inf");
    CHECK(ek_fp32_to_fp16(1.0f + 1.0f / 2048.0f) == 0x3c00, "ties round to even (down)");
    CHECK(ek_fp32_to_fp16(1.0f + 3.0f / 2048.0f) == 0x3c02, "ties round to even (up)");
    CHECK(isnan(ek_fp16_to_fp32(ek_fp32_to_fp16(NAN))), "NaN must stay NaN");
}

/* The bit-widths of the library's KV precisions (its table, csrc/kv_types.c), widest first: every
 * test below covers each of them, so a new row is tested without a change here. */
static int kv_bits[16], n_kv_bits;
static void load_kv_bits(void) {
    int32_t b[16];
    n_kv_bits = ek_kv_precisions(b, NULL, 16);
    CHECK(n_kv_bits >= 2 && n_kv_bits <= 16, "ek_kv_precisions: %d precisions", n_kv_bits);
    for (int i = 0; i < n_kv_bits; i++) { /* insertion sort, descending */
        int j = i;
        for (; j > 0 && kv_bits[j - 1] < b[i]; j--) kv_bits[j] = kv_bits[j - 1];
        kv_bits[j] = b[i];
    }
    CHECK(kv_bits[0] == 16, "the widest KV precision is FP16");
}

/* Every KV record format: SIMD dequant == reference dequant, and the round trip
 * error stays within half a quantization step of each group (rotation off). */
static void test_kv_records(void) {
    const int *bitss = kv_bits;
    const int ns[] = {32, 64, 128};
    const int gs[] = {32, 64};
    for (int a = 0; a < n_kv_bits; a++)
        for (size_t b = 0; b < 3; b++)
            for (size_t c = 0; c < 2; c++) {
                const int bits = bitss[a], n = ns[b], g = gs[c];
                if (n % g) continue;
                float x[128], y_ref[128], y_simd[128];
                for (int i = 0; i < n; i++) x[i] = frand() * 3.0f + (i % 7 == 0 ? 5.0f : 0.0f);
                CHECK(ek_kv_quant_roundtrip(bits, x, n, g, y_ref, 0) == 0, "kv roundtrip ref failed");
                CHECK(ek_kv_quant_roundtrip(bits, x, n, g, y_simd, 1) == 0, "kv roundtrip simd failed");
                double e = nmse(y_simd, y_ref, n);
                CHECK(e < 1e-12, "kv dequant %d-bit n=%d g=%d: simd vs ref nmse %.3g", bits, n, g, e);
                /* the fitted grid (EK_RT_FIT): same readers, and per group never a larger squared error */
                float y_fit[128], y_fit_simd[128];
                CHECK(ek_kv_quant_roundtrip(bits, x, n, g, y_fit, EK_RT_FIT) == 0, "kv roundtrip fit failed");
                CHECK(ek_kv_quant_roundtrip(bits, x, n, g, y_fit_simd, EK_RT_FIT | EK_RT_SIMD) == 0, "kv roundtrip fit simd failed");
                e = nmse(y_fit_simd, y_fit, n);
                CHECK(e < 1e-12, "kv fit %d-bit n=%d g=%d: simd vs ref nmse %.3g", bits, n, g, e);
                for (int k = 0; k < n / g; k++) {
                    double s_mm = 0, s_fit = 0;
                    for (int i = k * g; i < (k + 1) * g; i++) {
                        s_mm += ((double)y_ref[i] - x[i]) * ((double)y_ref[i] - x[i]);
                        s_fit += ((double)y_fit[i] - x[i]) * ((double)y_fit[i] - x[i]);
                    }
                    CHECK(s_fit <= s_mm * (1 + 1e-5) + 1e-30, "kv fit %d-bit n=%d g=%d group %d: error %g above min/max %g",
                          bits, n, g, k, s_fit, s_mm);
                }
                for (int k = 0; k < n / g; k++) {
                    float lo = x[k * g], hi = x[k * g];
                    for (int i = k * g; i < (k + 1) * g; i++) { lo = fminf(lo, x[i]); hi = fmaxf(hi, x[i]); }
                    const float step = bits == 16 ? 0.0f : (hi - lo) / (float)((1 << bits) - 1);
                    for (int i = k * g; i < (k + 1) * g; i++) {
                        /* half a step, plus fp16 rounding of scale (x qmax) and minimum */
                        const float tol = 0.5f * step * 1.01f + 2e-3f * (fabsf(hi) + fabsf(lo)) + 1e-6f;
                        CHECK(fabsf(y_ref[i] - x[i]) <= tol, "kv %d-bit n=%d g=%d: value %d off by %g (tol %g)", bits,
                              n, g, i, y_ref[i] - x[i], tol);
                    }
                }
            }
}

/* Where the build sums values in integers (ek_attn_value_tile > 0), the bound on the L2 error per
 * head that the weight rounding may add: in each tile of T consecutive slots of a pool (slots are in
 * position order here), weight * scale is rounded to an integer in 0..Q (ek_attn_value_weight_max)
 * against the tile's largest W, off by at most 0.5 * W / Q, which the kernel multiplies by a code's
 * distance from the codes' midpoint (< 2^bits), so sum over tiles of
 * 0.5 * W * n_T * (2^bits - 1) * sqrt(hd) / Q (tests/test_kv.py has a tighter form).
 * p: the head's normalized weights; vd: records read back (rotation undone). */
static double value_rounding_bound(const double *p, const float *vd, const int32_t *kb, const int32_t *vb, int n_pos,
                                   int hd, int gsz, int group, int rotate, const float *signs) {
    double bound = 0;
    for (int vi = 1; vi < n_kv_bits; vi++) {
        const int vbits = kv_bits[vi];
        const int tile = ek_attn_value_tile(vbits, hd, gsz);
        const double qmax = ek_attn_value_weight_max(vbits, hd, gsz);
        if (!tile) continue;
        for (int ki = 0; ki < n_kv_bits; ki++) { /* each pool (kbits, vbits): its slots in position order */
            const int kbits = kv_bits[ki];
            int n_t = 0;
            double w_top = 0;
            for (int j = 0; j <= n_pos; j++) {
                if (j < n_pos && !(vb[j] == vbits && kb[j] == kbits)) continue;
                if (j == n_pos || n_t == tile) { /* close a tile */
                    bound += 0.5 * w_top * 1.001 * n_t * ((1 << vbits) - 1) * sqrt((double)hd) / qmax;
                    n_t = 0;
                    w_top = 0;
                    if (j == n_pos) break;
                }
                float r[256];
                memcpy(r, vd + (size_t)j * hd, sizeof(float) * hd);
                if (rotate) ek_rotate(r, signs, hd);
                for (int k = 0; k < hd / group; k++) {
                    float lo = r[k * group], hi = r[k * group];
                    for (int i = k * group; i < (k + 1) * group; i++) { lo = fminf(lo, r[i]); hi = fmaxf(hi, r[i]); }
                    const double w = p[j] * (hi - lo) / ((1 << vbits) - 1);
                    if (w > w_top) w_top = w;
                }
                n_t++;
            }
        }
    }
    return bound;
}

/* Fused attention over a mixed store == softmax attention over the dequantized
 * records (computed here in double precision from the same stored values), up to the integer value
 * sum's weight rounding (value_rounding_bound). */
static void test_kv_attention(void) {
    const int hd = 64, n_pos = 150, gsz = 3, group = 32;
    float *k = malloc(sizeof(float) * n_pos * hd), *v = malloc(sizeof(float) * n_pos * hd);
    float q[3 * 64], out[3 * 64];
    int32_t kb[150], vb[150];
    const int *bits = kv_bits, nb = n_kv_bits;
    ek_kv_store signs_of; /* the store's rotation signs (fixed), to read records in the stored basis */
    CHECK(ek_kv_store_init(&signs_of, 1, 1, hd, 1) == 0, "store init failed");
    for (int i = 0; i < n_pos * hd; i++) { k[i] = frand() * 2.0f; v[i] = frand(); }
    for (int j = 0; j < n_pos; j++) k[j * hd + 5] += 6.0f; /* a channel offset, as real keys have */
    for (int i = 0; i < gsz * hd; i++) q[i] = frand();
    /* the key center the store sets with EK_KV_CENTER_KEYS: mean fp16 key over positions 1..n-1 */
    double c[64] = {0};
    for (int j = 1; j < n_pos; j++) {
        float k16[64];
        CHECK(ek_kv_quant_roundtrip(16, k + (size_t)j * hd, hd, hd, k16, 0) == 0, "fp16 round trip");
        for (int i = 0; i < hd; i++) c[i] += k16[i] / (double)(n_pos - 1);
    }
    for (int flags = 0; flags <= (EK_KV_ROTATE | EK_KV_CENTER_KEYS); flags++)
        for (int mix = 0; mix < 4; mix++) { /* all 16; two mixes; mixed keys with 16-bit values (no rounding bound) */
            const int rotate = flags & EK_KV_ROTATE, center = (flags & EK_KV_CENTER_KEYS) && mix > 0;
            for (int j = 0; j < n_pos; j++) {
                kb[j] = mix == 0 ? 16 : bits[(j * 7 + mix) % nb];
                vb[j] = mix == 0 || mix == 3 ? 16 : bits[(j * 5 + 1) % nb];
            }
            /* reference: the stored values read back (rotation undone), attended in double precision */
            float kd[150 * 64], vd[150 * 64], qk[KVP_COUNT * 3 * 64];
            CHECK(ek_kv_attention_test(q, gsz, k, v, kb, vb, n_pos, hd, group, flags, out, kd, vd, qk) == 0,
                  "attention test failed");
            double excess2 = 0, ref2 = 0;
            for (int h = 0; h < gsz; h++) {
                double s[150], mx = -1e30, sum = 0;
                for (int j = 0; j < n_pos; j++) {
                    /* the query this key was scored with (int8-rounded where the build scores with integers) */
                    const float *qh = qk + ((size_t)ek_kv_prec_from_bits(kb[j]) * gsz + h) * hd;
                    const float *qf = qk + (size_t)h * hd; /* the float query (16-bit keys' entry) */
                    double d = 0;
                    if (center && kb[j] != 16) /* centered key: q_key . (k - c) + q . c */
                        for (int i = 0; i < hd; i++) d += (double)qh[i] * (kd[j * hd + i] - c[i]) + (double)qf[i] * c[i];
                    else
                        for (int i = 0; i < hd; i++) d += (double)qh[i] * kd[j * hd + i];
                    s[j] = d;
                    if (s[j] > mx) mx = s[j];
                }
                for (int j = 0; j < n_pos; j++) { s[j] = exp(s[j] - mx); sum += s[j]; }
                for (int j = 0; j < n_pos; j++) s[j] /= sum;
                double err2 = 0;
                for (int i = 0; i < hd; i++) {
                    double o = 0;
                    for (int j = 0; j < n_pos; j++) o += s[j] * vd[j * hd + i];
                    err2 += (out[h * hd + i] - o) * (out[h * hd + i] - o);
                    ref2 += o * o;
                }
                const double b = value_rounding_bound(s, vd, kb, vb, n_pos, hd, gsz, group, rotate, signs_of.signs);
                const double x = sqrt(err2) > b ? sqrt(err2) - b : 0.0;
                excess2 += x * x;
            }
            const double e = excess2 / ref2, bound = 1e-9;
            CHECK(e < bound, "kv attention mix=%d flags=%d: nmse beyond the value rounding bound %.3g >= %.3g", mix,
                  flags, e, bound);
        }
    ek_kv_store_free(&signs_of);
    free(k);
    free(v);
}

static void test_softmax_exp(void) {
    float x[19];
    for (int i = 0; i < 19; i++) x[i] = -1000.0f + 100.0f * i;
    const float mx = x[18];
    float sum = ek_exp_shift(x, 19, mx);
    CHECK(fabsf(sum - 1.0f) < 1e-5f && x[18] == 1.0f, "exp_shift of spread inputs: sum %g", sum);
    float y[40], z[40];
    for (int i = 0; i < 40; i++) y[i] = z[i] = -20.0f * frand() - 20.0f;
    ek_exp_shift(y, 40, 0.0f);
    for (int i = 0; i < 40; i++) CHECK(fabsf(y[i] - expf(z[i])) <= 1e-6f * expf(z[i]), "exp(%g) off", z[i]);
}

/* The vector exp (x <= 0) and SiLU of this build's SIMD path against double precision: relative
 * 1e-6 (the softmax bound above), absolute below exp's clamp at -87 where results are ~1e-38. */
static void test_exp_silu(void) {
    const char *path = "none";
    int n_checked = 0;
    for (int i = 0; i < 4000; i++) {
        float x[8];
        for (int k = 0; k < 8; k++) x[k] = i < 3000 ? -100.0f * (float)(i * 8 + k) / 24000.0f : 40.0f * frand();
        float e[8], si[8];
        int lanes = 0;
#if defined(EK_AVX2)
        path = "avx2";
        float xn[8];
        for (int k = 0; k < 8; k++) xn[k] = -fabsf(x[k]);
        _mm256_storeu_ps(e, ek_exp_neg256(_mm256_loadu_ps(xn)));
        lanes = 8;
        for (int k = 0; k < 8; k++) si[k] = NAN; /* the AVX2 SiLU is inline in model.c (Python forward tests) */
#elif defined(EK_NEON) && defined(__aarch64__)
        path = "neon";
        for (int h = 0; h < 2; h++) {
            const float32x4_t v = vld1q_f32(x + 4 * h);
            vst1q_f32(e + 4 * h, ek_exp_neg128(vnegq_f32(vabsq_f32(v))));
            vst1q_f32(si + 4 * h, ek_silu128(v));
        }
        lanes = 8;
#endif
        for (int k = 0; k < lanes; k++, n_checked++) {
            const double xe = -fabs((double)x[k]), ref_e = exp(xe);
            const double tol_e = xe < -87.0 ? 2e-38 : 1e-6 * ref_e;
            CHECK(fabs(e[k] - ref_e) <= tol_e, "%s exp(%g) = %g, expected %g", path, xe, e[k], ref_e);
            if (isnan(si[k])) continue;
            const double ref_s = x[k] / (1.0 + exp(-(double)x[k]));
            CHECK(fabs(si[k] - ref_s) <= 1e-6 * fabs(ref_s) + 1e-35, "%s silu(%g) = %g, expected %g", path, x[k], si[k],
                  ref_s);
        }
    }
    if (n_checked)
        printf("vector exp/silu: %s path, %d lanes checked\n", path, n_checked);
    else
        printf("vector exp/silu: no vector path in this build\n");
}

/* ek_logit_stats against double precision, the bound of tests/test_kernels.py with the sums split
 * into 8 lanes (NEON) as well as 16 (AVX2): (n / 8 + 2) * 2^-24 + 2e-7 relative on the sums. */
static void test_logit_stats(void) {
    const int ns[] = {1, 7, 16, 379, 4099};
    for (size_t ni = 0; ni < sizeof ns / sizeof *ns; ni++) {
        const int n = ns[ni];
        float *x = malloc(sizeof(float) * n);
        for (int row = 0; row < 4; row++) {
            const float scale = row == 0 ? 0.1f : row == 1 ? 3.0f : 30.0f;
            for (int i = 0; i < n; i++) x[i] = row == 3 ? (i == n / 2 ? 40.0f : -50.0f) : scale * frand();
            float mx, log_s, ent;
            CHECK(ek_logit_stats(x, 1, n, &mx, &log_s, &ent) == 0, "logit stats failed");
            double m = -INFINITY, s = 0, t = 0;
            for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
            for (int i = 0; i < n; i++) {
                const double z = x[i] - m, e = exp(z);
                s += e;
                t += e * z;
            }
            const double rel = (n / 8.0 + 2) * 5.960464477539063e-08 + 2e-7, ref_ent = log(s) - t / s;
            CHECK(mx == (float)m, "logit max n=%d row %d", n, row);
            CHECK(fabs(log_s - log(s)) <= 2 * rel + 1e-7, "logit log_s n=%d row %d: %g vs %g", n, row, log_s, log(s));
            CHECK(fabs(ent - ref_ent) <= 2 * rel * (1 + fabs(t / s)) + 1e-6, "logit entropy n=%d row %d: %g vs %g", n,
                  row, ent, ref_ent);
        }
        x[n - 1] = NAN;
        float mx, log_s, ent;
        CHECK(ek_logit_stats(x, 1, n, &mx, &log_s, &ent) == 0 && isnan(mx) && isnan(log_s) && isnan(ent),
              "a NaN logit (n=%d) must give NaN statistics", n);
        free(x);
    }
}

int main(void) {
    printf("edgekv C kernel tests (simd: %s)\n", ek_simd());
    test_fp16();
    test_act_quant();
    test_matmul();
    load_kv_bits();
    test_kv_records();
    test_kv_attention();
    test_softmax_exp();
    test_exp_silu();
    test_logit_stats();
    if (failures) {
        printf("%d check(s) failed\n", failures);
        return 1;
    }
    printf("all kernel checks passed\n");
    return 0;
}
