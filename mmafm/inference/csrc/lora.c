/* LoRA terms of a mixed-adapter decode step (mmafm.lora, mmafm/layers/lora.py): for every row r
   whose adapter slot is s = row_slot[r] >= 0, an adapted projection y = x W^T adds

       y[r] += scale[s] * B_s (A_s x[r])      A_s (rank, in), B_s (out, rank), all slots stacked

   and a row with slot -1 adds nothing (the step holds B transposed, Bt_s (rank, out), so the up
   projection sums 16 outputs per vector instruction). Included once by kernels.c before the storage variants of
   kernels.h, whose attention and SwiGLU halves call lora_add after each base GEMV when the step
   carries adapters (mmafm_lora_decode_step_*); without them that code is not reached, so the
   plain step is unchanged. The factors are float32 in every variant (a bfloat16 model's are
   converted once when the step is built: exact, and a few MB; B is transposed then, a copy). */

#define LORA_MAX_RANK 256 /* the largest slot rank a step takes (the reports use 16 and 32) */

/* one layer's adapters during a step: its matrices, each batch row's slot, scratch */
typedef struct {
  const mmafm_lora_matrix_t* m; /* [MMAFM_LORA_WQ .. MMAFM_LORA_W_DOWN] */
  const long* row_slot;         /* (batch,) slot of each batch row, -1 = none */
  long slots;
  float* low;                   /* (batch, LORA_MAX_RANK) scratch: scale * A_s x[r] */
} lora_step_t;

/* out[k] = a_k . b for the na (1..4, a constant after inlining) rows a_k = a + k * n: the 16-lane
   dot product of the GEMV (vectorises without -ffast-math), na of them in flight at once (one
   alone waits on its FMA latency); each summed in the same order whatever na */
static inline __attribute__((always_inline)) void lora_dots(const float* restrict a, const float* restrict b,
                                                            long n, const int na, float* restrict out) {
  float acc[4][16] = {{0}};
  long i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j)
      for (int k = 0; k < na; ++k) acc[k][j] += a[k * n + i + j] * b[i + j];
  for (int k = 0; k < na; ++k) {
    float s = 0.0f;
    for (int j = 0; j < 16; ++j) s += acc[k][j];
    for (long t = i; t < n; ++t) s += a[k * n + t] * b[t];
    out[k] = s;
  }
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
   for the rows r of slot s, so each row of A_s is read once for all its rows; up to 4 rows of A_s
   (consecutive items of one slot) at a time */
static void lora_down(void* ctx, long begin, long end) {
  const lora_job_t* job = ctx;
  const lora_step_t* L = job->L;
  const long rank = job->m->rank, in = job->in;
  for (long item = begin; item < end;) {
    const long s = item / rank, j = item % rank;
    long na = end - item < 4 ? end - item : 4;
    if (na > rank - j) na = rank - j; /* within slot s */
    const float* a = job->m->A + (s * rank + j) * in;
    for (long r = 0; r < job->batch; ++r) {
      if (L->row_slot[r] != s) continue;
      float dots[4];
      const float* x = job->x + r * job->xstride;
      switch (na) {
        case 1: lora_dots(a, x, in, 1, dots); break;
        case 2: lora_dots(a, x, in, 2, dots); break;
        case 3: lora_dots(a, x, in, 3, dots); break;
        default: lora_dots(a, x, in, 4, dots); break;
      }
      for (long k = 0; k < na; ++k) L->low[r * rank + j + k] = job->m->scale[s] * dots[k];
    }
    item += na;
  }
}

#define LORA_UP_BLOCK 64 /* outputs per block of lora_up: four 16-lane vectors of sums */

/* the up projections, outputs o in [begin, end): y[r, o] += B_s[o] . low[r] for each adapted row,
   with B held transposed, Bt_s (rank, out): per row and block of outputs, the sums over j = 0 ..
   rank - 1 in order, each a multiple of one contiguous row of Bt_s, so 16 outputs share each
   vector instruction (a dot product of length rank per output would spend most of its time
   reducing its lanes). Each (row, output) sum has one fixed order whatever the block or thread. */
static void lora_up(void* ctx, long begin, long end) {
  const lora_job_t* job = ctx;
  const lora_step_t* L = job->L;
  const long rank = job->m->rank;
  for (long r = 0; r < job->batch; ++r) {
    const long s = L->row_slot[r];
    if (s < 0) continue;
    const float* low = L->low + r * rank;
    const float* bt = job->m->B + s * rank * job->out; /* (rank, out) */
    float* y = job->y + r * job->ystride;
    for (long o0 = begin; o0 < end; o0 += LORA_UP_BLOCK) {
      const long n = end - o0 < LORA_UP_BLOCK ? end - o0 : LORA_UP_BLOCK;
      float acc[LORA_UP_BLOCK] = {0};
      if (n == LORA_UP_BLOCK)
        for (long j = 0; j < rank; ++j)
          for (int k = 0; k < LORA_UP_BLOCK; ++k) acc[k] += low[j] * bt[j * job->out + o0 + k];
      else
        for (long j = 0; j < rank; ++j)
          for (long k = 0; k < n; ++k) acc[k] += low[j] * bt[j * job->out + o0 + k];
      for (long k = 0; k < n; ++k) y[o0 + k] += acc[k];
    }
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
