/* Instruction-level view of the fused KV attention kernel: fills one KV head
 * with n records at the given precisions and runs one decode query over it.
 * Meant for `valgrind --tool=callgrind` (instruction counts are repeatable on
 * a noisy machine) and for quick timing:  bench_attention N KBITS VBITS ITERS */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "kv_attention.h"
#include "kv_store.h"

int main(int argc, char **argv) {
    const int n = argc > 1 ? atoi(argv[1]) : 4096, kb = argc > 2 ? atoi(argv[2]) : 4, vb = argc > 3 ? atoi(argv[3]) : 4;
    const int iters = argc > 4 ? atoi(argv[4]) : 10, hd = 64, gs = 3;
    ek_kv_store s;
    if (ek_kv_store_init(&s, 1, 1, hd, n)) return 1;
    float k[64], v[64], q[3 * 64], qr[3 * 64], out[3 * 64];
    uint32_t r = 1;
    ek_kv_store_append(&s, n);
    for (int j = 0; j < n; j++) {
        for (int i = 0; i < hd; i++) {
            r = r * 1664525u + 1013904223u; k[i] = (float)(r >> 8) / 16777216.0f - 0.5f;
            r = r * 1664525u + 1013904223u; v[i] = (float)(r >> 8) / 16777216.0f - 0.5f;
        }
        ek_kv_store_put(&s, 0, j, k, v);
        ek_kv_store_set_prec(&s, -1, j, ek_kv_prec_from_bits(kb), ek_kv_prec_from_bits(vb));
    }
    for (int i = 0; i < gs * hd; i++) q[i] = qr[i] = 0.1f * (float)((i * 7) % 13 - 6);
    for (int h = 0; h < gs; h++) ek_rotate(qr + h * hd, s.signs, hd);
    float *scratch = malloc(sizeof(float) * (ek_attn_scratch_floats(gs, hd) + ek_attn_partial_floats(gs, hd)));
    ek_attn_args a = {&s, 0, 0, gs, q, qr, n - 1, NULL, 0};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int it = 0; it < iters; it++) {
        ek_attn_partial part;
        ek_attn_partial_init(&part, scratch + ek_attn_scratch_floats(gs, hd), gs, hd);
        ek_attend_all(&a, &part, scratch);
        ek_attn_finish(&part, &s, gs, out);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double dt = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    printf("k%dv%d n=%d: %.2f ns/record (out[0]=%g)\n", kb, vb, n, 1e9 * dt / iters / n, out[0]);
    free(scratch);
    ek_kv_store_free(&s);
    return 0;
}
