#include "attention.h"

#include <math.h>
#include <string.h>

#include "simd.h"

/* ---- reference ---------------------------------------------------------- */

static void softmax_ref(float *x, int n) {
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = fmaxf(mx, x[i]);
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    const float inv = 1.0f / sum;
    for (int i = 0; i < n; i++) x[i] *= inv;
}

void ek_attend_f16_ref(const ek_fp16 *K, const ek_fp16 *V, int n_pos, int head_dim, const float *q, int gs,
                       float *out, float *scores) {
    for (int h = 0; h < gs; h++) {
        float *s = scores + (size_t)h * n_pos;
        for (int j = 0; j < n_pos; j++) {
            float acc = 0.0f;
            for (int i = 0; i < head_dim; i++) acc += q[h * head_dim + i] * ek_fp16_to_fp32(K[(size_t)j * head_dim + i]);
            s[j] = acc;
        }
        softmax_ref(s, n_pos);
        float *o = out + (size_t)h * head_dim;
        for (int i = 0; i < head_dim; i++) o[i] = 0.0f;
        for (int j = 0; j < n_pos; j++)
            for (int i = 0; i < head_dim; i++) o[i] += s[j] * ek_fp16_to_fp32(V[(size_t)j * head_dim + i]);
    }
}

/* ---- AVX2 --------------------------------------------------------------- */
#if defined(EK_AVX2)

/* exp(x) for x <= 0 (softmax after max subtraction): 2^n * p(r), |rel err| < 2e-7 */
static inline __m256 exp_neg_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

void ek_softmax(float *x, int n) {
    __m256 vmx = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(x + i));
    float mx = -INFINITY;
    {
        float t[8];
        _mm256_storeu_ps(t, vmx);
        for (int k = 0; k < 8; k++) mx = fmaxf(mx, t[k]);
    }
    for (; i < n; i++) mx = fmaxf(mx, x[i]);
    const __m256 m = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 e = exp_neg_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
        _mm256_storeu_ps(x + i, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = ek_hsum256(vsum);
    for (; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
    for (; i < n; i++) x[i] *= 1.0f / sum;
}

void ek_attend_f16(const ek_fp16 *K, const ek_fp16 *V, int n_pos, int head_dim, const float *q, int gs,
                   float *out, float *scores) {
    if (head_dim % 8) {
        ek_attend_f16_ref(K, V, n_pos, head_dim, q, gs, out, scores);
        return;
    }
    for (int j = 0; j < n_pos; j++) {
        const ek_fp16 *kr = K + (size_t)j * head_dim;
        for (int h = 0; h < gs; h++) {
            const float *qh = q + (size_t)h * head_dim;
            __m256 acc = _mm256_setzero_ps();
            for (int i = 0; i < head_dim; i += 8)
                acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kr + i))),
                                      _mm256_loadu_ps(qh + i), acc);
            scores[(size_t)h * n_pos + j] = ek_hsum256(acc);
        }
    }
    for (int h = 0; h < gs; h++) ek_softmax(scores + (size_t)h * n_pos, n_pos);
    memset(out, 0, sizeof(float) * (size_t)gs * head_dim);
    for (int j = 0; j < n_pos; j++) {
        const ek_fp16 *vr = V + (size_t)j * head_dim;
        for (int i = 0; i < head_dim; i += 8) {
            __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vr + i)));
            for (int h = 0; h < gs; h++) {
                float *o = out + (size_t)h * head_dim + i;
                _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(scores[(size_t)h * n_pos + j]), vv,
                                                    _mm256_loadu_ps(o)));
            }
        }
    }
}

/* ---- NEON --------------------------------------------------------------- */
#elif defined(EK_NEON) && defined(__aarch64__)

void ek_softmax(float *x, int n) { softmax_ref(x, n); }

static inline float32x4_t load_f16x4(const ek_fp16 *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

void ek_attend_f16(const ek_fp16 *K, const ek_fp16 *V, int n_pos, int head_dim, const float *q, int gs,
                   float *out, float *scores) {
    if (head_dim % 4) {
        ek_attend_f16_ref(K, V, n_pos, head_dim, q, gs, out, scores);
        return;
    }
    for (int j = 0; j < n_pos; j++) {
        const ek_fp16 *kr = K + (size_t)j * head_dim;
        for (int h = 0; h < gs; h++) {
            const float *qh = q + (size_t)h * head_dim;
            float32x4_t acc = vdupq_n_f32(0.0f);
            for (int i = 0; i < head_dim; i += 4) acc = vfmaq_f32(acc, load_f16x4(kr + i), vld1q_f32(qh + i));
            scores[(size_t)h * n_pos + j] = vaddvq_f32(acc);
        }
    }
    for (int h = 0; h < gs; h++) ek_softmax(scores + (size_t)h * n_pos, n_pos);
    memset(out, 0, sizeof(float) * (size_t)gs * head_dim);
    for (int j = 0; j < n_pos; j++) {
        const ek_fp16 *vr = V + (size_t)j * head_dim;
        for (int i = 0; i < head_dim; i += 4) {
            float32x4_t vv = load_f16x4(vr + i);
            for (int h = 0; h < gs; h++) {
                float *o = out + (size_t)h * head_dim + i;
                vst1q_f32(o, vfmaq_n_f32(vld1q_f32(o), vv, scores[(size_t)h * n_pos + j]));
            }
        }
    }
}

/* ---- scalar build ------------------------------------------------------- */
#else

void ek_softmax(float *x, int n) { softmax_ref(x, n); }

void ek_attend_f16(const ek_fp16 *K, const ek_fp16 *V, int n_pos, int head_dim, const float *q, int gs,
                   float *out, float *scores) {
    ek_attend_f16_ref(K, V, n_pos, head_dim, q, gs, out, scores);
}

#endif
