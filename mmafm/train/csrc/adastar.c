/* AdaStar's update (mmafm.train.optim.AdaStar) for float32 parameters on the CPU, fused: the
   torch._foreach_* path makes about a dozen passes over parameter-sized tensors per step; here a
   param group takes two passes over its tensors (one without the RMS clip), in one call, or in
   two with sharded blocks (FSDP2), whose sums Python all-reduces between the passes.

   pass 1 (mmafm_adastar_pass1_f32), per element of every block b:
       v = b2 v + (1 - b2) g^2                      (the gradient-square EMA, in place)
       m = lerp(m, g, wg)                           (the optional gradient EMA, in place)
       u = n / (sqrt(v + a[b]) + e[b])              (n = m or g; a, e fold eps_square, eps and the
                                                     bias correction, see AdaStar._update)
     and sums[b] = sum of u^2 over the block (this process's shard of it).
   Python then all-reduces the sums of sharded blocks (FSDP2) and turns them into one scale per
   block (bias correction times the RMS clip), s[b]. Without sharded blocks one call does it all
   (mmafm_adastar_step_f32): pass 1, the clip and pass 2 a cache-sized batch of blocks at a time,
   so that pass 2 finds much of what pass 1 read still in cache.
   pass 2 (mmafm_adastar_pass2_f32), per element (v and m as pass 1 left them, or updated here
   first when update_state is set: no clip, no pass 1):
       u = (n / (sqrt(v + a[b]) + e[b])) s[b]
       q = lerp(q, u, wu); x = q / d[b]             (the optional update EMA, in place) else x = u
       p = p * decay + alpha[b] x                   (decay = 1 - schedule wd, alpha = -lr scale)

   Each operation is the one the foreach path applies, in its order (lerp as torch's: a fused
   multiply-add from the nearer end), so the two agree to float32 rounding. Work is cut into
   chunks of CHUNK elements of one block, which the threads of the pool (pool.h) claim; a block's
   sum of squares is a float32 sum per chunk (16 lanes, fixed order), the chunks' sums added in
   float64 in chunk order: results do not depend on the thread count. */
#include <math.h>
#include <stdlib.h>

#include "pool.h"

#define CHUNK 65536L                 /* elements per work item (256 KiB of each stream), a multiple of 16; each
                                        chunk restarts the hardware prefetcher's streams: 16384 cost 5-6% on
                                        the 75.5M-parameter model at 1 thread, ~20% at 2 (A/B, 2026-12-01) */
#define PARALLEL_MIN_TOTAL 524288L   /* fewer elements in a group (or batch): one thread (at 131072 the tiny
                                        model's 256K batches woke the pool for no gain in wall time: 2
                                        threads, 0.83 -> 0.77 and 0.72 -> 0.69 ns an element in two A/B
                                        runs, and its helpers' spinning doubled the step's CPU time) */
#define BATCH 262144L                /* elements of a step batch: its gradient and v (2 MiB) stay in cache */

static inline float lerp_f32(float start, float end, float weight) { /* torch's lerp */
  return fabsf(weight) < 0.5f ? fmaf(weight, end - start, start) : fmaf(weight - 1.0f, end - start, end);
}

typedef struct {
  long n;                  /* blocks */
  const long* sizes;       /* (n,) elements of each block */
  long* first;             /* (n + 1,) the first chunk of each block; first[n] = chunks */
  float* const* grads;     /* (n,) gradients */
  float* const* v;         /* (n,) gradient-square EMAs */
  float* const* m;         /* (n,) gradient EMAs, or NULL (off) */
  float* const* params;    /* pass 2: (n,) parameters */
  float* const* q;         /* pass 2: (n,) update EMAs, or NULL (off) */
  const float* a;          /* (n,) added under the square root */
  const float* e;          /* (n,) added to the square root */
  const float* s;          /* pass 2: (n,) block scales */
  const float* d;          /* pass 2: (n,) update EMA divisors, or NULL (1) */
  const float* alpha;      /* pass 2: (n,) -lr * mu-param scale */
  float b2, wg, wu, decay;
  int update_state;        /* pass 2: update v and m first (no pass 1) */
  float* partial;          /* pass 1: (chunks,) the sum of u^2 of each chunk */
  long chunk0;             /* the pool's item k is chunk chunk0 + k ... */
  long count;              /* ... or, reversed, chunk0 + count - 1 - k */
  int reverse;
} job_t;

/* the chunk of the pool's item k */
static inline long chunk_of(const job_t* job, long k) {
  return job->reverse ? job->chunk0 + job->count - 1 - k : job->chunk0 + k;
}

/* the block of chunk c: the last b with first[b] <= c (blocks of 0 elements own no chunk) */
static long block_of(const job_t* job, long c) {
  long lo = 0, hi = job->n - 1;
  while (lo < hi) {
    const long mid = (lo + hi + 1) / 2;
    if (job->first[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

/* the element range [start, stop) of chunk c within its block b */
static inline void chunk_range(const job_t* job, long c, long b, long* start, long* stop) {
  *start = (c - job->first[b]) * CHUNK;
  *stop = *start + CHUNK < job->sizes[b] ? *start + CHUNK : job->sizes[b];
}

/* pass 1's sum of u^2 over block b: its chunks' float32 sums added in float64, in chunk order */
static double block_sum(const job_t* job, long b) {
  double sum = 0.0;
  for (long c = job->first[b]; c < job->first[b + 1]; ++c) sum += job->partial[c];
  return sum;
}

/* v[i] <- b2 v[i] + (1 - b2) g[i]^2; m[i] <- lerp(m[i], g[i], wg) when m; returns the numerator
   (m[i] or g[i]) */
static inline float state_step(float b2, float wg, float* restrict v, float* restrict m, const float* restrict g,
                               long i) {
  const float gi = g[i];
  v[i] = b2 * v[i] + (1.0f - b2) * (gi * gi);
  if (m) { m[i] = lerp_f32(m[i], gi, wg); return m[i]; }
  return gi;
}

static void pass1_chunks(void* ctx, long begin, long end) {
  const job_t* job = ctx;
  for (long k = begin; k < end; ++k) {
    const long c = chunk_of(job, k), b = block_of(job, c);
    long start, stop;
    chunk_range(job, c, b, &start, &stop);
    float* restrict v = job->v[b];
    float* restrict m = job->m ? job->m[b] : NULL;
    const float* restrict g = job->grads[b];
    const float a = job->a[b], e = job->e[b], b2 = job->b2, wg = job->wg;
    float acc[16] = {0};
    long i = start;
    for (; i + 16 <= stop; i += 16)
      for (int j = 0; j < 16; ++j) {
        const float n = state_step(b2, wg, v, m, g, i + j);
        const float u = n * (1.0f / (sqrtf(v[i + j] + a) + e));
        acc[j] += u * u;
      }
    float sum = 0.0f;
    for (int j = 0; j < 16; ++j) sum += acc[j];
    for (; i < stop; ++i) {
      const float n = state_step(b2, wg, v, m, g, i);
      const float u = n * (1.0f / (sqrtf(v[i] + a) + e));
      sum += u * u;
    }
    job->partial[c] = sum;
  }
}

static void pass2_chunks(void* ctx, long begin, long end) {
  const job_t* job = ctx;
  for (long k = begin; k < end; ++k) {
    const long c = chunk_of(job, k), b = block_of(job, c);
    long start, stop;
    chunk_range(job, c, b, &start, &stop);
    float* restrict p = job->params[b];
    float* restrict v = job->v[b];
    float* restrict m = job->m ? job->m[b] : NULL;
    float* restrict q = job->q ? job->q[b] : NULL;
    const float* restrict g = job->grads[b];
    const float a = job->a[b], e = job->e[b], s = job->s[b], alpha = job->alpha[b];
    const float d = job->d ? job->d[b] : 1.0f, decay = job->decay, wu = job->wu, b2 = job->b2, wg = job->wg;
    if (job->update_state && !m && q && !job->d) { /* no clip, no gradient EMA, an update EMA not debiased: the
                                                    state update and the update in one loop (a loop over the
                                                    chunk for each cost ~1.4x, 0.93 against 0.65 ns an element
                                                    on a 37.7M block, 1 thread, 2026-12-01) */
      for (long i = start; i < stop; ++i) {
        const float gi = g[i];
        const float vi = b2 * v[i] + (1.0f - b2) * (gi * gi);
        v[i] = vi;
        const float x = (gi * (1.0f / (sqrtf(vi + a) + e))) * s;
        q[i] = lerp_f32(q[i], x, wu);
        p[i] = fmaf(alpha, q[i], p[i] * decay);
      }
      continue;
    }
    if (job->update_state) /* pass 1's state update first, chunk by chunk (it stays in cache) */
      for (long i = start; i < stop; ++i) state_step(b2, wg, v, m, g, i);
    {
      const float* restrict n = m ? m : g;
      if (q && !job->d) /* the AFM setting: the update EMA, not debiased (no division by 1) */
        for (long i = start; i < stop; ++i) {
          const float x = (n[i] * (1.0f / (sqrtf(v[i] + a) + e))) * s;
          q[i] = lerp_f32(q[i], x, wu);
          p[i] = fmaf(alpha, q[i], p[i] * decay);
        }
      else
        for (long i = start; i < stop; ++i) {
          float x = (n[i] * (1.0f / (sqrtf(v[i] + a) + e))) * s;
          if (q) { q[i] = lerp_f32(q[i], x, wu); x = q[i] / d; }
          p[i] = fmaf(alpha, x, p[i] * decay);
        }
    }
  }
}

/* the step counts (float32 scalars, one per block: the optimizer state's "step") advanced by one,
   as torch's add_(1.0) does (exact below 2^24); counts: (n,) out, the new values. Returns the
   common count when every block has the same one, else -1 (blocks whose gradient was missing on
   some steps fall behind). One call for what was a foreach add over n 0-d tensors and a host read
   (~0.1 ms for the tiny model's 46 blocks). */
long mmafm_adastar_count_f32(long n, float* const* steps, long* counts) {
  int same = 1;
  for (long b = 0; b < n; ++b) {
    *steps[b] += 1.0f;
    counts[b] = (long)*steps[b];
    same = same && counts[b] == counts[0];
  }
  return n > 0 && same ? counts[0] : -1;
}

/* first[] for the blocks' sizes; returns the chunk count, or -1 when out of memory */
static long plan_chunks(job_t* job) {
  job->first = malloc((size_t)(job->n + 1) * sizeof(long));
  if (!job->first) return -1;
  long chunks = 0, total = 0;
  for (long b = 0; b < job->n; ++b) {
    job->first[b] = chunks;
    chunks += (job->sizes[b] + CHUNK - 1) / CHUNK;
    total += job->sizes[b];
  }
  job->first[job->n] = chunks;
  return total;
}

/* pass 1; sums: (n,) float64 out. Returns 0, or 1 when out of memory. */
int mmafm_adastar_pass1_f32(long n, const long* sizes, float* const* grads, float* const* v, float* const* m,
                            const float* a, const float* e, float b2, float wg, double* sums, int nthreads) {
  job_t job = {.n = n, .sizes = sizes, .grads = grads, .v = v, .m = m, .a = a, .e = e, .b2 = b2, .wg = wg};
  const long total = plan_chunks(&job);
  if (total < 0) return 1;
  const long chunks = job.first[n];
  job.partial = malloc((size_t)(chunks > 0 ? chunks : 1) * sizeof(float));
  if (!job.partial) { free(job.first); return 1; }
  job.count = chunks;
  pool_run(pass1_chunks, &job, chunks, 1, total < PARALLEL_MIN_TOTAL ? 1 : nthreads);
  for (long b = 0; b < n; ++b) sums[b] = block_sum(&job, b);
  free(job.partial);
  free(job.first);
  return 0;
}

/* pass 2 (update_state: update v and m here, there was no pass 1). Returns 0, or 1 when out of
   memory. */
int mmafm_adastar_pass2_f32(long n, const long* sizes, float* const* params, float* const* grads, float* const* v,
                            float* const* m, float* const* q, const float* a, const float* e, const float* s,
                            const float* d, const float* alpha, float b2, float wg, float wu, float decay,
                            int update_state, int nthreads) {
  job_t job = {.n = n, .sizes = sizes, .params = params, .grads = grads, .v = v, .m = m, .q = q, .a = a, .e = e,
               .s = s, .d = d, .alpha = alpha, .b2 = b2, .wg = wg, .wu = wu, .decay = decay,
               .update_state = update_state};
  const long total = plan_chunks(&job);
  if (total < 0) return 1;
  job.count = job.first[n];
  pool_run(pass2_chunks, &job, job.first[n], 1, total < PARALLEL_MIN_TOTAL ? 1 : nthreads);
  free(job.first);
  return 0;
}

/* the whole step with the RMS clip, for blocks that are not sharded (the RMS is over each block's
   own elements): pass 1, the clip and pass 2 batch by batch, a batch being consecutive blocks of
   at most BATCH elements together (or one larger block). Pass 2 walks the batch's chunks
   backwards: the gradient and v that pass 1 read last are the likeliest to be still in cache.
   base_scales: (n,) the block scales before the clip; threshold: the clip's RMS. Returns 0, or 1
   when out of memory. */
int mmafm_adastar_step_f32(long n, const long* sizes, float* const* params, float* const* grads, float* const* v,
                           float* const* m, float* const* q, const float* a, const float* e,
                           const double* base_scales, double threshold, const float* d, const float* alpha, float b2,
                           float wg, float wu, float decay, int nthreads) {
  job_t job = {.n = n, .sizes = sizes, .params = params, .grads = grads, .v = v, .m = m, .q = q, .a = a, .e = e,
               .d = d, .alpha = alpha, .b2 = b2, .wg = wg, .wu = wu, .decay = decay};
  if (plan_chunks(&job) < 0) return 1;
  const long chunks = job.first[n];
  job.partial = malloc((size_t)(chunks > 0 ? chunks : 1) * sizeof(float));
  float* scales = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
  if (!job.partial || !scales) { free(job.partial); free(scales); free(job.first); return 1; }
  job.s = scales;
  for (long b0 = 0, b1; b0 < n; b0 = b1) {
    long batch = sizes[b0];
    for (b1 = b0 + 1; b1 < n && batch + sizes[b1] <= BATCH; ++b1) batch += sizes[b1];
    const int threads = batch < PARALLEL_MIN_TOTAL ? 1 : nthreads;
    job.chunk0 = job.first[b0];
    job.count = job.first[b1] - job.first[b0];
    job.reverse = 0;
    pool_run(pass1_chunks, &job, job.count, 1, threads);
    for (long b = b0; b < b1; ++b) {  /* u / max(1, rms(u) / threshold), as AdaStar._update_native */
      const double sum = block_sum(&job, b);
      const double clip = sizes[b] ? base_scales[b] * sqrt(sum / (double)sizes[b]) / threshold : 0.0;
      scales[b] = (float)(clip <= 1.0 ? base_scales[b] : base_scales[b] / clip);  /* NaN stays NaN */
    }
    job.reverse = 1;
    pool_run(pass2_chunks, &job, job.count, 1, threads);
  }
  free(scales);
  free(job.partial);
  free(job.first);
  return 0;
}
