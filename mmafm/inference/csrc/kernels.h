/* One storage variant of the decode kernels: included by kernels.c once per storage type, after
   it defines (then undefines)
     WEIGHT_T, LOAD_W(v)            weight element type and its conversion to float32
     CACHE_T, LOAD_C(v), STORE_C(f) K/V-cache element type, its load and its store
     STORAGE_SUFFIX                 f32 or bf16: NAME(mmafm_gemv3) is mmafm_gemv3_<suffix>
   Activations and sums are float32 in every variant. No include guard: included twice. */

#ifndef GEMV_PREFETCH_ROWS
/* weight rows ahead that the first input block of a GEMV prefetches into L2 (locality 1: into L1
   it was slower) [measured, 1 thread, 200 MB of 1536 x 512 weights out of cache, time against one
   row (a decode step): 4 rows 1.04-1.18x with 16 rows ahead, 1.6-2.0x without or into L1; 12 and
   16 rows about as good; a single row (the step itself) unchanged, so it prefetches nothing] */
#define GEMV_PREFETCH_ROWS 16
#endif

/* y[b * ystride] = sum_i x[b * in + i] * wr[i] for the nb (1..4, a constant after inlining) input
   rows of x: one weight row, each element loaded once for all nb rows, nb independent sums in
   flight (a one-row dot product waits on its FMA latency). 16 float32 accumulators per dot product
   (one AVX-512 register, or two AVX2 ones), summed in order, then the tail: the same arithmetic for
   every nb, so results do not depend on the batch. Every multiply-add of the blocked dot products
   and of every tail is an explicit MADD (common.h: fmaf where the target has FMA): left to
   -ffp-contract, the compiler fused some and not others (a tail of 8 vectorized as multiplies,
   then adds), and a row's bits depended on its block. ahead: NULL, or the weights to prefetch
   (the row GEMV_PREFETCH_ROWS on) while this one is computed, so a few tokens (a speculative
   verification chunk) cost about what one does when the weights stream from memory. */
static inline __attribute__((always_inline)) void NAME(dot_rows)(
    const float* restrict x, const WEIGHT_T* restrict wr, const WEIGHT_T* ahead, float* restrict y, long in,
    long ystride, const int nb) {
  float a[4][16] = {{0}};
  long i = 0;
  for (; i + 16 <= in; i += 16) {
    if (ahead) __builtin_prefetch(ahead + i, 0, 1);
    for (int j = 0; j < 16; ++j) {
      const float wv = LOAD_W(wr[i + j]);
      for (int b = 0; b < nb; ++b) a[b][j] = MADD(wv, x[b * in + i + j], a[b][j]);
    }
  }
  for (int b = 0; b < nb; ++b) {
    float s = 0.0f;
    for (int j = 0; j < 16; ++j) s += a[b][j];
    for (long t = i; t < in; ++t) s = MADD(LOAD_W(wr[t]), x[b * in + t], s);
    y[b * ystride] = s;
  }
}

/* NAME(dot_rows) for two weight rows at once (wr and wr + in, results at y[b * ystride] and
   y[b * ystride + 1]): each input element loaded once for both rows, so a few input rows cost
   fewer loads per multiply-add (nb + 2 loads for 2 nb of them, against nb + 1 for nb); each dot
   product is the same arithmetic as NAME(dot_rows)'s (16 accumulators summed in order, then the
   tail), so results do not change */
static inline __attribute__((always_inline)) void NAME(dot_rows2)(
    const float* restrict x, const WEIGHT_T* restrict wr, const WEIGHT_T* ahead, float* restrict y, long in,
    long ystride, const int nb) {
  float a[4][16] = {{0}}, c[4][16] = {{0}};
  const WEIGHT_T* restrict wr1 = wr + in;
  long i = 0;
  for (; i + 16 <= in; i += 16) {
    if (ahead) {
      __builtin_prefetch(ahead + i, 0, 1);
      __builtin_prefetch(ahead + in + i, 0, 1);
    }
    for (int j = 0; j < 16; ++j) {
      const float w0 = LOAD_W(wr[i + j]), w1 = LOAD_W(wr1[i + j]);
      for (int b = 0; b < nb; ++b) {
        const float xv = x[b * in + i + j];
        a[b][j] = MADD(w0, xv, a[b][j]);
        c[b][j] = MADD(w1, xv, c[b][j]);
      }
    }
  }
  for (int b = 0; b < nb; ++b) {
    float s = 0.0f;
    for (int j = 0; j < 16; ++j) s += a[b][j];
    for (long u = i; u < in; ++u) s = MADD(LOAD_W(wr[u]), x[b * in + u], s);
    y[b * ystride] = s;
  }
  for (int b = 0; b < nb; ++b) {
    float t = 0.0f;
    for (int j = 0; j < 16; ++j) t += c[b][j];
    for (long u = i; u < in; ++u) t = MADD(LOAD_W(wr1[u]), x[b * in + u], t);
    y[b * ystride + 1] = t;
  }
}

/* the one-row case of NAME(dot_rows), written out: the same arithmetic (16 accumulators summed in
   order, then the tail). A decode step (batch 1) runs it in a plain loop over the rows, as before
   the multi-row blocks: through the blocked loop (with or without dot_rows) decode measured 15-20%
   slower (bench_text.py --threads 1, interleaved with the previous kernel, 2026-11-30) */
static inline __attribute__((always_inline)) float NAME(dot_row1)(const float* restrict x,
                                                                  const WEIGHT_T* restrict wr, long in) {
  float acc[16] = {0};
  long i = 0;
  for (; i + 16 <= in; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += LOAD_W(wr[i + j]) * x[i + j];
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < in; ++i) s = MADD(LOAD_W(wr[i]), x[i], s);
  return s;
}

/* y[b, o] = sum_i x[b, i] * w[o, i] for b < batch (few rows), written with row stride ystride:
   weight rows in blocks of 4, each block used for all input rows (4 at a time; for 3-4 input rows
   two weight rows at a time, NAME(dot_rows2), then NAME(dot_rows) for an odd one; for 2 input rows
   NAME(dot_rows) one weight row at a time) while it sits in L1; the first input block (nb >= 2)
   prefetches the rows ahead. Two weight rows at a time cut a 3-token verification chunk of the
   trained 13M speculative target (dim 256) from ~1.5 to ~1.3 decode steps (1 thread, interleaved
   with the one-row blocks, 2026-11-30, loaded machine; benchmarks/bench_guided.py); for 2 input
   rows they were slower than one at a time when the weights stream from memory: SmolLM2's chunk of
   2 tokens took 28.8 ms against 23.8 (a step: ~25; 1 thread, 2026-12-01), its 49,152 x 576 head
   ~5.7 against ~5.2 ms */
static __attribute__((noinline)) void NAME(gemv_rows)(const float* restrict x, const WEIGHT_T* restrict w,
                                                        float* restrict y, long batch, long out, long in,
                                                        long ystride);

static void NAME(gemv)(const float* restrict x, const WEIGHT_T* restrict w, float* restrict y,
                     long batch, long out, long in, long ystride) {
  if (batch == 1) {  /* a decode step: its own plain loop (see NAME(dot_row1)) */
    for (long o = 0; o < out; ++o) y[o] = NAME(dot_row1)(x, w + o * in, in);
    return;
  }
  NAME(gemv_rows)(x, w, y, batch, out, in, ystride);
}

/* NAME(gemv) for batch >= 2, out of line: the decode step's code stays what it was */
static __attribute__((noinline)) void NAME(gemv_rows)(const float* restrict x, const WEIGHT_T* restrict w,
                                                        float* restrict y, long batch, long out, long in,
                                                        long ystride) {
  for (long o0 = 0; o0 < out; o0 += 4) {
    const long rows = out - o0 < 4 ? out - o0 : 4;
    for (long b = 0; b < batch; b += 4) {
      const float* xb = x + b * in;
      float* yb = y + b * ystride + o0;
      const long nb = batch - b < 4 ? batch - b : 4;
      long r = 0;
      for (; nb > 2 && r + 2 <= rows; r += 2) {  /* two weight rows at a time (NAME(dot_rows2)), 3-4 inputs */
        const WEIGHT_T* wr = w + (o0 + r) * in;
        const WEIGHT_T* ahead = b == 0 && o0 + r + 1 + GEMV_PREFETCH_ROWS < out ? wr + GEMV_PREFETCH_ROWS * in : NULL;
        switch (nb) {
          case 3: NAME(dot_rows2)(xb, wr, ahead, yb + r, in, ystride, 3); break;
          default: NAME(dot_rows2)(xb, wr, ahead, yb + r, in, ystride, 4); break;
        }
      }
      for (; r < rows; ++r) {
        const WEIGHT_T* wr = w + (o0 + r) * in;
        const WEIGHT_T* ahead = b == 0 && o0 + r + GEMV_PREFETCH_ROWS < out ? wr + GEMV_PREFETCH_ROWS * in : NULL;
        switch (nb) {  /* a constant nb per call: each its own unrolled loop */
          case 1: yb[r] = NAME(dot_row1)(xb, wr, in); break;
          case 2: NAME(dot_rows)(xb, wr, ahead, yb + r, in, ystride, 2); break;
          case 3: NAME(dot_rows)(xb, wr, ahead, yb + r, in, ystride, 3); break;
          default: NAME(dot_rows)(xb, wr, ahead, yb + r, in, ystride, 4); break;
        }
      }
    }
  }
}

/* mmafm_gemv3's work for the pool: its output columns, the three weights' rows end to end */
typedef struct {
  const float* x;
  const WEIGHT_T* w[3];
  float* y;
  long out[3], batch, in, stride;
} NAME(gemv3_job);

static void NAME(gemv3_rows)(void* ctx, long begin, long end) {  /* output columns [begin, end) */
  const NAME(gemv3_job)* job = ctx;
  long offset = 0;
  for (int k = 0; k < 3; offset += job->out[k], ++k) {
    const long lo = begin > offset ? begin : offset;
    const long hi = end < offset + job->out[k] ? end : offset + job->out[k];
    if (lo < hi)
      NAME(gemv)(job->x, job->w[k] + (lo - offset) * job->in, job->y + lo, job->batch, hi - lo, job->in, job->stride);
  }
}

/* up to three weights sharing one input (Q/K/V, gate/up): y = [x w0^T | x w1^T | x w2^T]; weights
   of >= PARALLEL_MIN_ELEMENTS in all are split over nthreads threads (pool.h) in chunks of rows */
void NAME(mmafm_gemv3)(const float* x, const WEIGHT_T* w0, const WEIGHT_T* w1, const WEIGHT_T* w2, float* y,
                     long batch, long out0, long out1, long out2, long in, int nthreads) {
  NAME(gemv3_job) job = {x, {w0, w1, w2}, y, {out0, out1, out2}, batch, in, out0 + out1 + out2};
  if (nthreads <= 1 || job.stride * in < PARALLEL_MIN_ELEMENTS) {
    NAME(gemv3_rows)(&job, 0, job.stride);
    return;
  }
  long grain = gemv_grain(job.stride, in * (long)sizeof(WEIGHT_T), nthreads);
  if (batch > 1) {
    /* the multi-row GEMV prefetches GEMV_PREFETCH_ROWS rows ahead within its chunk, so a chunk's
       first rows come unprefetched (from memory, on this AMD CPU, at about half the speed: its
       hardware prefetcher does not follow the interleaved rows of NAME(dot_rows2)); chunks of at
       least 8 x that many rows (or an even share) keep those few. A 3-row GEMV over SmolLM2's
       49,152 x 576 head at 2 threads took 5.25 ms with the plain grain (32 rows), 3.56 with this
       (1 thread: 4.8-5.2; 2026-12-01) */
    long wide = 8L * GEMV_PREFETCH_ROWS;
    const long even = (job.stride / nthreads + 3) / 4 * 4;
    if (wide > even) wide = even;
    if (grain < wide) grain = wide;
  }
  pool_run(NAME(gemv3_rows), &job, job.stride, grain, nthreads);
}

/* single-query attention of the `group` query heads (rows of q and o, head_dim wide) that share
   one KV head, over keys [0, keys) of a K/V cache view: each K and V row is read once for the whole
   group. scores: group x keys scratch; valid: NULL or one byte per key column (0 = padding). */
static void NAME(attend_group)(const float* restrict q, const CACHE_T* restrict kh, const CACHE_T* restrict vh,
                             float* restrict o, float* restrict scores, long group, long keys, long dim,
                             float scale, const unsigned char* restrict valid) {
  for (long t = 0; t < keys; ++t) {
    const CACHE_T* kt = kh + t * dim;
    for (long g = 0; g < group; ++g) {
      if (valid && !valid[t]) { scores[g * keys + t] = -INFINITY; continue; }
      const float* qg = q + g * dim;
      float acc[16] = {0};  /* 16 lanes so the dot product vectorises without -ffast-math */
      long d = 0;
      for (; d + 16 <= dim; d += 16)
        for (int j = 0; j < 16; ++j) acc[j] += qg[d + j] * LOAD_C(kt[d + j]);
      float dot = 0.0f;
      for (int j = 0; j < 16; ++j) dot += acc[j];
      for (; d < dim; ++d) dot += qg[d] * LOAD_C(kt[d]);
      scores[g * keys + t] = dot * scale;
    }
  }
  for (long g = 0; g < group; ++g) {
    float* sg = scores + g * keys;
    float best = -INFINITY, total = 0.0f;
    for (long t = 0; t < keys; ++t) best = sg[t] > best ? sg[t] : best;
    for (long t = 0; t < keys; ++t) {
      sg[t] = expf(sg[t] - best);  /* exp(-inf) = 0 for padding */
      total += sg[t];
    }
    for (long t = 0; t < keys; ++t) sg[t] /= total;
    for (long d = 0; d < dim; ++d) o[g * dim + d] = 0.0f;
  }
  for (long t = 0; t < keys; ++t) {
    const CACHE_T* vt = vh + t * dim;
    for (long g = 0; g < group; ++g) {
      const float weight = scores[g * keys + t];
      if (weight == 0.0f) continue;
      float* og = o + g * dim;
      for (long d = 0; d < dim; ++d) og[d] += weight * LOAD_C(vt[d]);
    }
  }
}

/* the attention of mmafm_attention_decode for the pool: one item per (row, KV head) pair */
typedef struct {
  const float* qkv;
  const CACHE_T *k_cache, *v_cache;
  float *att, *scores;
  const unsigned char* valid;
  long valid_stride, kv_batch_stride, kv_head_stride, qkv_width, heads, kv_heads, group, keys, head_dim, chunk;
  float scale;
} NAME(attention_job);

static void NAME(attend_pairs)(void* ctx, long begin, long end) {
  const NAME(attention_job)* j = ctx;
  const long most_keys = j->keys + j->chunk - 1;
  for (long p = begin; p < end; ++p) {  /* one (row, KV head) and its group of query heads */
    const long b = p / j->kv_heads, h = p % j->kv_heads;
    const long c = b / j->chunk;  /* the cache row; the row is token b % chunk of its chunk */
    const long kv_at = c * j->kv_batch_stride + h * j->kv_head_stride;
    NAME(attend_group)(j->qkv + b * j->qkv_width + h * j->group * j->head_dim, j->k_cache + kv_at,
                     j->v_cache + kv_at, j->att + (b * j->heads + h * j->group) * j->head_dim,
                     j->scores + p * j->group * most_keys, j->group, j->keys + b % j->chunk, j->head_dim,
                     j->scale, j->valid ? j->valid + c * j->valid_stride : NULL);
  }
}

/* y = x + o_proj(attention(rope(qk_norm(q, k)), v)) of x_norm = rms_norm(x): the attention half of a
   pre-norm decoder layer for one new token per row. With wk == NULL the layer shares K/V: it reads
   keys [0, keys) of k_cache / v_cache and writes nothing; otherwise its new K/V go to cache slot
   write_slot first (so keys includes them). Caches are (batch, kv_heads, slots, head_dim) with
   unit inner strides. cos, sin: (batch, head_dim) or NULL (no RoPE); q_norm_w, k_norm_w: NULL
   without QK-norm; valid: NULL or (batch, valid_stride) bytes per key column. Returns 0, or 1 when
   out of memory (y untouched). chunk (attention_rows only; 1 in mmafm_attention_decode): rows
   come in chunks of `chunk` consecutive tokens of one cache row (cache row b / chunk, valid row
   b / chunk): row b writes slot write_slot + b % chunk and attends over keys + b % chunk keys, so
   each token of a chunk sees the ones before it (all new K/V are written before any attention). */
static int NAME(attention_rows)(
    const float* restrict x, float* restrict y, const float* norm_w, float eps,
    const WEIGHT_T* wq, const WEIGHT_T* wk, const WEIGHT_T* wv, const WEIGHT_T* wo,
    const float* q_norm_w, const float* k_norm_w, const float* cos, const float* sin,
    CACHE_T* k_cache, CACHE_T* v_cache, long kv_batch_stride, long kv_head_stride, long write_slot, long keys,
    const unsigned char* valid, long valid_stride,
    long batch, long dim, long heads, long kv_heads, long head_dim, long chunk, const lora_step_t* lora,
    int nthreads) {
  const long q_width = heads * head_dim, kv_width = wk ? kv_heads * head_dim : 0;
  const long qkv_width = q_width + 2 * kv_width;
  const long most_keys = keys + chunk - 1;
  float* xn = malloc(sizeof(float) * batch * (dim + qkv_width + q_width + dim + head_dim));
  float* scores = malloc(sizeof(float) * batch * heads * (most_keys > 0 ? most_keys : 1));
  if (!xn || !scores) { free(xn); free(scores); return 1; }
  float* qkv = xn + batch * dim;        /* (batch, q | k | v) */
  float* att = qkv + batch * qkv_width; /* (batch, heads, head_dim) */
  float* out = att + batch * q_width;   /* (batch, dim) */
  float* tmp = out + batch * dim;       /* (head_dim) */
  mmafm_rms_norm_f32(x, norm_w, xn, batch, dim, eps);
  NAME(mmafm_gemv3)(xn, wq, wk, wv, qkv, batch, q_width, kv_width, kv_width, dim, nthreads);
  if (lora) {  /* a mixed-adapter step (lora.c): each row's adapter on Q/K/V */
    lora_add(lora, MMAFM_LORA_WQ, xn, dim, qkv, qkv_width, batch, dim, q_width, nthreads);
    if (wk) {
      lora_add(lora, MMAFM_LORA_WK, xn, dim, qkv + q_width, qkv_width, batch, dim, kv_width, nthreads);
      lora_add(lora, MMAFM_LORA_WV, xn, dim, qkv + q_width + kv_width, qkv_width, batch, dim, kv_width, nthreads);
    }
  }
  for (long b = 0; b < batch; ++b) {
    float* row = qkv + b * qkv_width;
    const float* cb = cos ? cos + b * head_dim : NULL;
    const float* sb = sin ? sin + b * head_dim : NULL;
    norm_rope_heads(row, heads, head_dim, q_norm_w, eps, cb, sb, tmp);
    if (!wk) continue;
    norm_rope_heads(row + q_width, kv_heads, head_dim, k_norm_w, eps, cb, sb, tmp);
    for (long h = 0; h < kv_heads; ++h) {
      const long at = (b / chunk) * kv_batch_stride + h * kv_head_stride + (write_slot + b % chunk) * head_dim;
      for (long d = 0; d < head_dim; ++d) {
        k_cache[at + d] = STORE_C(row[q_width + h * head_dim + d]);
        v_cache[at + d] = STORE_C(row[q_width + kv_width + h * head_dim + d]);
      }
    }
  }
  const long group = heads / kv_heads, pairs = batch * kv_heads;
  NAME(attention_job) job = {qkv, k_cache, v_cache, att, scores, valid, valid_stride, kv_batch_stride,
                             kv_head_stride, qkv_width, heads, kv_heads, group, keys, head_dim, chunk,
                             1.0f / sqrtf((float)head_dim)};
  if (nthreads > 1 && pairs > 1 && pairs * group * keys * head_dim >= 65536L)
    pool_run(NAME(attend_pairs), &job, pairs, 1, nthreads);
  else
    NAME(attend_pairs)(&job, 0, pairs);
  NAME(mmafm_gemv3)(att, wo, NULL, NULL, out, batch, dim, 0, 0, q_width, nthreads);
  if (lora) lora_add(lora, MMAFM_LORA_WO, att, q_width, out, dim, batch, q_width, dim, nthreads);
  for (long i = 0; i < batch * dim; ++i) y[i] = x[i] + out[i];
  free(xn);
  free(scores);
  return 0;
}

int NAME(mmafm_attention_decode)(
    const float* restrict x, float* restrict y, const float* norm_w, float eps,
    const WEIGHT_T* wq, const WEIGHT_T* wk, const WEIGHT_T* wv, const WEIGHT_T* wo,
    const float* q_norm_w, const float* k_norm_w, const float* cos, const float* sin,
    CACHE_T* k_cache, CACHE_T* v_cache, long kv_batch_stride, long kv_head_stride, long write_slot, long keys,
    const unsigned char* valid, long valid_stride,
    long batch, long dim, long heads, long kv_heads, long head_dim, int nthreads) {
  return NAME(attention_rows)(x, y, norm_w, eps, wq, wk, wv, wo, q_norm_w, k_norm_w, cos, sin, k_cache, v_cache,
                              kv_batch_stride, kv_head_stride, write_slot, keys, valid, valid_stride, batch, dim,
                              heads, kv_heads, head_dim, 1, NULL, nthreads);
}

/* x += w_down(silu(w_gate x_norm) * w_up x_norm), x_norm = rms_norm(x): the SwiGLU half of a
   pre-norm decoder layer, in place on (batch, dim). Returns 0, or 1 when out of memory. */
static int NAME(swiglu_rows)(float* x, const float* norm_w, float eps, const WEIGHT_T* w_gate,
                            const WEIGHT_T* w_up, const WEIGHT_T* w_down, long batch, long dim, long hidden,
                            const lora_step_t* lora, int nthreads) {
  float* xn = malloc(sizeof(float) * batch * (dim + 2 * hidden + hidden + dim));
  if (!xn) return 1;
  float* gate_up = xn + batch * dim;          /* (batch, gate | up) */
  float* act = gate_up + batch * 2 * hidden;  /* (batch, hidden) */
  float* out = act + batch * hidden;          /* (batch, dim) */
  mmafm_rms_norm_f32(x, norm_w, xn, batch, dim, eps);
  NAME(mmafm_gemv3)(xn, w_gate, w_up, NULL, gate_up, batch, hidden, hidden, 0, dim, nthreads);
  if (lora) {  /* a mixed-adapter step (lora.c): each row's adapter on gate/up */
    lora_add(lora, MMAFM_LORA_W_GATE, xn, dim, gate_up, 2 * hidden, batch, dim, hidden, nthreads);
    lora_add(lora, MMAFM_LORA_W_UP, xn, dim, gate_up + hidden, 2 * hidden, batch, dim, hidden, nthreads);
  }
  for (long b = 0; b < batch; ++b)
    for (long i = 0; i < hidden; ++i) {
      const float g = gate_up[b * 2 * hidden + i];
      act[b * hidden + i] = g / (1.0f + expf(-g)) * gate_up[b * 2 * hidden + hidden + i];
    }
  NAME(mmafm_gemv3)(act, w_down, NULL, NULL, out, batch, dim, 0, 0, hidden, nthreads);
  if (lora) lora_add(lora, MMAFM_LORA_W_DOWN, act, hidden, out, dim, batch, hidden, dim, nthreads);
  for (long i = 0; i < batch * dim; ++i) x[i] += out[i];
  free(xn);
  return 0;
}

int NAME(mmafm_swiglu_decode)(float* x, const float* norm_w, float eps, const WEIGHT_T* w_gate,
                            const WEIGHT_T* w_up, const WEIGHT_T* w_down, long batch, long dim, long hidden,
                            int nthreads) {
  return NAME(swiglu_rows)(x, norm_w, eps, w_gate, w_up, w_down, batch, dim, hidden, NULL, nthreads);
}

/* logits (batch, vocab) of one new token per row: embed, every layer (attention half, SwiGLU
   half), final RMSNorm, output head. column: the cache column of the new tokens (the K/V go there,
   or to column % slots in a ring); positions (batch,): their RoPE positions, rows of cos_table /
   sin_table (max_position, head_dim); valid: NULL or (batch, valid_stride) bytes, 0 = padding
   column (only with linear caches). Returns 0; 1 out of memory (this column of the cache may be
   part written); 2 a token outside the vocabulary or a position outside the table (nothing
   written). lora: NULL, or the adapters of a mixed-adapter batch (lora.c; 2 when they do not
   check out, nothing written). */
static int NAME(decode_rows)(
    const long* tokens, const WEIGHT_T* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, long chunk, const unsigned char* valid,
    long valid_stride, const mmafm_layer_t* layers, long n_layers, const float* final_norm, const WEIGHT_T* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    const mmafm_lora_t* lora, int nthreads) {
  if (chunk < 1 || batch % chunk) return 2;
  for (long b = 0; b < batch; ++b)
    if (tokens[b] < 0 || tokens[b] >= vocab || positions[b] < 0 || positions[b] >= max_position) return 2;
  for (long l = 0; l < n_layers && chunk > 1; ++l)  /* chunks: linear caches with room for them */
    if (layers[l].ring || column + chunk > layers[l].slots) return 2;
  long* lora_slots = NULL;  /* (batch,) each row's slot */
  float* lora_low = NULL;   /* (batch, LORA_MAX_RANK) scratch */
  if (lora) {
    lora_slots = malloc(sizeof(long) * batch);
    lora_low = malloc(sizeof(float) * batch * LORA_MAX_RANK);
    if (!lora_slots || !lora_low) { free(lora_slots); free(lora_low); return 1; }
    if (lora_rows(lora, n_layers, batch, chunk, lora_slots)) { free(lora_slots); free(lora_low); return 2; }
  }
  float* block = malloc(sizeof(float) * batch * (3 * dim + 2 * head_dim));
  if (!block) { free(lora_slots); free(lora_low); return 1; }
  float* x = block;  /* the residual stream, ping-ponged with y */
  float* y = x + batch * dim;
  float* xn = y + batch * dim;
  float* cos = xn + batch * dim;  /* (batch, head_dim) rows of this step's positions */
  float* sin = cos + batch * head_dim;
  for (long b = 0; b < batch; ++b) {
    for (long i = 0; i < dim; ++i) x[b * dim + i] = LOAD_W(embed[tokens[b] * dim + i]);
    for (long d = 0; d < head_dim; ++d) {
      cos[b * head_dim + d] = cos_table[positions[b] * head_dim + d];
      sin[b * head_dim + d] = sin_table[positions[b] * head_dim + d];
    }
  }
  int failed = 0;
  for (long l = 0; l < n_layers && !failed; ++l) {
    const mmafm_layer_t* L = layers + l;
    const long num_keys = L->ring ? (column + 1 < L->slots ? column + 1 : L->slots) : column + 1;
    const long slot = L->ring ? column % L->slots : column;
    const lora_step_t lora_layer = {lora ? lora->layers[l].m : NULL, lora_slots, lora ? lora->slots : 0, lora_low};
    const lora_step_t* adapters = lora ? &lora_layer : NULL;
    failed = NAME(attention_rows)(
        x, y, L->attn_norm, eps, L->wq, L->wk, L->wv, L->wo, L->q_norm, L->k_norm,
        L->rope ? cos : NULL, L->rope ? sin : NULL, L->k_cache, L->v_cache, L->kv_batch_stride,
        L->kv_head_stride, slot, num_keys, L->ring ? NULL : valid, valid_stride,
        batch, dim, heads, kv_heads, head_dim, chunk, adapters, nthreads);
    if (!failed)
      failed = NAME(swiglu_rows)(y, L->ffn_norm, eps, L->w_gate, L->w_up, L->w_down, batch, dim, L->hidden,
                                 adapters, nthreads);
    float* swap = x; x = y; y = swap;
  }
  if (!failed) {
    mmafm_rms_norm_f32(x, final_norm, xn, batch, dim, eps);
    NAME(mmafm_gemv3)(xn, head, NULL, NULL, logits, batch, vocab, 0, 0, dim, nthreads);
  }
  free(block);
  free(lora_slots);
  free(lora_low);
  return failed;
}

int NAME(mmafm_decode_step)(
    const long* tokens, const WEIGHT_T* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, const unsigned char* valid, long valid_stride,
    const mmafm_layer_t* layers, long n_layers, const float* final_norm, const WEIGHT_T* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    int nthreads) {
  return NAME(decode_rows)(tokens, embed, positions, cos_table, sin_table, max_position, column, 1, valid,
                           valid_stride, layers, n_layers, final_norm, head, logits, batch, dim, heads, kv_heads,
                           head_dim, vocab, eps, NULL, nthreads);
}

/* mmafm_decode_step over `chunk` new tokens per cache row (speculative verification: the last
   token and the draft's proposals in one call): rows b of the batch are token b % chunk of cache
   row b / chunk, at column column + b % chunk, causal within the chunk (attention_rows). Linear
   caches only, with room for the chunk (else 2, nothing written); valid is per cache row. */
int NAME(mmafm_decode_chunk)(
    const long* tokens, const WEIGHT_T* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, long chunk, const unsigned char* valid,
    long valid_stride, const mmafm_layer_t* layers, long n_layers, const float* final_norm, const WEIGHT_T* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    int nthreads) {
  return NAME(decode_rows)(tokens, embed, positions, cos_table, sin_table, max_position, column, chunk, valid,
                           valid_stride, layers, n_layers, final_norm, head, logits, batch, dim, heads, kv_heads,
                           head_dim, vocab, eps, NULL, nthreads);
}

/* mmafm_decode_step / mmafm_decode_chunk with the adapters of a mixed-adapter batch (lora.c) */
int NAME(mmafm_lora_decode_step)(
    const long* tokens, const WEIGHT_T* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, const unsigned char* valid, long valid_stride,
    const mmafm_layer_t* layers, long n_layers, const float* final_norm, const WEIGHT_T* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    const mmafm_lora_t* lora, int nthreads) {
  if (!lora) return 2;
  return NAME(decode_rows)(tokens, embed, positions, cos_table, sin_table, max_position, column, 1, valid,
                           valid_stride, layers, n_layers, final_norm, head, logits, batch, dim, heads, kv_heads,
                           head_dim, vocab, eps, lora, nthreads);
}

int NAME(mmafm_lora_decode_chunk)(
    const long* tokens, const WEIGHT_T* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, long chunk, const unsigned char* valid,
    long valid_stride, const mmafm_layer_t* layers, long n_layers, const float* final_norm, const WEIGHT_T* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    const mmafm_lora_t* lora, int nthreads) {
  if (!lora) return 2;
  return NAME(decode_rows)(tokens, embed, positions, cos_table, sin_table, max_position, column, chunk, valid,
                           valid_stride, layers, n_layers, final_norm, head, logits, batch, dim, heads, kv_heads,
                           head_dim, vocab, eps, lora, nthreads);
}

/* the storage macros are per inclusion: the next one defines its own */
#undef WEIGHT_T
#undef LOAD_W
#undef CACHE_T
#undef LOAD_C
#undef STORE_C
#undef STORAGE_SUFFIX
