#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/* How long a worker spins for the next region before sleeping. */
#define SPIN_ITERS 20000

/* Region state, one atomic word: generation << 32 | CLOSED bit | threads inside.
 * A worker may enter only the current generation while it is open; the caller
 * closes it once it has run out of work, then waits for those inside. */
#define CLOSED ((uint64_t)1 << 31)
#define INSIDE_MASK (CLOSED - 1)

struct ek_pool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t state;
    atomic_int stop;
    atomic_int sleepers;
    ek_task_fn fn;
    void *ctx;
};

typedef struct {
    ek_pool *pool;
    int ith;
} worker_arg;

static inline uint32_t gen_of(uint64_t s) { return (uint32_t)(s >> 32); }

/* Enter region gen if it is still open; 1 on success. */
static int try_enter(ek_pool *pool, uint32_t gen) {
    uint64_t s = atomic_load(&pool->state);
    while (gen_of(s) == gen && !(s & CLOSED)) {
        if (atomic_compare_exchange_weak(&pool->state, &s, s + 1)) return 1;
    }
    return 0;
}

static void *worker_main(void *p) {
    worker_arg *arg = (worker_arg *)p;
    ek_pool *pool = arg->pool;
    const int ith = arg->ith;
    free(arg);
    uint32_t seen = gen_of(atomic_load(&pool->state));
    for (;;) {
        uint32_t gen = gen_of(atomic_load_explicit(&pool->state, memory_order_acquire));
        for (int i = 0; gen == seen && i < SPIN_ITERS; i++) {
            CPU_RELAX();
            gen = gen_of(atomic_load_explicit(&pool->state, memory_order_acquire));
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool->mu);
            atomic_fetch_add(&pool->sleepers, 1);
            while ((gen = gen_of(atomic_load(&pool->state))) == seen && !atomic_load(&pool->stop))
                pthread_cond_wait(&pool->cv, &pool->mu);
            atomic_fetch_sub(&pool->sleepers, 1);
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->stop)) return NULL;
        seen = gen;
        if (try_enter(pool, gen)) {
            pool->fn(pool->ctx, ith, pool->n_threads);
            atomic_fetch_sub(&pool->state, 1);
        }
    }
}

ek_pool *ek_pool_create(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    ek_pool *pool = (ek_pool *)calloc(1, sizeof(ek_pool));
    if (!pool) return NULL;
    pool->n_threads = n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv, NULL);
    atomic_init(&pool->state, CLOSED);
    atomic_init(&pool->stop, 0);
    atomic_init(&pool->sleepers, 0);
    if (n_threads > 1) {
        pool->threads = (pthread_t *)calloc((size_t)n_threads, sizeof(pthread_t));
        if (!pool->threads) {
            free(pool);
            return NULL;
        }
        for (int i = 1; i < n_threads; i++) {
            worker_arg *arg = (worker_arg *)malloc(sizeof(worker_arg));
            if (!arg) { pool->n_threads = i; ek_pool_free(pool); return NULL; }
            arg->pool = pool;
            arg->ith = i;
            if (pthread_create(&pool->threads[i], NULL, worker_main, arg) != 0) {
                free(arg);
                pool->n_threads = i;
                ek_pool_free(pool);
                return NULL;
            }
        }
    }
    return pool;
}

void ek_pool_free(ek_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->stop, 1);
    atomic_fetch_add(&pool->state, (uint64_t)1 << 32);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n_threads; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cv);
    free(pool->threads);
    free(pool);
}

int ek_pool_size(const ek_pool *pool) { return pool->n_threads; }

void ek_pool_run(ek_pool *pool, ek_task_fn fn, void *ctx) {
    if (pool->n_threads == 1) {
        fn(ctx, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    /* open the next generation with nobody inside (seq_cst: pairs with sleepers++ in workers) */
    const uint64_t next = ((uint64_t)(gen_of(atomic_load(&pool->state)) + 1)) << 32;
    atomic_store(&pool->state, next);
    if (atomic_load(&pool->sleepers) > 0) {
        pthread_mutex_lock(&pool->mu);
        pthread_cond_broadcast(&pool->cv);
        pthread_mutex_unlock(&pool->mu);
    }
    fn(ctx, 0, pool->n_threads);
    /* out of work: let nobody else in, then wait for those still inside */
    uint64_t s = atomic_fetch_or(&pool->state, CLOSED);
    for (int spins = 0; (s & INSIDE_MASK) != 0; spins++) {
        if (spins > 1000) sched_yield(); /* a preempted worker needs this core */
        else CPU_RELAX();
        s = atomic_load_explicit(&pool->state, memory_order_acquire);
    }
}
