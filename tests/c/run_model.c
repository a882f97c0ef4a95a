/* run_model: greedy decoding through the public C API, from a model dump, with no Python.
 *
 * The dump is written by tools/dump_model.py from a GGUF file (through edgekv's own loader,
 * so the C core receives exactly the tensors Python would hand it). This driver exists so that
 * the same end-to-end run can happen where Python cannot: on aarch64 under qemu-user, under
 * valgrind, and under AddressSanitizer without an interpreter's noise.
 *
 *   run_model MODEL.ekd [--steps N] [--ctx N] [--threads N] [--batch N]
 *                       [--kv K V] [--kv-window W] [--stop-at-eot] [--rewind] [--margins]
 *                       [--force ID,ID,...]
 *
 * Prints one line "tokens: t0 t1 ..." (the greedily chosen ids, the first one from the prompt's
 * prefill, each later one from a one-token decode step), and with --margins a line
 * "margins: m0 m1 ..." (top-1 minus top-2 logit at each step, to tell a real divergence between
 * two machines from a near tie). --kv K V stores every token at K/V bits once it is W steps old
 * (as edgekv's StaticPolicy does); --rewind truncates back to the prompt afterwards, decodes again
 * and fails unless the same tokens come out. --force feeds the given ids instead of the driver's own
 * choices (teacher forcing: "tokens:" still reports what the driver would have chosen at each step),
 * so two machines can be compared step by step even where a near tie made their free runs part.
 * Exit status 0 on success, 1 on any C API error.
 *
 * Dump format (little-endian), see tools/dump_model.py:
 *   "EKDUMP02" | 19 x int32 config | 5 x float32 | int32 n_tensors, n_prompt, n_eot
 *   | n_tensors x {int32 kind, layer, type, pad; int64 n_in, n_out, n_bytes, offset}
 *   | n_prompt x int32 | n_eot x int32 | tensor data at the given offsets (64-byte aligned)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgekv.h"

#define MAGIC "EKDUMP02"

typedef struct {
    int32_t kind, layer, type, pad;
    int64_t n_in, n_out, n_bytes, offset;
} tensor_rec;

typedef struct {
    unsigned char *buf; /* the whole file, 64-byte aligned */
    size_t size;
    ek_config cfg;
    int kv_groups[3], kv_flags; /* ek_kv_configure's flags */
    int n_tensors, n_prompt, n_eot;
    const tensor_rec *tensors;
    const int32_t *prompt, *eot;
} dump;

static int die(const char *what, const char *msg) {
    fprintf(stderr, "run_model: %s: %s\n", what, msg);
    return 1;
}

static int read_dump(const char *path, dump *d) {
    memset(d, 0, sizeof *d);
    FILE *f = fopen(path, "rb");
    if (!f) return die(path, "cannot open");
    if (fseek(f, 0, SEEK_END) != 0) { fclose(f); return die(path, "cannot seek"); }
    long len = ftell(f);
    rewind(f);
    if (len < 8 + 24 * 4 + 3 * 4) { fclose(f); return die(path, "too short for a dump header"); }
    d->size = (size_t)len;
    d->buf = (unsigned char *)aligned_alloc(64, (d->size + 63) / 64 * 64);
    if (!d->buf) { fclose(f); return die(path, "out of memory"); }
    size_t got = fread(d->buf, 1, d->size, f);
    fclose(f);
    if (got != d->size) return die(path, "short read");
    if (memcmp(d->buf, MAGIC, 8) != 0) return die(path, "not an edgekv model dump (bad magic)");
    const unsigned char *p = d->buf + 8;
    int32_t iv[19];
    float fv[5];
    int32_t counts[3];
    memcpy(iv, p, sizeof iv); p += sizeof iv;
    memcpy(fv, p, sizeof fv); p += sizeof fv;
    memcpy(counts, p, sizeof counts); p += sizeof counts;
    ek_config *c = &d->cfg;
    c->n_vocab = iv[0]; c->n_embd = iv[1]; c->n_layer = iv[2]; c->n_head = iv[3]; c->n_head_kv = iv[4];
    c->head_dim = iv[5]; c->n_ff = iv[6]; c->rope_dim = iv[7]; c->rope_neox = iv[8]; c->has_qkv_bias = iv[9];
    d->kv_groups[0] = iv[10]; d->kv_groups[1] = iv[11]; d->kv_groups[2] = iv[12]; d->kv_flags = iv[13];
    c->has_qk_norm = iv[14]; c->ffn_geglu = iv[15]; c->has_post_norms = iv[16]; c->swa_window = iv[17];
    c->swa_period = iv[18];
    c->rope_base = fv[0]; c->norm_eps = fv[1]; c->embd_scale = fv[2]; c->attn_scale = fv[3]; c->rope_base_swa = fv[4];
    d->n_tensors = counts[0]; d->n_prompt = counts[1]; d->n_eot = counts[2];
    if (d->n_tensors <= 0 || d->n_tensors > 100000 || d->n_prompt <= 0 || d->n_prompt > 1 << 20 || d->n_eot < 0 ||
        d->n_eot > 1024)
        return die(path, "implausible counts in the header");
    const size_t table = (size_t)d->n_tensors * sizeof(tensor_rec) + ((size_t)d->n_prompt + d->n_eot) * 4;
    if ((size_t)(p - d->buf) + table > d->size) return die(path, "truncated tensor table");
    d->tensors = (const tensor_rec *)p; /* 4-byte aligned only: records are read with memcpy */
    p += (size_t)d->n_tensors * sizeof(tensor_rec);
    d->prompt = (const int32_t *)p;
    d->eot = d->prompt + d->n_prompt;
    for (int i = 0; i < d->n_tensors; i++) {
        tensor_rec t;
        memcpy(&t, &d->tensors[i], sizeof t);
        if (t.offset < 0 || t.n_bytes < 0 || (uint64_t)t.offset + (uint64_t)t.n_bytes > d->size || t.offset % 64)
            return die(path, "a tensor lies outside the file");
    }
    return 0;
}

static int argmax(const float *x, int n, float *margin) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    float second = -3.0e38f;
    for (int i = 0; i < n; i++)
        if (i != best && x[i] > second) second = x[i];
    if (margin) *margin = x[best] - second;
    return best;
}

typedef struct {
    int steps, kv_k, kv_v, kv_window, stop_at_eot;
    const int32_t *force; /* n_force ids fed instead of the argmax (teacher forcing), or NULL */
    int n_force;
} run_opts;

/* Decide the precision of every position at least W steps old that is not yet decided. */
static int apply_kv(ek_model *m, const run_opts *o, int *decided) {
    if (o->kv_k == 16 && o->kv_v == 16) return 0;
    const int upto = ek_n_past(m) - o->kv_window;
    if (upto <= *decided) return 0;
    const int n = upto - *decided;
    int32_t *pos = (int32_t *)malloc(sizeof(int32_t) * 3 * (size_t)n);
    if (!pos) return EK_ERR_NOMEM;
    int32_t *kb = pos + n, *vb = pos + 2 * n;
    for (int i = 0; i < n; i++) {
        pos[i] = *decided + i;
        kb[i] = o->kv_k;
        vb[i] = o->kv_v;
    }
    int rc = ek_kv_set_bits(m, pos, kb, vb, n);
    free(pos);
    *decided = upto;
    return rc;
}

/* Prefill the prompt, then decode greedily; tokens[] gets up to o->steps ids, margins[] their margins. */
static int generate(ek_model *m, const dump *d, const run_opts *o, int32_t *tokens, float *margins, int *n_out) {
    const int V = d->cfg.n_vocab;
    float *logits = (float *)malloc(sizeof(float) * (size_t)V);
    if (!logits) return EK_ERR_NOMEM;
    int decided = ek_n_past(m), rc = 0, n = 0;
    rc = ek_forward(m, d->prompt, d->n_prompt, EK_LOGITS_LAST, logits);
    if (rc == 0) rc = apply_kv(m, o, &decided);
    while (rc == 0 && n < o->steps) {
        const int32_t tok = argmax(logits, V, &margins[n]);
        tokens[n++] = tok;
        int eot = 0;
        for (int i = 0; i < d->n_eot; i++) eot |= tok == d->eot[i];
        if ((eot && o->stop_at_eot) || n == o->steps || ek_n_past(m) >= ek_n_ctx(m)) break;
        const int32_t next = o->force ? (n - 1 < o->n_force ? o->force[n - 1] : -1) : tok;
        if (next < 0) break; /* forced ids ran out */
        rc = ek_forward(m, &next, 1, EK_LOGITS_LAST, logits);
        if (rc == 0) rc = apply_kv(m, o, &decided);
    }
    free(logits);
    *n_out = n;
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: run_model MODEL.ekd [--steps N] [--ctx N] [--threads N] [--batch N] [--kv K V] "
                        "[--kv-window W] [--stop-at-eot] [--rewind] [--margins] [--force ID,ID,...]\n");
        return 2;
    }
    run_opts o = {.steps = 32, .kv_k = 16, .kv_v = 16, .kv_window = 0, .stop_at_eot = 0};
    int ctx = 0, threads = 1, batch = 64, rewind_check = 0, show_margins = 0;
    int32_t *force = NULL;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const int more = i + 1 < argc;
        if (!strcmp(a, "--steps") && more) o.steps = atoi(argv[++i]);
        else if (!strcmp(a, "--ctx") && more) ctx = atoi(argv[++i]);
        else if (!strcmp(a, "--threads") && more) threads = atoi(argv[++i]);
        else if (!strcmp(a, "--batch") && more) batch = atoi(argv[++i]);
        else if (!strcmp(a, "--kv") && i + 2 < argc) { o.kv_k = atoi(argv[++i]); o.kv_v = atoi(argv[++i]); }
        else if (!strcmp(a, "--kv-window") && more) o.kv_window = atoi(argv[++i]);
        else if (!strcmp(a, "--stop-at-eot")) o.stop_at_eot = 1;
        else if (!strcmp(a, "--rewind")) rewind_check = 1;
        else if (!strcmp(a, "--margins")) show_margins = 1;
        else if (!strcmp(a, "--force") && more) {
            const char *s = argv[++i];
            free(force);
            force = (int32_t *)malloc(sizeof(int32_t) * (strlen(s) / 2 + 1));
            if (!force) return 1;
            o.n_force = 0;
            for (char *end; *s; s = *end ? end + 1 : end) {
                force[o.n_force++] = (int32_t)strtol(s, &end, 10);
                if (end == s) { fprintf(stderr, "run_model: --force wants comma-separated ids\n"); free(force); return 2; }
            }
            o.force = force;
        }
        else { fprintf(stderr, "run_model: unknown or incomplete option %s\n", a); return 2; }
    }
    if (o.steps < 1 || o.kv_window < 0) { fprintf(stderr, "run_model: --steps must be >= 1\n"); free(force); return 2; }

    dump d;
    if (read_dump(argv[1], &d)) { free(d.buf); free(force); return 1; }
    d.cfg.n_ctx = ctx > 0 ? ctx : d.n_prompt + o.steps;
    d.cfg.n_threads = threads;
    d.cfg.n_batch = batch;

    char err[512] = "";
    int status = 1;
    int32_t *tokens = NULL, *again = NULL;
    float *margins = NULL;
    ek_model *m = ek_model_create(&d.cfg, err, sizeof err);
    if (!m) { die("ek_model_create", err); goto out; }
    for (int i = 0; i < d.n_tensors; i++) {
        tensor_rec t;
        memcpy(&t, &d.tensors[i], sizeof t);
        if (ek_model_set_tensor(m, t.kind, t.layer, t.type, d.buf + t.offset, t.n_in, t.n_out, (size_t)t.n_bytes)) {
            die("ek_model_set_tensor", ek_model_error(m));
            goto out;
        }
    }
    if (ek_model_finalize(m)) { die("ek_model_finalize", ek_model_error(m)); goto out; }
    if (ek_kv_configure(m, d.kv_groups[0], d.kv_groups[1], d.kv_groups[2], d.kv_flags)) {
        die("ek_kv_configure", ek_model_error(m));
        goto out;
    }
    tokens = (int32_t *)calloc((size_t)o.steps, sizeof(int32_t));
    again = (int32_t *)calloc((size_t)o.steps, sizeof(int32_t));
    margins = (float *)calloc((size_t)o.steps * 2, sizeof(float));
    if (!tokens || !again || !margins) { die("run_model", "out of memory"); goto out; }
    int n = 0, n2 = 0;
    if (generate(m, &d, &o, tokens, margins, &n)) { die("generate", ek_model_error(m)); goto out; }
    printf("simd: %s\n", ek_simd());
    printf("tokens:");
    for (int i = 0; i < n; i++) printf(" %d", tokens[i]);
    printf("\n");
    if (show_margins) {
        printf("margins:");
        for (int i = 0; i < n; i++) printf(" %.6g", margins[i]);
        printf("\n");
    }
    printf("kv_bytes_used: %zu\n", ek_kv_bytes_used(m));
    if (rewind_check) {
        /* back to an empty context (precision policies see the prompt as new again), decode once more */
        if (ek_truncate(m, 0)) { die("ek_truncate", ek_model_error(m)); goto out; }
        if (generate(m, &d, &o, again, margins + o.steps, &n2)) { die("generate (rewound)", ek_model_error(m)); goto out; }
        if (n2 != n || memcmp(tokens, again, sizeof(int32_t) * (size_t)n) != 0) {
            die("--rewind", "decoding again after ek_truncate gave different tokens");
            goto out;
        }
        printf("rewind: same %d tokens\n", n2);
    }
    status = 0;
out:
    ek_model_free(m);
    free(tokens);
    free(again);
    free(margins);
    free(force);
    free(d.buf);
    return status;
}
