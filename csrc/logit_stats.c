/* Next-token statistics of logit rows, for the KV controller's per-position features.
 *
 * Per row x (n_vocab logits), with m = max x, z = x - m, e = exp z, s = sum e:
 *   max_logit = m,  log_s = log s  (so log p_i = z_i - log_s and the max probability is 1 / s),
 *   entropy = log s - sum(e z) / s  (nats).
 * One pass of exp over the vocabulary after the max (in C for speed: docs/decisions.md). A row
 * holding NaN or inf gets NaN statistics.
 * Rows can be split into pieces (partials, merged by rescaling to the common max): a decode step
 * computes them per output-matrix chunk, right after each chunk is written (model.c).
 */
#include <math.h>

#include "edgekv.h"
#include "logit_stats.h"
#include "simd.h"

/* m, s = sum exp(x - m), t = sum exp(x - m) (x - m) over x[0..n); m = NaN when x holds NaN or inf */
void ek_logit_partial(const float *x, int n, float out[3]) {
    float m = -INFINITY;
    int i = 0, bad = 0;
#if defined(EK_AVX2)
    __m256 vm = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        vm = _mm256_max_ps(vm, v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    m = ek_hmax256(vm);
    bad = _mm256_movemask_ps(nan) != 0;
#elif defined(EK_NEON) && defined(__aarch64__)
    float32x4_t vm = vdupq_n_f32(-INFINITY);
    uint32x4_t nan = vdupq_n_u32(0);
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        vm = vmaxq_f32(vm, v);
        nan = vorrq_u32(nan, vmvnq_u32(vceqq_f32(v, v)));
    }
    m = vmaxvq_f32(vm);
    bad = vmaxvq_u32(nan) != 0;
#endif
    for (; i < n; i++) {
        bad |= x[i] != x[i];
        m = x[i] > m ? x[i] : m;
    }
    if (bad || !isfinite(m)) {
        out[0] = out[1] = out[2] = NAN;
        return;
    }
    float s = 0.0f, t = 0.0f;
    i = 0;
#if defined(EK_AVX2)
    const __m256 mv = _mm256_set1_ps(m);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        const __m256 za = _mm256_sub_ps(_mm256_loadu_ps(x + i), mv), zb = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), mv);
        const __m256 ea = ek_exp_neg256(za), eb = ek_exp_neg256(zb);
        s0 = _mm256_add_ps(s0, ea);
        s1 = _mm256_add_ps(s1, eb);
        t0 = _mm256_fmadd_ps(ea, za, t0);
        t1 = _mm256_fmadd_ps(eb, zb, t1);
    }
    s = ek_hsum256(_mm256_add_ps(s0, s1));
    t = ek_hsum256(_mm256_add_ps(t0, t1));
#elif defined(EK_NEON) && defined(__aarch64__)
    const float32x4_t mv = vdupq_n_f32(m);
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, t0 = s0, t1 = s0;
    for (; i + 8 <= n; i += 8) {
        const float32x4_t za = vsubq_f32(vld1q_f32(x + i), mv), zb = vsubq_f32(vld1q_f32(x + i + 4), mv);
        const float32x4_t ea = ek_exp_neg128(za), eb = ek_exp_neg128(zb);
        s0 = vaddq_f32(s0, ea);
        s1 = vaddq_f32(s1, eb);
        t0 = vfmaq_f32(t0, ea, za);
        t1 = vfmaq_f32(t1, eb, zb);
    }
    s = vaddvq_f32(vaddq_f32(s0, s1));
    t = vaddvq_f32(vaddq_f32(t0, t1));
#endif
    for (; i < n; i++) {
        const float z = x[i] - m, e = expf(z);
        s += e;
        t += e * z;
    }
    out[0] = m;
    out[1] = s;
    out[2] = t;
}

/* Combine partials of disjoint pieces of one row (rescaled to the common max). */
void ek_logit_merge(const float *parts, int n_parts, float *max_logit, float *log_s, float *entropy) {
    float m = -INFINITY;
    for (int p = 0; p < n_parts; p++) {
        if (parts[3 * p] != parts[3 * p]) {
            *max_logit = *log_s = *entropy = NAN;
            return;
        }
        m = parts[3 * p] > m ? parts[3 * p] : m;
    }
    double s = 0.0, t = 0.0;
    for (int p = 0; p < n_parts; p++) {
        const double d = (double)parts[3 * p] - m, c = exp(d); /* exp(m_p - m) <= 1 */
        s += c * parts[3 * p + 1];
        t += c * (parts[3 * p + 2] + d * parts[3 * p + 1]);
    }
    *max_logit = m;
    *log_s = (float)log(s);
    *entropy = (float)(log(s) - t / s);
}

int ek_logit_stats(const float *logits, int n_rows, int n_vocab, float *max_logit, float *log_s, float *entropy) {
    if (!logits || !max_logit || !log_s || !entropy || n_rows < 0 || n_vocab <= 0) return EK_ERR_INVALID;
    for (int r = 0; r < n_rows; r++) {
        float part[3];
        ek_logit_partial(logits + (size_t)r * n_vocab, n_vocab, part);
        ek_logit_merge(part, 1, max_logit + r, log_s + r, entropy + r);
    }
    return EK_OK;
}
