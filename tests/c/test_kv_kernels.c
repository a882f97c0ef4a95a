/* The KV attention kernels of the precisions' rows (csrc/kv_types.c) called directly, against the
 * plain-C reference (the row's dequant_ref, then the dot product or weighted sum in double), with
 * an explicit bound. NEON builds (aarch64: run under qemu as Cortex-A72, A53 and A76 by
 * tools/ci_native_checks.sh): every row must have a NEON score and value kernel, and each passes
 * here over head sizes, groups, query heads per KV head and partial tiles. Other builds have no NEON
 * kernels and say so; their kernels are tested through the attention (test_kernels.c, test_kv.py).
 *
 * The bound: a kernel's float rounding, |got - ref| <= 1e-5 * sum_i |a_i| * (|y_i| + 2 |m_i|), with
 * a_i the query (scores) or weight (values) that multiplies value y_i and m_i its group's minimum
 * (the kernels may split y = d * code + m and round the two parts apart; |d * code| <= |y| + |m|).
 * 1e-5 is about 170 float roundings (2^-24 each) of that sum: the longest chain here is 64 records
 * or 64 lanes' steps, plus a few for the epilogue. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgekv.h"
#include "kv_attention.h"
#include "kv_types.h"

static int failures = 0, cases = 0;

#define CHECK(cond, ...)                                                                                             \
    do {                                                                                                             \
        if (!(cond)) {                                                                                               \
            if (++failures <= 30) {                                                                                  \
                printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                          \
                printf(__VA_ARGS__);                                                                                 \
                printf("\n");                                                                                        \
            }                                                                                                        \
        }                                                                                                            \
    } while (0)

static uint64_t rng_state = 0x2545F4914F6CDD1Dull;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 32);
}
static float frand(void) { return (float)rnd() / 4294967296.0f * 2.0f - 1.0f; } /* [-1, 1) */

#if defined(EK_NEON_KV)
#define MAXN ATTN_CHUNK
#define MAXHD 256
#define GUARD 16
static const float SENTINEL = 12345.0f;

/* n records of precision p (head dim hd, groups of g) stride bytes apart, from random data with a
 * channel offset; y: each record read back by the reference, mins: each value's group minimum */
static void make_records(const ek_kv_type *t, uint8_t *base, size_t stride, int n, int hd, int g, float *y,
                         float *mins) {
    float x[MAXHD];
    for (int j = 0; j < n; j++) {
        const float amp = 0.1f + 3.0f * (float)(rnd() % 1000) / 1000.0f;
        for (int i = 0; i < hd; i++) x[i] = amp * frand() + (i % 17 == 3 ? 4.0f : 0.0f);
        uint8_t *r = base + (size_t)j * stride;
        t->quantize(x, r, hd, g, (int)(rnd() & 1));
        t->dequant_ref(r, y + (size_t)j * hd, hd, g);
        for (int i = 0; i < hd; i++) {
            float m = 0.0f;
            if (t->bits < 16) {
                ek_fp16 h;
                memcpy(&h, r + (size_t)hd * t->bits / 8 + 2 * (size_t)(hd / g + i / g), sizeof h);
                m = ek_fp16_to_fp32(h);
            }
            mins[(size_t)j * hd + i] = m;
        }
    }
}

static void test_scores(const ek_kv_type *t, int hd, int g, int gs, int n) {
    const int int8 = t->qorder != EK_QORDER_NONE;
    const size_t kb = t->record_bytes(hd, g), stride = kb + 13; /* odd: records at unaligned addresses */
    uint8_t *base = malloc(stride * MAXN);
    float *y = malloc(sizeof(float) * MAXN * MAXHD), *mins = malloc(sizeof(float) * MAXN * MAXHD);
    float q[QI_MAX_GS * MAXHD], qr[QI_MAX_GS * MAXHD], sc[QI_MAX_GS * ATTN_CHUNK + GUARD];
    make_records(t, base, stride, n, hd, g, y, mins);
    for (int i = 0; i < gs * hd; i++) q[i] = frand() * (i % 29 == 0 ? 3.0f : 0.3f);
    ek_neon_query qn;
    CHECK(ek_neon_query_prepare(&qn, q, gs, hd, g, int8) == 0, "%d-bit: query prepare failed", t->bits);
    if (int8) { /* the kernels' int8 query is ek_attn_query_i8's, exactly */
        CHECK(ek_attn_query_rounded(q, gs, hd, qr) == 0, "query rounding failed");
        for (int h = 0; h < gs; h++) {
            int8_t q8[MAXHD];
            float s;
            CHECK(ek_attn_query_i8(q + (size_t)h * hd, hd, q8, &s) == 0, "ek_attn_query_i8 failed");
            CHECK(s == qn.scale[h] && memcmp(q8, qn.q8[h], (size_t)hd) == 0,
                  "%d-bit hd=%d head %d: NEON int8 query differs from ek_attn_query_i8", t->bits, hd, h);
            for (int k = 0; k < hd / g; k++) {
                double qs = 0;
                for (int i = k * g; i < (k + 1) * g; i++) qs += q8[i];
                CHECK(qn.qsum[h][k] == qs, "%d-bit hd=%d g=%d head %d group %d: query sum %g != %g", t->bits, hd, g,
                      h, k, qn.qsum[h][k], qs);
            }
        }
    } else
        memcpy(qr, q, sizeof(float) * gs * hd);
    for (int i = 0; i < QI_MAX_GS * ATTN_CHUNK + GUARD; i++) sc[i] = SENTINEL;
    t->score_neon(&qn, base, stride, n, hd, g, gs, sc);
    for (int h = 0; h < gs; h++)
        for (int j = 0; j < n; j++) {
            double ref = 0, mag = 0;
            for (int i = 0; i < hd; i++) {
                const double a = qr[(size_t)h * hd + i], v = y[(size_t)j * hd + i], m = mins[(size_t)j * hd + i];
                ref += a * v;
                mag += fabs(a) * (fabs(v) + 2 * fabs(m));
            }
            const double got = sc[(size_t)h * ATTN_CHUNK + j], err = fabs(got - ref), bound = 1e-5 * mag + 1e-30;
            CHECK(err <= bound, "score %d-bit hd=%d g=%d gs=%d n=%d head %d record %d: %.9g vs %.9g (err %.3g > %.3g)",
                  t->bits, hd, g, gs, n, h, j, got, ref, err, bound);
        }
    for (int i = (gs - 1) * ATTN_CHUNK + ATTN_CHUNK; i < QI_MAX_GS * ATTN_CHUNK + GUARD; i++)
        CHECK(sc[i] == SENTINEL, "score %d-bit hd=%d gs=%d: wrote past the scores at %d", t->bits, hd, gs, i);
    if (int8) { /* a non-finite query is refused (the attention then scores in float, as every build) */
        q[hd / 2] = NAN;
        CHECK(ek_neon_query_prepare(&qn, q, gs, hd, g, 1) == -1, "NaN query accepted for int8 keys");
        q[hd / 2] = INFINITY;
        CHECK(ek_neon_query_prepare(&qn, q, gs, hd, g, 1) == -1, "inf query accepted for int8 keys");
    }
    cases++;
    free(base);
    free(y);
    free(mins);
}

static void test_values(const ek_kv_type *t, int hd, int g, int gs, int n) {
    const size_t vb = t->record_bytes(hd, g), stride = vb + 7;
    uint8_t *base = malloc(stride * MAXN);
    float *y = malloc(sizeof(float) * MAXN * MAXHD), *mins = malloc(sizeof(float) * MAXN * MAXHD);
    float w[QI_MAX_GS * ATTN_CHUNK], o[QI_MAX_GS * MAXHD + GUARD], o0[QI_MAX_GS * MAXHD];
    make_records(t, base, stride, n, hd, g, y, mins);
    for (int i = 0; i < gs * ATTN_CHUNK; i++) w[i] = (rnd() % 5 == 0) ? 0.0f : 0.5f * (frand() + 1.0f); /* [0, 1) */
    for (int i = 0; i < gs * hd; i++) o0[i] = o[i] = frand();
    for (int i = gs * hd; i < QI_MAX_GS * MAXHD + GUARD; i++) o[i] = SENTINEL;
    t->values_neon(base, stride, n, hd, g, w, gs, o);
    for (int h = 0; h < gs; h++)
        for (int i = 0; i < hd; i++) {
            double ref = o0[(size_t)h * hd + i], mag = fabs(ref);
            for (int j = 0; j < n; j++) {
                const double a = w[(size_t)h * ATTN_CHUNK + j], v = y[(size_t)j * hd + i], m = mins[(size_t)j * hd + i];
                ref += a * v;
                mag += fabs(a) * (fabs(v) + 2 * fabs(m));
            }
            const double got = o[(size_t)h * hd + i], err = fabs(got - ref), bound = 1e-5 * mag + 1e-30;
            CHECK(err <= bound, "values %d-bit hd=%d g=%d gs=%d n=%d head %d value %d: %.9g vs %.9g (err %.3g > %.3g)",
                  t->bits, hd, g, gs, n, h, i, got, ref, err, bound);
        }
    for (int i = gs * hd; i < QI_MAX_GS * MAXHD + GUARD; i++)
        CHECK(o[i] == SENTINEL, "values %d-bit hd=%d gs=%d: wrote past the output at %d", t->bits, hd, gs, i);
    cases++;
    free(base);
    free(y);
    free(mins);
}

static void test_neon_kernels(void) {
    static const int hds[] = {8, 24, 32, 64, 96, 128, 256}, gss[] = {1, 2, 3, 5, 8}, ns[] = {7, ATTN_CHUNK};
    for (int p = 0; p < KVP_COUNT; p++) {
        const ek_kv_type *t = ek_kv_prec(p);
        /* the NEON rows are complete: a NULL here would send this precision back to read-then-float */
        CHECK(t->score_neon != NULL, "%d-bit row has no NEON score kernel", t->bits);
        CHECK(t->values_neon != NULL, "%d-bit row has no NEON value kernel", t->bits);
        if (!t->score_neon || !t->values_neon) continue;
        for (size_t a = 0; a < sizeof hds / sizeof *hds; a++) {
            const int hd = hds[a];
            if (t->bits < 16 && hd % 32) continue; /* quantized records: chunks of 32 values */
            for (int g = 32; g <= hd || (t->bits == 16 && g == 32); g += 32) {
                const int gg = t->bits == 16 ? hd : g; /* 16-bit: one group; else each multiple of 32 dividing hd */
                if (hd % gg) continue;
                for (size_t b = 0; b < sizeof gss / sizeof *gss; b++)
                    for (size_t c = 0; c < sizeof ns / sizeof *ns; c++) {
                        const int gs = gss[b], n = ns[c];
                        CHECK(ek_neon_keys_ok(hd, gs) && ek_neon_values_ok(hd, gs), "hd=%d gs=%d refused", hd, gs);
                        /* int8 rows: the shapes the attention scores with integers (ek_attn_int_keys) */
                        if (t->qorder == EK_QORDER_NONE || ek_attn_int_keys(p, hd, gs)) test_scores(t, hd, gg, gs, n);
                        test_values(t, hd, gg, gs, n);
                    }
                if (t->bits == 16) break;
            }
        }
    }
    CHECK(!ek_neon_keys_ok(64, QI_MAX_GS + 1) && !ek_neon_values_ok(64, QI_MAX_GS + 1), "gs > %d accepted", QI_MAX_GS);
    CHECK(!ek_neon_keys_ok(12, 1) && !ek_neon_values_ok(12, 1), "head_dim 12 accepted");
}
#endif

int main(void) {
    printf("edgekv KV kernel tests (simd: %s)\n", ek_simd());
#if defined(EK_NEON_KV)
    test_neon_kernels();
    printf("NEON KV kernels: %d kernel calls against the reference (rows f16, q8, q6, q4, q3, q2)\n", cases);
#else
    printf("this build has no NEON KV kernels (its AVX2/AVX-512 rows are tested through the attention: "
           "test_kernels, tests/test_kv.py)\n");
#endif
    if (failures) {
        printf("%d check(s) failed\n", failures);
        return 1;
    }
    printf("all KV kernel checks passed\n");
    return 0;
}
