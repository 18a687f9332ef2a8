/* The kernels' thread pool: the calling thread and up to nthreads - 1 helper threads share one
   job, a range [0, n) cut into chunks that each thread claims with an atomic counter.

   Why not OpenMP: an OpenMP region ends at a barrier, so it lasts until every thread of the team
   has done its static share, and libgomp's idle threads spin (by default some 300,000 pause
   loops, milliseconds) before they sleep. On a machine whose cores other processes also want, a
   helper that is not running when a region starts then holds the region up for a scheduler time
   slice, and spinning threads take CPU time from the threads doing work: a decode step holds
   dozens of regions, and one measurement had decode ~40x slower under load (issue 12). Here
   instead
   - the caller never waits for a helper that has not started: chunks are claimed, not assigned,
     so the threads that run do all the work (a late helper finds none left and goes back to
     sleep); the caller waits only for chunks already claimed;
   - an idle helper spins for MMAFM_SPIN_US microseconds (default 50; the gap between two calls
     of one decode step is shorter, the gap between steps often longer), yielding the core while
     it does, then sleeps on a condition variable;
   - a waiting caller yields its core (sched_yield) rather than spinning.
   Which thread computes which rows does not change any result: each output element is one
   thread's sum in a fixed order.

   One job runs at a time; a call made while another thread's job is running runs alone on its
   caller. After fork() the child starts with no helpers (pthread_atfork) and makes new ones. */
#ifndef MMAFM_POOL_H
#define MMAFM_POOL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#define POOL_MAX_HELPERS 63
#define POOL_DEFAULT_SPIN_US 50

typedef void (*pool_fn)(void* ctx, long begin, long end); /* computes items [begin, end) */

static struct {
  pthread_mutex_t submit;  /* held by the caller of the running job */
  pthread_mutex_t sleep_lock;
  pthread_cond_t wake;
  atomic_uint generation;  /* bumped when a job is published */
  atomic_int sleepers;     /* helpers in (or about to enter) pthread_cond_wait */
  atomic_int open;         /* helpers may join the current job */
  atomic_int active;       /* helpers inside the current job */
  atomic_long next_chunk;  /* the next chunk to claim */
  /* the current job: written by its caller while no helper is inside (active == 0, open == 0) */
  pool_fn fn;
  void* ctx;
  long n, grain, chunks;
  int wanted;              /* helpers that may take part (nthreads - 1) */
  int started;             /* helper threads running */
  long spin_ns;
  pthread_once_t once;
} pool = {.submit = PTHREAD_MUTEX_INITIALIZER, .sleep_lock = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER, .once = PTHREAD_ONCE_INIT};  /* the rest zero */

static inline void pool_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static long pool_now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* claim and run chunks of the current job until none is left */
static void pool_work(void) {
  long chunk;
  while ((chunk = atomic_fetch_add(&pool.next_chunk, 1)) < pool.chunks) {
    const long begin = chunk * pool.grain, end = begin + pool.grain < pool.n ? begin + pool.grain : pool.n;
    pool.fn(pool.ctx, begin, end);
  }
}

static void* pool_helper(void* arg) {
  const int index = (int)(long)arg;
  unsigned seen = atomic_load(&pool.generation);
  for (;;) {
    /* wait for a new job: spin (yielding the core) for spin_ns, then sleep */
    const long give_up = pool_now_ns() + pool.spin_ns;
    for (int spins = 0; atomic_load_explicit(&pool.generation, memory_order_acquire) == seen; ++spins) {
      pool_pause();
      if ((spins & 63) == 63) {
        if (pool_now_ns() < give_up) { sched_yield(); continue; }
        pthread_mutex_lock(&pool.sleep_lock);
        atomic_fetch_add(&pool.sleepers, 1);
        while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.sleep_lock);
        atomic_fetch_sub(&pool.sleepers, 1);
        pthread_mutex_unlock(&pool.sleep_lock);
      }
    }
    seen = atomic_load(&pool.generation);
    /* join the job only while it is open and still the one we saw: the caller cannot replace it
       before we leave (it waits for active == 0 after closing it) */
    atomic_fetch_add(&pool.active, 1);
    if (atomic_load(&pool.open) && atomic_load(&pool.generation) == seen && index < pool.wanted) pool_work();
    atomic_fetch_sub_explicit(&pool.active, 1, memory_order_release);
  }
  return NULL;
}

static void pool_after_fork_in_child(void) {
  /* only the forking thread exists in the child: no helpers, fresh locks */
  pthread_mutex_init(&pool.submit, NULL);
  pthread_mutex_init(&pool.sleep_lock, NULL);
  pthread_cond_init(&pool.wake, NULL);
  atomic_store(&pool.sleepers, 0);
  atomic_store(&pool.open, 0);
  atomic_store(&pool.active, 0);
  pool.started = 0;
}

static void pool_init(void) {
  const char* spin = getenv("MMAFM_SPIN_US");
  const long us = spin && *spin ? atol(spin) : POOL_DEFAULT_SPIN_US;
  pool.spin_ns = (us < 0 ? 0 : us) * 1000L;
  pthread_atfork(NULL, NULL, pool_after_fork_in_child);
}

/* helpers running; started on demand (called with pool.submit held) */
static int pool_ensure_helpers(int helpers) {
  if (helpers > POOL_MAX_HELPERS) helpers = POOL_MAX_HELPERS;
  while (pool.started < helpers) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    const int failed = pthread_create(&thread, &attr, pool_helper, (void*)(long)pool.started);
    pthread_attr_destroy(&attr);
    if (failed) break;
    pool.started++;
  }
  return pool.started < helpers ? pool.started : helpers;
}

/* fn(ctx, begin, end) over [0, n) in chunks of grain items, on the caller and up to nthreads - 1
   helpers; returns when every item is done */
static void pool_run(pool_fn fn, void* ctx, long n, long grain, int nthreads) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  pthread_once(&pool.once, pool_init);
  if (nthreads <= 1 || n <= grain || pthread_mutex_trylock(&pool.submit) != 0) {
    fn(ctx, 0, n);  /* one thread, one chunk, or another thread's job running */
    return;
  }
  const int helpers = pool_ensure_helpers(nthreads - 1);
  pool.fn = fn;
  pool.ctx = ctx;
  pool.n = n;
  pool.grain = grain;
  pool.chunks = (n + grain - 1) / grain;
  pool.wanted = helpers;
  atomic_store(&pool.next_chunk, 0);
  atomic_store(&pool.open, 1);
  atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
  if (atomic_load(&pool.sleepers) > 0) {
    pthread_mutex_lock(&pool.sleep_lock);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.sleep_lock);
  }
  pool_work();
  atomic_store(&pool.open, 0);
  /* only helpers that joined are waited for, each finishing the chunk it holds */
  for (int spins = 0; atomic_load(&pool.active) > 0; ++spins) {  /* seq_cst: pairs with the helper's join */
    if (spins < 256) pool_pause();
    else sched_yield();
  }
  pthread_mutex_unlock(&pool.submit);
}

/* helper threads started so far (for tests) */
int mmafm_pool_helpers(void) { return pool.started; }

#endif /* MMAFM_POOL_H */
