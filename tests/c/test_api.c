/* C API tests: every entry point refuses bad arguments with an error code and a message, and a
 * refused call changes nothing. Meant to run under AddressSanitizer/UBSan and qemu as well as
 * natively (tools/ci_native_checks.sh), where a bad pointer or an overflow would be caught. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgekv.h"
#include "edgekv_testing.h"

static int failures = 0, checks = 0;

#define CHECK(cond, ...)                                \
    do {                                                \
        checks++;                                       \
        if (!(cond)) {                                  \
            failures++;                                 \
            printf("FAIL %s:%d: ", __FILE__, __LINE__); \
            printf(__VA_ARGS__);                        \
            printf("\n");                               \
        }                                               \
    } while (0)

enum { T_F32 = 0, T_F16 = 1, T_Q8_0 = 8 };

static uint32_t rng = 12345u;
static float frand(void) {
    rng ^= rng << 13; rng ^= rng >> 17; rng ^= rng << 5;
    return (float)rng / 4294967296.0f - 0.5f;
}

static ek_config base_config(void) {
    ek_config c;
    memset(&c, 0, sizeof c);
    c.n_vocab = 50; c.n_embd = 64; c.n_layer = 2; c.n_head = 2; c.n_head_kv = 1; c.head_dim = 32;
    c.n_ff = 96; c.n_ctx = 24; c.rope_dim = 32; c.rope_neox = 0; c.rope_base = 10000.0f; c.norm_eps = 1e-5f;
    c.has_qkv_bias = 0; c.n_threads = 2; c.n_batch = 5;
    return c;
}

typedef struct {
    int kind, layer;
    int64_t n_in, n_out;
    float *data;
} tensor;

/* All tensors of base_config() as random F32 (norms near 1). */
static int make_tensors(const ek_config *c, tensor *t) {
    int n = 0;
    const int64_t q = (int64_t)c->n_head * c->head_dim, kv = (int64_t)c->n_head_kv * c->head_dim;
#define ADD(k, l, i, o)                                                                          \
    do {                                                                                         \
        t[n] = (tensor){k, l, i, o, (float *)malloc(sizeof(float) * (size_t)(i) * (size_t)(o))}; \
        for (int64_t j = 0; j < (int64_t)(i) * (o); j++)                                         \
            t[n].data[j] = (o) == 1 ? 1.0f + 0.1f * frand() : 0.3f * frand();                    \
        n++;                                                                                     \
    } while (0)
    ADD(EK_T_TOK_EMBD, -1, c->n_embd, c->n_vocab);
    ADD(EK_T_OUTPUT_NORM, -1, c->n_embd, 1);
    for (int l = 0; l < c->n_layer; l++) {
        ADD(EK_T_ATTN_NORM, l, c->n_embd, 1);
        ADD(EK_T_ATTN_Q, l, c->n_embd, q);
        ADD(EK_T_ATTN_K, l, c->n_embd, kv);
        ADD(EK_T_ATTN_V, l, c->n_embd, kv);
        ADD(EK_T_ATTN_O, l, q, c->n_embd);
        ADD(EK_T_FFN_NORM, l, c->n_embd, 1);
        ADD(EK_T_FFN_GATE, l, c->n_embd, c->n_ff);
        ADD(EK_T_FFN_UP, l, c->n_embd, c->n_ff);
        ADD(EK_T_FFN_DOWN, l, c->n_ff, c->n_embd);
    }
#undef ADD
    return n;
}

static int set(ek_model *m, const tensor *t) {
    return ek_model_set_tensor(m, t->kind, t->layer, T_F32, t->data, t->n_in, t->n_out,
                               sizeof(float) * (size_t)t->n_in * (size_t)t->n_out);
}

static void test_create(void) {
    char err[256];
    /* each invalid config: NULL and a message */
    for (int i = 0; i < 16; i++) {
        ek_config c = base_config();
        switch (i) {
        case 0: c.n_vocab = 0; break;
        case 1: c.n_embd = -1; break;
        case 2: c.n_layer = 0; break;
        case 3: c.n_head_kv = 3; break;            /* n_head % n_head_kv */
        case 4: c.head_dim = 12; break;            /* not a multiple of 8 */
        case 5: c.head_dim = 2048; break;
        case 6: c.rope_dim = 31; break;
        case 7: c.rope_dim = 64; break;            /* > head_dim */
        case 8: c.n_ctx = 0; break;
        case 9: c.n_ctx = (1 << 22) + 1; break;
        case 10: c.n_threads = 0; break;
        case 11: c.n_threads = 257; break;
        case 12: c.n_batch = 0; break;
        case 13: c.n_batch = 8193; break;
        case 14: c.norm_eps = 0.0f; break;
        case 15: c.rope_base = NAN; break;
        }
        err[0] = 0;
        ek_model *m = ek_model_create(&c, err, sizeof err);
        CHECK(m == NULL && err[0] != 0, "bad config %d accepted (or no message)", i);
        ek_model_free(m);
        c = base_config();
        c.n_vocab = 0;
        CHECK(ek_model_create(&c, NULL, 0) == NULL, "bad config without an error buffer");
    }
    ek_model_free(NULL); /* a no-op */
}

static void test_tensors_and_forward(void) {
    ek_config c = base_config();
    char err[256] = "";
    ek_model *m = ek_model_create(&c, err, sizeof err);
    CHECK(m != NULL, "create: %s", err);
    if (!m) return;
    tensor t[64];
    const int nt = make_tensors(&c, t);
    float dummy[4096] = {0};
    int32_t tok[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    float *logits = (float *)malloc(sizeof(float) * (size_t)c.n_vocab * 32);

    /* refused tensors */
    CHECK(ek_model_set_tensor(m, -1, -1, T_F32, dummy, 64, 1, 256) == EK_ERR_INVALID, "kind -1");
    CHECK(ek_model_set_tensor(m, EK_T_COUNT, 0, T_F32, dummy, 64, 1, 256) == EK_ERR_INVALID, "kind COUNT");
    CHECK(ek_model_set_tensor(m, EK_T_ATTN_NORM, -1, T_F32, dummy, 64, 1, 256) == EK_ERR_INVALID, "layer -1");
    CHECK(ek_model_set_tensor(m, EK_T_ATTN_NORM, 2, T_F32, dummy, 64, 1, 256) == EK_ERR_INVALID, "layer 2");
    CHECK(ek_model_set_tensor(m, EK_T_ATTN_NORM, 0, T_F32, NULL, 64, 1, 256) == EK_ERR_INVALID, "NULL data");
    CHECK(ek_model_set_tensor(m, EK_T_ATTN_NORM, 0, T_F32, dummy, 32, 1, 128) == EK_ERR_INVALID, "wrong shape");
    CHECK(ek_model_set_tensor(m, EK_T_ATTN_NORM, 0, T_F16, dummy, 64, 1, 128) == EK_ERR_INVALID, "F16 norm");
    CHECK(ek_model_set_tensor(m, EK_T_ATTN_Q, 0, 99, dummy, 64, 64, 4096) == EK_ERR_INVALID, "type 99");
    CHECK(ek_model_set_tensor(m, EK_T_ATTN_Q, 0, 12, dummy, 64, 64, 4096) == EK_ERR_INVALID, "Q4_K (not native)");
    CHECK(ek_model_set_tensor(m, EK_T_ATTN_Q, 0, T_F32, dummy, 64, 64, 4096) == EK_ERR_INVALID, "wrong n_bytes");
    CHECK(ek_model_set_tensor(m, EK_T_ATTN_Q, 0, T_Q8_0, dummy, 64, 64, 4095) == EK_ERR_INVALID, "Q8_0 bytes");
    CHECK(strlen(ek_model_error(m)) > 0, "no error message");
    CHECK(ek_model_finalize(m) == EK_ERR_INVALID, "finalize with nothing set");
    CHECK(ek_forward(m, tok, 1, EK_LOGITS_LAST, logits) == EK_ERR_INVALID, "forward before finalize");

    for (int i = 0; i < nt; i++) CHECK(set(m, &t[i]) == EK_OK, "set tensor %d: %s", i, ek_model_error(m));
    float bias[64] = {0};
    CHECK(ek_model_set_tensor(m, EK_T_ATTN_Q_BIAS, 0, T_F32, bias, 64, 1, 256) == EK_OK, "bias accepted by set");
    CHECK(ek_model_finalize(m) == EK_ERR_INVALID, "a llama config with one Q bias must not finalize");
    ek_model_free(m);

    /* a complete model */
    m = ek_model_create(&c, err, sizeof err);
    for (int i = 0; i < nt; i++) set(m, &t[i]);
    CHECK(ek_model_finalize(m) == EK_OK, "finalize: %s", ek_model_error(m));
    CHECK(set(m, &t[0]) == EK_ERR_INVALID, "set after finalize");

    /* refused forwards change nothing */
    CHECK(ek_forward(m, tok, 0, EK_LOGITS_LAST, logits) == EK_ERR_INVALID, "n = 0");
    CHECK(ek_forward(m, NULL, 1, EK_LOGITS_LAST, logits) == EK_ERR_INVALID, "NULL tokens");
    CHECK(ek_forward(m, tok, 1, 3, logits) == EK_ERR_INVALID, "logits mode 3");
    CHECK(ek_forward(m, tok, 1, EK_LOGITS_LAST, NULL) == EK_ERR_INVALID, "NULL logits");
    int32_t bad_tok[2] = {1, 50};
    CHECK(ek_forward(m, bad_tok, 2, EK_LOGITS_LAST, logits) == EK_ERR_TOKEN, "token = n_vocab");
    bad_tok[1] = -1;
    CHECK(ek_forward(m, bad_tok, 2, EK_LOGITS_LAST, logits) == EK_ERR_TOKEN, "token -1");
    CHECK(ek_n_past(m) == 0, "a refused forward moved n_past to %d", ek_n_past(m));

    /* batched prefill (chunks of n_batch = 5) == one token at a time */
    float *all = (float *)malloc(sizeof(float) * (size_t)c.n_vocab * 8);
    CHECK(ek_forward(m, tok, 8, EK_LOGITS_ALL, all) == EK_OK, "prefill: %s", ek_model_error(m));
    CHECK(ek_truncate(m, 0) == EK_OK, "truncate 0");
    double max_diff = 0;
    for (int i = 0; i < 8; i++) {
        CHECK(ek_forward(m, &tok[i], 1, EK_LOGITS_LAST, logits) == EK_OK, "decode %d", i);
        for (int v = 0; v < c.n_vocab; v++) {
            const double d = fabs((double)logits[v] - all[i * c.n_vocab + v]);
            if (d > max_diff) max_diff = d;
        }
    }
    CHECK(max_diff < 1e-3, "prefill vs decode logits differ by %g", max_diff);
    CHECK(ek_n_past(m) == 8, "n_past %d", ek_n_past(m));

    /* context limits */
    int32_t many[32] = {0};
    CHECK(ek_forward(m, many, 17, EK_LOGITS_NONE, NULL) == EK_ERR_CONTEXT, "8 + 17 > n_ctx 24");
    CHECK(ek_n_past(m) == 8, "a refused overflow moved n_past");
    CHECK(ek_forward(m, many, 16, EK_LOGITS_NONE, NULL) == EK_OK, "exactly full");
    CHECK(ek_forward(m, many, 1, EK_LOGITS_LAST, logits) == EK_ERR_CONTEXT, "one past full");
    CHECK(ek_truncate(m, -1) == EK_ERR_INVALID && ek_truncate(m, 25) == EK_ERR_INVALID, "truncate bounds");
    CHECK(ek_truncate(m, 6) == EK_OK && ek_n_past(m) == 6, "truncate to 6");

    /* KV precision */
    int32_t pos[2] = {0, 6}, kb[2] = {4, 4}, vb[2] = {2, 2};
    CHECK(ek_kv_set_bits(m, pos, kb, vb, 2) == EK_ERR_INVALID, "position 6 is not cached");
    pos[1] = 5; kb[1] = 5;
    CHECK(ek_kv_set_bits(m, pos, kb, vb, 2) == EK_ERR_INVALID, "5 bits");
    int32_t gk[24], gv[24];
    ek_kv_get_bits(m, gk, gv);
    CHECK(gk[0] == 16 && gv[0] == 16, "a refused set_bits changed position 0");
    kb[1] = 8;
    CHECK(ek_kv_set_bits(m, pos, kb, vb, 2) == EK_OK, "set bits: %s", ek_model_error(m));
    ek_kv_get_bits(m, gk, gv);
    CHECK(gk[0] == 4 && gv[0] == 2 && gk[5] == 8 && gv[5] == 2, "bits read back");
    CHECK(ek_kv_configure(m, 32, 32, 32, 1) == EK_ERR_INVALID, "configure with a non-empty context");
    float kbuf[64], vbuf[64];
    CHECK(ek_kv_read(m, 2, 0, kbuf, vbuf) == EK_ERR_INVALID && ek_kv_read(m, 0, 6, kbuf, vbuf) == EK_ERR_INVALID &&
          ek_kv_read(m, -1, 0, kbuf, vbuf) == EK_ERR_INVALID, "kv_read bounds");
    CHECK(ek_kv_read(m, 1, 5, kbuf, vbuf) == EK_OK, "kv_read");
    CHECK(ek_forward(m, tok, 3, EK_LOGITS_LAST, logits) == EK_OK, "forward over a mixed cache");
    CHECK(ek_truncate(m, 0) == EK_OK, "truncate to 0");
    CHECK(ek_kv_configure(m, 48, 32, 32, 0) == EK_ERR_INVALID, "group 48 does not divide 32");
    CHECK(ek_kv_configure(m, 32, 16, 32, 0) == EK_ERR_INVALID, "group 16");
    CHECK(ek_kv_configure(m, 32, 32, 32, 8) == EK_ERR_INVALID, "unknown layout flag 8");
    CHECK(ek_kv_configure(m, 32, 32, 32, EK_KV_ROTATE | EK_KV_FIT_GRID) == EK_OK && ek_kv_fitting(m) && ek_kv_rotating(m),
          "configure with a fitted grid: %s", ek_model_error(m));
    CHECK(ek_kv_configure(m, 32, 32, 32, 1) == EK_OK && !ek_kv_fitting(m), "configure: %s", ek_model_error(m));
    CHECK(ek_bench_fill_kv(m, 25, 4, 4, 1) == EK_ERR_INVALID, "bench fill past n_ctx");
    CHECK(ek_bench_attention(m, 1) < 0, "bench attention on an empty context");

    free(all);
    free(logits);
    ek_model_free(m);
    for (int i = 0; i < nt; i++) free(t[i].data);
}

/* Sequences: each has its own cache; a batch step gives each what it gets alone, and refuses bad
 * input without touching any sequence. Not vectorized: Debian's aarch64 gcc 12 crashes (internal
 * compiler error in vect_transform_reduction) on this function at -O3. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
static void test_sequences(void) {
    ek_config c = base_config();
    char err[256] = "";
    ek_model *m = ek_model_create(&c, err, sizeof err);
    CHECK(m != NULL, "create: %s", err);
    if (!m) return;
    tensor t[64];
    const int nt = make_tensors(&c, t);
    for (int i = 0; i < nt; i++) set(m, &t[i]);
    CHECK(ek_model_finalize(m) == EK_OK, "finalize: %s", ek_model_error(m));
    CHECK(ek_model_seq(m) != NULL && ek_seq_n_past(ek_model_seq(m)) == 0, "default sequence");
    const int V = c.n_vocab;
    int32_t prompt[3][7] = {{1, 2, 3, 4, 5, 6, 7}, {9, 8}, {4}}; /* 7 + 2 + 1 rows: two passes of n_batch 5 */
    const int plen[3] = {7, 2, 1};
    float *alone = (float *)malloc(sizeof(float) * (size_t)V * 6), *got = (float *)malloc(sizeof(float) * (size_t)V * 3);
    /* alone: prompt then token 11, on the default sequence */
    for (int i = 0; i < 3; i++) {
        ek_truncate(m, 0);
        CHECK(ek_forward(m, prompt[i], plen[i], EK_LOGITS_LAST, alone + (size_t)(2 * i) * V) == EK_OK, "alone %d", i);
        int32_t x = 11;
        CHECK(ek_forward(m, &x, 1, EK_LOGITS_LAST, alone + (size_t)(2 * i + 1) * V) == EK_OK, "alone decode %d", i);
    }
    ek_seq *s[3];
    for (int i = 0; i < 3; i++) s[i] = ek_seq_create(m);
    CHECK(s[0] && s[1] && s[2] && s[0] != ek_model_seq(m), "ek_seq_create");
    int32_t toks[10], counts[3] = {7, 2, 1};
    for (int i = 0, k = 0; i < 3; i++)
        for (int j = 0; j < plen[i]; j++) toks[k++] = prompt[i][j];
    CHECK(ek_forward_batch(m, s, 3, toks, counts, got) == EK_OK, "batch prefill: %s", ek_model_error(m));
    double max_diff = 0;
    for (int i = 0; i < 3; i++)
        for (int v = 0; v < V; v++) max_diff = fmax(max_diff, fabs((double)got[i * V + v] - alone[(2 * i) * V + v]));
    int32_t dec[3] = {11, 11, 11}, ones[3] = {1, 1, 1};
    CHECK(ek_forward_batch(m, s, 3, dec, ones, got) == EK_OK, "batch decode: %s", ek_model_error(m));
    for (int i = 0; i < 3; i++)
        for (int v = 0; v < V; v++) max_diff = fmax(max_diff, fabs((double)got[i * V + v] - alone[(2 * i + 1) * V + v]));
    CHECK(max_diff < 1e-4, "batch vs alone logits differ by %g", max_diff);
    CHECK(ek_seq_n_past(s[0]) == 8 && ek_seq_n_past(s[1]) == 3 && ek_seq_n_past(s[2]) == 2, "n_past after the batch");
    CHECK(ek_seq_kv_bytes_used(s[0]) == 8 * ek_kv_bytes_per_token(m), "kv bytes of a sequence");

    /* refused batches change nothing */
    ek_seq *dup[2] = {s[0], s[0]}, *with_null[2] = {s[0], NULL};
    int32_t bad_counts[3] = {1, 0, 1}, bad_tok[3] = {1, 50, 1}, big[3] = {1, 1, 30};
    CHECK(ek_forward_batch(m, dup, 2, dec, ones, got) == EK_ERR_INVALID, "the same sequence twice");
    CHECK(ek_forward_batch(m, with_null, 2, dec, ones, got) == EK_ERR_INVALID, "a NULL sequence");
    CHECK(ek_forward_batch(m, s, 0, dec, ones, got) == EK_ERR_INVALID, "no sequences");
    CHECK(ek_forward_batch(m, s, 3, dec, bad_counts, got) == EK_ERR_INVALID, "count 0");
    CHECK(ek_forward_batch(m, s, 3, bad_tok, ones, got) == EK_ERR_TOKEN, "token = n_vocab");
    int32_t many[32] = {0};
    CHECK(ek_forward_batch(m, s, 3, many, big, got) == EK_ERR_CONTEXT, "2 + 30 > n_ctx");
    CHECK(strlen(ek_model_error(m)) > 0, "no error message");
    ek_config c2 = base_config();
    ek_model *m2 = ek_model_create(&c2, err, sizeof err);
    ek_seq *foreign[1] = {m2 ? ek_model_seq(m2) : NULL};
    CHECK(ek_forward_batch(m, foreign, 1, dec, ones, got) == EK_ERR_INVALID, "a sequence of another model");
    ek_model_free(m2);
    CHECK(ek_seq_n_past(s[0]) == 8 && ek_seq_n_past(s[1]) == 3 && ek_seq_n_past(s[2]) == 2, "a refused batch moved n_past");

    /* per-sequence KV calls */
    int32_t pos[1] = {0}, kb[1] = {4}, vb[1] = {2}, gk[24], gv[24];
    CHECK(ek_seq_kv_set_layer_bits(s[1], -1, pos, kb, vb, 1) == EK_OK, "seq set bits: %s", ek_model_error(m));
    CHECK(ek_seq_kv_get_layer_bits(s[1], 0, gk, gv) == EK_OK && gk[0] == 4 && gv[0] == 2, "seq bits read back");
    CHECK(ek_seq_kv_get_layer_bits(s[0], 0, gk, gv) == EK_OK && gk[0] == 16, "another sequence's bits changed");
    CHECK(ek_seq_kv_configure(s[2], 32, 32, 32, 0) == EK_ERR_INVALID, "configure a non-empty sequence");
    CHECK(ek_truncate_seq(s[2], 3) == EK_ERR_INVALID && ek_truncate_seq(s[2], 0) == EK_OK, "truncate a sequence");
    CHECK(ek_seq_kv_bytes_used(s[2]) == 0 && ek_seq_n_past(s[0]) == 8, "truncate one sequence");
    for (int i = 0; i < 3; i++) ek_seq_free(s[i]);
    ek_seq_free(NULL); /* a no-op */
    free(alone);
    free(got);
    ek_model_free(m);
    for (int i = 0; i < nt; i++) free(t[i].data);
}

static void test_kernel_entries(void) {
    float x[64] = {0}, y[64], out[64];
    unsigned char w[4096] = {0};
    CHECK(ek_matmul(99, w, 32, 1, x, 1, out, 1) == EK_ERR_INVALID, "matmul type 99");
    CHECK(ek_matmul(T_Q8_0, w, 33, 1, x, 1, out, 1) == EK_ERR_INVALID, "matmul n_in 33 (Q8_0)");
    CHECK(ek_matmul(T_F32, NULL, 32, 1, x, 1, out, 1) == EK_ERR_INVALID, "matmul NULL weights");
    CHECK(ek_matmul(T_F32, w, 32, 0, x, 1, out, 1) == EK_ERR_INVALID, "matmul n_out 0");
    CHECK(ek_matmul(T_F32, w, 32, 1, x, 0, out, 1) == EK_ERR_INVALID, "matmul n_tok 0");
    CHECK(ek_type_row_bytes(T_Q8_0, 33) == 0 && ek_type_row_bytes(99, 32) == 0, "row bytes of bad input");
    CHECK(ek_kv_quant_roundtrip(5, x, 32, 32, y, 1) == EK_ERR_INVALID, "roundtrip 5 bits");
    CHECK(ek_kv_quant_roundtrip(3, x, 32, 32, y, 1) == EK_OK, "roundtrip 3 bits");
    CHECK(ek_kv_quant_roundtrip(3, x, 32, 32, y, 4) == EK_ERR_INVALID, "roundtrip impl flag 4");
    CHECK(ek_kv_quant_roundtrip(4, x, 48, 32, y, 1) == EK_ERR_INVALID, "roundtrip n 48");
    CHECK(ek_kv_quant_roundtrip(4, x, 2048, 32, y, 1) == EK_ERR_INVALID, "roundtrip n 2048");
    CHECK(ek_kv_quant_roundtrip(4, x, 64, 16, y, 1) == EK_ERR_INVALID, "roundtrip group 16");
    int32_t bits[2] = {4, 4}, bad[2] = {4, 5};
    CHECK(ek_kv_attention_test(x, 1, x, x, bits, bits, 0, 32, 32, 0, out, NULL, NULL, NULL) == EK_ERR_INVALID, "n_pos 0");
    CHECK(ek_kv_attention_test(x, 1, x, x, bits, bits, 1, 40, 32, 0, out, NULL, NULL, NULL) == EK_ERR_INVALID, "hd 40");
    CHECK(ek_kv_attention_test(x, 1, x, x, bad, bits, 2, 32, 32, 0, out, NULL, NULL, NULL) == EK_ERR_INVALID, "5 bits");
    CHECK(ek_bench_read_bandwidth(16, 1, 1) < 0, "bandwidth of a buffer too small");
}

int main(void) {
    printf("edgekv C API tests (simd: %s, ABI %d)\n", ek_simd(), ek_abi_version());
    test_create();
    test_tensors_and_forward();
    test_sequences();
    test_kernel_entries();
    if (failures) {
        printf("%d of %d API checks FAILED\n", failures, checks);
        return 1;
    }
    printf("all %d API checks passed\n", checks);
    return 0;
}
