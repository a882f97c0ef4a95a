/* Next-token statistics of logit rows in pieces (see logit_stats.c). */
#ifndef EDGEKV_LOGIT_STATS_H
#define EDGEKV_LOGIT_STATS_H

/* out = (m, s, t) of x[0..n): max, sum exp(x - m), sum exp(x - m) (x - m); m = NaN for NaN/inf */
void ek_logit_partial(const float *x, int n, float out[3]);
/* max logit, log of the partition sum relative to it, entropy (nats) of the row the parts cover */
void ek_logit_merge(const float *parts, int n_parts, float *max_logit, float *log_s, float *entropy);

#endif
