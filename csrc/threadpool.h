/* A small fork-join thread pool for a machine that is shared.
 *
 * ek_pool_run(fn) calls fn(ctx, ith, nth) on the caller (ith 0) and on every
 * worker that wakes up in time, then returns when all who joined are done.
 * Work inside fn must be claimed dynamically (ek_claim), never split
 * statically by ith: a worker that the OS has descheduled simply does not
 * join, and the caller finishes the region alone instead of waiting for it.
 * (On a 2-core laptop or CI box with anything else running, static splitting
 * made one decode step wait whole scheduler time slices.)
 *
 * Decode runs a few hundred regions per token, so workers spin briefly before
 * sleeping on a condition variable. pthreads + C11 atomics: gcc and clang on
 * Linux, macOS and Raspberry Pi OS.
 */
#ifndef EDGEKV_THREADPOOL_H
#define EDGEKV_THREADPOOL_H

#include <stdatomic.h>

typedef void (*ek_task_fn)(void *ctx, int ith, int nth);

typedef struct ek_pool ek_pool;

ek_pool *ek_pool_create(int n_threads); /* NULL on failure */
void ek_pool_free(ek_pool *pool);
int ek_pool_size(const ek_pool *pool);
void ek_pool_run(ek_pool *pool, ek_task_fn fn, void *ctx);

/* Claim the next of n work items from a counter the region's ctx owns (set to 0
 * before ek_pool_run); returns -1 when none are left. */
static inline int ek_claim(atomic_int *next, int n) {
    int i = atomic_fetch_add_explicit(next, 1, memory_order_relaxed);
    return i < n ? i : -1;
}

#endif
