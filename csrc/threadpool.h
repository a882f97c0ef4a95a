/* A small fork-join thread pool: ek_pool_run(fn) runs fn(ctx, ith, nth) on
 * every thread (the caller is thread 0) and returns when all are done.
 *
 * Decode issues a few hundred parallel regions per token, so workers spin
 * briefly before sleeping on a condition variable: wake-up latency matters
 * more than the few microseconds of spinning. pthreads + C11 atomics only,
 * so it builds with gcc and clang on Linux, macOS and Raspberry Pi OS.
 */
#ifndef EDGEKV_THREADPOOL_H
#define EDGEKV_THREADPOOL_H

typedef void (*ek_task_fn)(void *ctx, int ith, int nth);

typedef struct ek_pool ek_pool;

ek_pool *ek_pool_create(int n_threads); /* NULL on failure */
void ek_pool_free(ek_pool *pool);
int ek_pool_size(const ek_pool *pool);
void ek_pool_run(ek_pool *pool, ek_task_fn fn, void *ctx);

#endif
