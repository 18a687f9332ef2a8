/* LoRA terms of a mixed-adapter decode step (mmafm.lora, mmafm/layers/lora.py): for every row r
   whose adapter slot is s = row_slot[r] >= 0, an adapted projection y = x W^T adds

       y[r] += scale[s] * B_s (A_s x[r])      A_s (rank, in), B_s (out, rank), all slots stacked

   and a row with slot -1 adds nothing. Included once by kernels.c before the storage variants of
   kernels.h, whose attention and SwiGLU halves call lora_add after each base GEMV when the step
   carries adapters (mmafm_lora_decode_step_*); without them that code is not reached, so the
   plain step is unchanged. The factors are float32 in every variant (a bfloat16 model's are
   converted once when the step is built: exact, and a few MB). */

#define LORA_MAX_RANK 256 /* the largest slot rank a step takes (the reports use 16 and 32) */

/* one layer's adapters during a step: its matrices, each batch row's slot, scratch */
typedef struct {
  const mmafm_lora_matrix_t* m; /* [MMAFM_LORA_WQ .. MMAFM_LORA_W_DOWN] */
  const long* row_slot;         /* (batch,) slot of each batch row, -1 = none */
  long slots;
  float* low;                   /* (batch, LORA_MAX_RANK) scratch: scale * A_s x[r] */
} lora_step_t;

/* the 16-lane dot product of the GEMV (vectorises without -ffast-math) */
static float lora_dot(const float* restrict a, const float* restrict b, long n) {
  float acc[16] = {0};
  long i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

/* one lora_add for the pool: the matrix, its input and output rows */
typedef struct {
  const lora_step_t* L;
  const mmafm_lora_matrix_t* m;
  const float* x;
  float* y;
  long xstride, ystride, batch, in, out;
} lora_job_t;

/* the down projections, items (slot s, rank j) in [begin, end): low[r, j] = scale[s] A_s[j] . x[r]
   for the rows r of slot s, so each row of A_s is read once for all its rows */
static void lora_down(void* ctx, long begin, long end) {
  const lora_job_t* job = ctx;
  const lora_step_t* L = job->L;
  const long rank = job->m->rank;
  for (long item = begin; item < end; ++item) {
    const long s = item / rank, j = item % rank;
    const float* a = job->m->A + (s * rank + j) * job->in;
    for (long r = 0; r < job->batch; ++r)
      if (L->row_slot[r] == s)
        L->low[r * rank + j] = job->m->scale[s] * lora_dot(a, job->x + r * job->xstride, job->in);
  }
}

/* the up projections, outputs o in [begin, end): y[r, o] += B_s[o] . low[r] for each adapted row */
static void lora_up(void* ctx, long begin, long end) {
  const lora_job_t* job = ctx;
  const lora_step_t* L = job->L;
  const long rank = job->m->rank;
  for (long o = begin; o < end; ++o)
    for (long r = 0; r < job->batch; ++r) {
      const long s = L->row_slot[r];
      if (s >= 0)
        job->y[r * job->ystride + o] += lora_dot(job->m->B + (s * job->out + o) * rank, L->low + r * rank, rank);
    }
}

/* y[r, :out] += scale[s] * B_s (A_s x[r, :in]) for rows r < batch with s = row_slot[r] >= 0
   (x rows xstride apart, y rows ystride apart), for matrix `which` of the layer: the down
   projections of every slot (those of slots no row uses are skipped), then the up projections,
   each split over nthreads threads (pool.h) when its factors have >= PARALLEL_MIN_ELEMENTS.
   Every (row, output) sum has one fixed order, so results depend neither on the other rows nor
   on the thread count. A == NULL: the projection has no adapter. */
static void lora_add(const lora_step_t* L, int which, const float* x, long xstride, float* y, long ystride,
                     long batch, long in, long out, int nthreads) {
  const mmafm_lora_matrix_t* m = L->m + which;
  if (!m->A) return;
  const long rank = m->rank, items = L->slots * rank;
  lora_job_t job = {L, m, x, y, xstride, ystride, batch, in, out};
  if (nthreads <= 1 || items * in < PARALLEL_MIN_ELEMENTS)
    lora_down(&job, 0, items);
  else
    pool_run(lora_down, &job, items, gemv_grain(items, in * (long)sizeof(float), nthreads), nthreads);
  if (nthreads <= 1 || items * out < PARALLEL_MIN_ELEMENTS)
    lora_up(&job, 0, out);
  else
    pool_run(lora_up, &job, out, gemv_grain(out, items * (long)sizeof(float), nthreads), nthreads);
}

/* each batch row's slot (row b is cache row b / chunk) into row_slot, checked: 1 when a slot is
   outside [-1, slots) or a matrix's rank outside [1, LORA_MAX_RANK] (nothing computed then) */
static int lora_rows(const mmafm_lora_t* lora, long n_layers, long batch, long chunk, long* row_slot) {
  for (long b = 0; b < batch; ++b) {
    row_slot[b] = lora->row_slot[b / chunk];
    if (row_slot[b] < -1 || row_slot[b] >= lora->slots) return 1;
  }
  for (long l = 0; l < n_layers; ++l)
    for (int k = 0; k < MMAFM_LORA_MATRICES; ++k) {
      const mmafm_lora_matrix_t* m = lora->layers[l].m + k;
      if (m->A && (m->rank < 1 || m->rank > LORA_MAX_RANK || !m->B || !m->scale)) return 1;
    }
  return 0;
}
