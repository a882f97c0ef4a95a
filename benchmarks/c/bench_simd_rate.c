/* Issue rate of a few vector instructions at 256 and 512 bits on this machine: 12 independent
 * accumulators per loop (so latency does not bound it), instructions per nanosecond. Why the
 * AVX-512 attention kernels (csrc/kv_attention_x512.c) win by doing less work, not by width: on a
 * core that splits 512-bit operations in two, a zmm instruction issues at half the ymm rate.
 *     bench_simd_rate [iterations]                                   */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#include <immintrin.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define REP12(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
/* one timed loop of 12 independent `INSN src2, src1, acc[i]` on registers of type T */
#define RATE(NAME, T, SET1, INSN)                                                                   \
    static double NAME(long n) {                                                                   \
        T a[12], x = SET1(3), y = SET1(5);                                                         \
        for (int i = 0; i < 12; i++) a[i] = SET1(i);                                               \
        const double t0 = now();                                                                   \
        for (long k = 0; k < n; k++) { REP12(ONE_##INSN) }                                        \
        const double t = now() - t0;                                                               \
        volatile T sink = a[0];                                                                    \
        for (int i = 1; i < 12; i++) sink = a[i];                                                  \
        (void)sink;                                                                                \
        return 12.0 * (double)n / t / 1e9;                                                         \
    }
#define ONE_DPBUSD(i) __asm__ volatile("vpdpbusd %2, %1, %0" : "+v"(a[i]) : "v"(x), "v"(y));
#define ONE_DPWSSD(i) __asm__ volatile("vpdpwssd %2, %1, %0" : "+v"(a[i]) : "v"(x), "v"(y));
#define ONE_PADDD(i) __asm__ volatile("vpaddd %2, %1, %0" : "+v"(a[i]) : "v"(x), "v"(y));
#define ONE_PERMT2D(i) __asm__ volatile("vpermt2d %2, %1, %0" : "+v"(a[i]) : "v"(x), "v"(y));

RATE(dpbusd_zmm, __m512i, _mm512_set1_epi32, DPBUSD)
RATE(dpbusd_ymm, __m256i, _mm256_set1_epi32, DPBUSD)
RATE(dpwssd_zmm, __m512i, _mm512_set1_epi32, DPWSSD)
RATE(dpwssd_ymm, __m256i, _mm256_set1_epi32, DPWSSD)
RATE(paddd_zmm, __m512i, _mm512_set1_epi32, PADDD)
RATE(paddd_ymm, __m256i, _mm256_set1_epi32, PADDD)
RATE(permt2d_zmm, __m512i, _mm512_set1_epi32, PERMT2D)
RATE(permt2d_ymm, __m256i, _mm256_set1_epi32, PERMT2D)

int main(int argc, char **argv) {
    const long n = argc > 1 ? atol(argv[1]) : 50000000L;
    printf("instructions per ns (12 independent accumulators, %ld iterations):\n", n);
    printf("  vpdpbusd  zmm %.2f  ymm %.2f\n", dpbusd_zmm(n), dpbusd_ymm(n));
    printf("  vpdpwssd  zmm %.2f  ymm %.2f\n", dpwssd_zmm(n), dpwssd_ymm(n));
    printf("  vpaddd    zmm %.2f  ymm %.2f\n", paddd_zmm(n), paddd_ymm(n));
    printf("  vpermt2d  zmm %.2f  ymm %.2f\n", permt2d_zmm(n), permt2d_ymm(n));
    return 0;
}
#else
int main(void) {
    printf("bench_simd_rate: this build has no AVX-512 VNNI (build with EDGEKV_ARCH=native on such a CPU)\n");
    return 0;
}
#endif
