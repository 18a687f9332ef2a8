/* Packed low-bit weights for compressed models (mmafm/compress/packed.py): a GEMV that reads codes
   and lookup tables directly, and a whole decode step over such weights.

     y[b, o] = scale[o] * sum_i table[o / group_rows][code(o, i)] * x[b, i]     for b < batch (few rows)

   Codes are packed per weight row, lowest bits first (4-bit: the low nibble holds the even
   column; 2-bit: bits 0-1 hold column 4j), code_stride bytes per row; table holds 2^bits float32
   entries per group of group_rows rows (1: a table per row); scale is NULL (1) or one float per
   row (the uniform scheme: a shared grid times a row scale). The weights are never written out as
   floats: a decode step reads 4 (2) bits per weight instead of 32. With AVX-512, 16 weights at a
   time go from codes to table entries in registers without any unpacking shuffle:

   - 4 bits: the row's next 8 bytes (16 codes) are broadcast to every 64-bit lane and each 32-bit
     lane shifted right by 4m (lanes 2m and 2m+1), so lane 2m holds code m and lane 2m+1 code 8+m
     in its low 4 bits, which is all vpermps reads of an index: one vpermps looks the 16 up in
     the 16-entry table held in a register. The input x is permuted once per call to that lane
     order (x is shared by every row), so the FMA needs no shuffle either;
   - 2 bits: 4 bytes broadcast to 32-bit lanes, lane j shifted by 2j; the 4-entry table repeated
     4 times fills the register, so the 2 bits above a code do not matter;
   - 8 bits: a gather from the 256-entry table.
   Four rows are processed together (four independent FMA chains sharing each load of x). With
   AVX2 only, 8 weights at a time in natural column order (lut_weights8_avx2); other CPUs take the
   scalar loop.

   Rows are split over the kernels' thread pool (pool.h), as the float GEMV's. mmafm_lut_decode_chunk
   runs a whole decode step (embedding, every layer, head) of a dense decoder whose matrices are
   each packed or float32 (mmafm_matrix_t), in one call, for one or several consecutive tokens
   per cache row (a step; a packed prompt's prefill or a draft's catch-up): no Python
   or torch op between the GEMVs, so the pool's threads never compete with torch's OpenMP team,
   and Q/K/V (gate/up), which read
   the same input, are one GEMV over their rows end to end. Included at the end of kernels.c (one
   translation unit, one pool; it calls the float32 variant's static GEMV and attention). */
#include "common.h"

/* code bytes per chunk a thread claims, at least (then capped at a quarter of a thread's share):
   each chunk restarts the hardware prefetcher's stream, so small ones starve it. SmolLM2 decode
   steps at 2 threads with 16 KB chunks / 256 KB: 4-bit int8 path 6.6 / 4.3 ms, 8-bit 8.1 / 6.0,
   4-bit float path 13.0 / 11.5 (1 thread: 6.7-6.9, 8.6-9.0, 18-19; 2026-12-01) */
#define LUT_CHUNK_BYTES 262144L

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define LUT_MAX_BATCH 8

static inline long lut_code(const unsigned char* row, long i, int bits) {
  const long bit = i * bits;
  return (row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

/* x (batch, in) in the lane order of the 4-bit kernel: in each full block of 16 columns, position
   2m holds column m and 2m + 1 column 8 + m; the tail as it is */
static void lut_permute_x(const float* restrict x, float* restrict xp, long batch, long in) {
  for (long b = 0; b < batch; ++b) {
    const float* xb = x + b * in;
    float* pb = xp + b * in;
    long i = 0;
    for (; i + 16 <= in; i += 16)
      for (int m = 0; m < 8; ++m) {
        pb[i + 2 * m] = xb[i + m];
        pb[i + 2 * m + 1] = xb[i + 8 + m];
      }
    for (; i < in; ++i) pb[i] = xb[i];
  }
}

/* one matrix's rows [begin, end) against `batch` input rows: y[b * ystride + o] for o in the range */
typedef struct {
  const mmafm_matrix_t* m;
  const float* x;   /* (batch, in) natural order */
  const float* xp;  /* (batch, in) permuted by lut_permute_x (read by 4-bit matrices) */
  float* y;
  long batch, in, ystride;
} lut_part;

/* columns [begin, in) of one row, scalar, natural order; adds into acc[b] with an explicit fused
   multiply-add, so a row's sum does not depend on `batch` (whether the compiler would contract
   `acc += w * x` differs between the one-row and the batched loop) */
static void lut_row_scalar(const unsigned char* row, const float* tab, const float* x, long in, long begin,
                           long batch, int bits, float* acc) {
  for (long i = begin; i < in; ++i) {
    const float w = tab[lut_code(row, i, bits)];
    for (long b = 0; b < batch; ++b) acc[b] = fmaf(w, x[b * in + i], acc[b]);
  }
}

#if defined(__AVX512F__)
static inline __m512 lut_table(const float* tab, int bits) {
  if (bits == 4) return _mm512_loadu_ps(tab);
  /* 2 bits: the 4 entries 4 times, so index bits above the code select the same entry */
  return _mm512_castsi512_ps(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)tab)));
}

/* 16 weights of a row from 8 (4-bit) or 4 (2-bit) bytes at p, in the lane order described above */
static inline __m512 lut_weights16(const unsigned char* p, int bits, __m512 vtab) {
  if (bits == 4) {
    long long word;
    memcpy(&word, p, 8);
    const __m512i shifts = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(word), shifts), vtab);
  }
  int word;
  memcpy(&word, p, 4);
  const __m512i shifts = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(word), shifts), vtab);
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__)
/* AVX2 (no AVX-512): 8 weights of a row at a time, in natural column order (x is not permuted).
   4 bits: the 4 code bytes broadcast to 8 lanes, lane j shifted right by 4j, so its low nibble is
   code j; two vpermps look it up in the table's halves (entries 0-7, 8-15) and the code's bit 3,
   shifted to the sign bit, picks one (vblendvps). 2 bits: 2 code bytes, lane j shifted by 2j, one
   vpermps on the 4 entries repeated twice. 8 bits: a gather from the table. lo / hi: from
   lut_tables_avx2. */
static inline void lut_tables_avx2(const float* tab, int bits, __m256* lo, __m256* hi) {
  *lo = bits == 4 ? _mm256_loadu_ps(tab) : bits == 2 ? _mm256_broadcast_ps((const __m128*)tab) : _mm256_setzero_ps();
  *hi = bits == 4 ? _mm256_loadu_ps(tab + 8) : *lo;
}

static inline __m256 lut_weights8_avx2(const unsigned char* row, long i, int bits, const float* tab, __m256 lo,
                                       __m256 hi) {
  if (bits == 8) return _mm256_i32gather_ps(tab, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + i))), 4);
  if (bits == 4) {
    int word;
    memcpy(&word, row + i / 2, 4);
    const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(word), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    const __m256 low = _mm256_permutevar8x32_ps(lo, idx), high = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
  int word = 0;
  memcpy(&word, row + i / 4, 2);
  return _mm256_permutevar8x32_ps(lo, _mm256_srlv_epi32(_mm256_set1_epi32(word), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)));
}

static inline float lut_hsum_avx2(__m256 v) {  /* a fixed order: halves, then pairs */
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}
#endif

/* rows [begin, end) of a packed (2/4/8-bit) matrix */
static void lut_part_rows(const lut_part* part, long begin, long end) {
  const mmafm_matrix_t* m = part->m;
  const int bits = (int)m->bits;
  const long in = part->in, batch = part->batch, levels = 1L << bits, stride = m->code_stride;
  const unsigned char* codes = m->data;
  long o = begin;
#if defined(__AVX512F__)
  if (bits != 8 && batch == 1) {  /* decode: four rows at a time, four FMA chains per load of x */
    const float* x = bits == 4 ? part->xp : part->x;
    const long step = 2 * bits;  /* bytes per 16 codes: 8 or 4 */
    for (; o + 4 <= end; o += 4) {
      const unsigned char* r0 = codes + o * stride;
      const unsigned char *r1 = r0 + stride, *r2 = r1 + stride, *r3 = r2 + stride;
      const __m512 t0 = lut_table(m->table + (o / m->group_rows) * levels, bits);
      const __m512 t1 = lut_table(m->table + ((o + 1) / m->group_rows) * levels, bits);
      const __m512 t2 = lut_table(m->table + ((o + 2) / m->group_rows) * levels, bits);
      const __m512 t3 = lut_table(m->table + ((o + 3) / m->group_rows) * levels, bits);
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      long i = 0;
      for (; i + 16 <= in; i += 16) {
        const long at = (i / 16) * step;
        const __m512 xv = _mm512_loadu_ps(x + i);
        a0 = _mm512_fmadd_ps(lut_weights16(r0 + at, bits, t0), xv, a0);
        a1 = _mm512_fmadd_ps(lut_weights16(r1 + at, bits, t1), xv, a1);
        a2 = _mm512_fmadd_ps(lut_weights16(r2 + at, bits, t2), xv, a2);
        a3 = _mm512_fmadd_ps(lut_weights16(r3 + at, bits, t3), xv, a3);
      }
      float acc[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                      _mm512_reduce_add_ps(a3)};
      for (int r = 0; r < 4; ++r) {
        const long row = o + r;
        lut_row_scalar(codes + row * stride, m->table + (row / m->group_rows) * levels, part->x, in, i, 1, bits,
                       acc + r);
        part->y[row] = m->row_scale ? acc[r] * m->row_scale[row] : acc[r];
      }
    }
  }
#elif defined(__AVX2__)
  if (batch == 1) {  /* decode: four rows at a time, four FMA chains per load of x (each row's sum as below) */
    for (; o + 4 <= end; o += 4) {
      const unsigned char* r[4];
      __m256 lo[4], hi[4], a[4];
      const float* tabs[4];
      for (int k = 0; k < 4; ++k) {
        r[k] = codes + (o + k) * stride;
        tabs[k] = m->table + ((o + k) / m->group_rows) * levels;
        lut_tables_avx2(tabs[k], bits, lo + k, hi + k);
        a[k] = _mm256_setzero_ps();
      }
      long i = 0;
      for (; i + 8 <= in; i += 8) {
        const __m256 xv = _mm256_loadu_ps(part->x + i);
        for (int k = 0; k < 4; ++k)
          a[k] = _mm256_fmadd_ps(lut_weights8_avx2(r[k], i, bits, tabs[k], lo[k], hi[k]), xv, a[k]);
      }
      for (int k = 0; k < 4; ++k) {
        float acc = lut_hsum_avx2(a[k]);
        lut_row_scalar(r[k], tabs[k], part->x, in, i, 1, bits, &acc);
        part->y[o + k] = m->row_scale ? acc * m->row_scale[o + k] : acc;
      }
    }
  }
#endif
  for (; o < end; ++o) {
    const float* tab = m->table + (o / m->group_rows) * levels;
    const unsigned char* row = codes + o * stride;
    float acc[LUT_MAX_BATCH] = {0};
    long i = 0;
#if defined(__AVX512F__)
    __m512 vacc[LUT_MAX_BATCH];
    for (long b = 0; b < batch; ++b) vacc[b] = _mm512_setzero_ps();
    if (bits == 8) {
      for (; i + 16 <= in; i += 16) {
        const __m512 w = _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + i))), tab, 4);
        for (long b = 0; b < batch; ++b) vacc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(part->x + b * in + i), vacc[b]);
      }
    } else {
      const __m512 vtab = lut_table(tab, bits);
      const float* x = bits == 4 ? part->xp : part->x;
      for (; i + 16 <= in; i += 16) {
        const __m512 w = lut_weights16(row + i * bits / 8, bits, vtab);
        for (long b = 0; b < batch; ++b) vacc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + b * in + i), vacc[b]);
      }
    }
    for (long b = 0; b < batch; ++b) acc[b] = _mm512_reduce_add_ps(vacc[b]);
#elif defined(__AVX2__)
    __m256 vacc[LUT_MAX_BATCH], lo, hi;
    for (long b = 0; b < batch; ++b) vacc[b] = _mm256_setzero_ps();
    lut_tables_avx2(tab, bits, &lo, &hi);
    for (; i + 8 <= in; i += 8) {
      const __m256 w = lut_weights8_avx2(row, i, bits, tab, lo, hi);
      for (long b = 0; b < batch; ++b) vacc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(part->x + b * in + i), vacc[b]);
    }
    for (long b = 0; b < batch; ++b) acc[b] = lut_hsum_avx2(vacc[b]);
#endif
    lut_row_scalar(row, tab, part->x, in, i, batch, bits, acc);
    const float scale = m->row_scale ? m->row_scale[o] : 1.0f;
    for (long b = 0; b < batch; ++b) part->y[b * part->ystride + o] = m->row_scale ? acc[b] * scale : acc[b];
  }
}

/* up to three matrices reading the same input (Q/K/V, gate/up), their output columns end to end */
typedef struct {
  const mmafm_matrix_t* m[3];
  long out[3];
  const float *x, *xp;
  float* y;
  long batch, in, ystride;
  const q8_input* q8; /* the input quantized (q8.c) for matrices with int8 tables; NULL: float path */
} lut_multi_job;

static void lut_multi_rows(void* ctx, long begin, long end) {  /* output columns [begin, end) */
  const lut_multi_job* job = ctx;
  long offset = 0;
  for (int k = 0; k < 3; offset += job->out[k], ++k) {
    const long lo = begin > offset ? begin : offset;
    const long hi = end < offset + job->out[k] ? end : offset + job->out[k];
    if (lo >= hi) continue;
    const mmafm_matrix_t* m = job->m[k];
    if (job->q8 && q8_applies(m)) {  /* int8 activations x int8 tables (q8.c) */
      q8_rows(m, job->q8, job->y + offset, job->ystride, lo - offset, hi - offset);
    } else if (m->bits == 32) {  /* a float32 matrix: the float GEMV of kernels.h */
      gemv_f32(job->x, (const float*)m->data + (lo - offset) * job->in, job->y + lo, job->batch, hi - lo, job->in,
               job->ystride);
    } else {
      const lut_part part = {m, job->x, job->xp, job->y + offset, job->batch, job->in, job->ystride};
      lut_part_rows(&part, lo - offset, hi - offset);
    }
  }
}

static long lut_row_bytes(const mmafm_matrix_t* m, long in) { return m->bits == 32 ? in * 4 : m->code_stride; }

/* y (batch, out0 + out1 + out2) = x against up to three matrices (count of them non-NULL first);
   xp: scratch of batch * in floats for the permuted input; q8: scratch for the quantized input of
   matrices with int8 tables (NULL: every matrix on the float path) */
static void lut_multi_gemv(const float* x, float* xp, q8_input* q8, const mmafm_matrix_t* m0,
                           const mmafm_matrix_t* m1, const mmafm_matrix_t* m2, long out0, long out1, long out2,
                           float* y, long batch, long in, int nthreads) {
  lut_multi_job job = {{m0, m1, m2}, {out0, m1 ? out1 : 0, m2 ? out2 : 0}, x, xp, y, batch, in, 0, NULL};
  job.ystride = job.out[0] + job.out[1] + job.out[2];
  int needs_permuted = 0, needs_q8[3] = {0, 0, 0};
  long bytes = 0;
  for (int k = 0; k < 3; ++k)
    if (job.m[k] && job.out[k]) {
      const int int8 = q8 && q8_applies(job.m[k]);
      needs_permuted |= job.m[k]->bits == 4 && !int8;
      needs_q8[0] |= int8 && job.m[k]->bits == 4;
      needs_q8[1] |= int8 && job.m[k]->bits == 2;
      needs_q8[2] |= int8 && job.m[k]->bits == 8;
      bytes += lut_row_bytes(job.m[k], in) * job.out[k];
    }
  if (needs_permuted) lut_permute_x(x, xp, batch, in);
  if (needs_q8[0] || needs_q8[1] || needs_q8[2]) {
    q8_quantize(q8, x, batch, in, needs_q8);
    job.q8 = q8;
  }
  if (nthreads <= 1 || job.ystride * in < PARALLEL_MIN_ELEMENTS) {
    lut_multi_rows(&job, 0, job.ystride);
    return;
  }
  long grain = (LUT_CHUNK_BYTES * job.ystride + bytes - 1) / (bytes > 0 ? bytes : 1);  /* rows of ~16 KB */
  const long balanced = job.ystride / (4L * nthreads); /* >= 4 chunks per thread, as kernels.c's GEMV */
  if (grain > balanced) grain = balanced;
  grain = (grain + 3) / 4 * 4;  /* whole 4-row blocks */
  pool_run(lut_multi_rows, &job, job.ystride, grain < 4 ? 4 : grain, nthreads);
}

static int lut_matrix_ok(const mmafm_matrix_t* m, long in) {
  if (!m->data) return 0;
  if (m->bits == 32) return 1;
  return (m->bits == 2 || m->bits == 4 || m->bits == 8) && m->table && m->group_rows >= 1
         && m->code_stride * 8 >= in * m->bits;
}

int mmafm_lut_gemv_f32(const float* x, const unsigned char* codes, const float* table, float* y, long batch,
                       long out, long in, long code_stride, int bits, long group_rows, int nthreads) {
  const mmafm_matrix_t m = {codes, table, NULL, code_stride, group_rows, bits};
  if (batch < 1 || batch > LUT_MAX_BATCH || bits == 32 || !lut_matrix_ok(&m, in)) return 2;
  float* xp = malloc(sizeof(float) * batch * in);
  if (!xp) return 1;
  lut_multi_gemv(x, xp, NULL, &m, NULL, NULL, out, 0, 0, y, batch, in, nthreads);
  free(xp);
  return 0;
}

/* row r of a matrix as float32 (an embedding lookup) */
static void lut_matrix_row(const mmafm_matrix_t* m, long r, long cols, float* out) {
  if (m->bits == 32) {
    memcpy(out, (const float*)m->data + r * cols, sizeof(float) * cols);
    return;
  }
  const unsigned char* row = (const unsigned char*)m->data + r * m->code_stride;
  const float* tab = m->table + (r / m->group_rows) * (1L << m->bits);
  const float scale = m->row_scale ? m->row_scale[r] : 1.0f;
  for (long i = 0; i < cols; ++i) {
    const float w = tab[lut_code(row, i, (int)m->bits)];
    out[i] = m->row_scale ? scale * w : w;
  }
}

/* the step of `chunk` consecutive new tokens per cache row (batch = cache rows x chunk; a decode
   step is a chunk of 1), as kernels.h's decode_rows: row b is token b % chunk of cache row b / chunk, at column
   column + b % chunk, and attends over the cache and the tokens of its chunk before it (all new
   K/V are written before any attention); chunks > 1 need linear caches with room for them. Every
   row's logits equal one-token steps' bit for bit (each GEMV keeps the one-row summation order). */
int mmafm_lut_decode_chunk_f32(
    const long* tokens, const mmafm_matrix_t* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, long chunk, const unsigned char* valid,
    long valid_stride, const mmafm_lut_layer_t* layers, long n_layers, const float* final_norm,
    const mmafm_matrix_t* head, float* logits, long batch, long dim, long heads, long kv_heads, long head_dim,
    long vocab, float eps, int nthreads) {
  if (batch < 1 || batch > LUT_MAX_BATCH || chunk < 1 || batch % chunk || !lut_matrix_ok(embed, dim)
      || !lut_matrix_ok(head, dim))
    return 2;
  for (long b = 0; b < batch; ++b)
    if (tokens[b] < 0 || tokens[b] >= vocab || positions[b] < 0 || positions[b] >= max_position) return 2;
  for (long l = 0; l < n_layers && chunk > 1; ++l)  /* chunks: linear caches with room for them */
    if (layers[l].ring || column + chunk > layers[l].slots) return 2;
  long widest = dim;
  for (long l = 0; l < n_layers; ++l) {
    const mmafm_lut_layer_t* L = layers + l;
    const long q_width = heads * head_dim;
    if (!lut_matrix_ok(&L->wq, dim) || !lut_matrix_ok(&L->wo, q_width) || !lut_matrix_ok(&L->w_gate, dim)
        || !lut_matrix_ok(&L->w_up, dim) || !lut_matrix_ok(&L->w_down, L->hidden)
        || (L->wk.data && (!lut_matrix_ok(&L->wk, dim) || !lut_matrix_ok(&L->wv, dim))))
      return 2;
    const long keys = L->slots;
    if (4 * q_width + heads * keys > widest) widest = 4 * q_width + heads * keys;  /* q|k|v, att, scores */
    if (3 * L->hidden > widest) widest = 3 * L->hidden;
  }
  /* x, y, xn, out: (batch, dim); cos, sin: (batch, head_dim); work: (batch, widest) for q|k|v, att
     and scores, or gate|up and act; xp: the permuted input of the widest GEMV */
  const long q_width = heads * head_dim;
  float* block = malloc(sizeof(float) * (batch * (4 * dim + 2 * head_dim + 2 * widest) + head_dim));
  if (!block) return 1;
  float* x = block;
  float* y = x + batch * dim;
  float* xn = y + batch * dim;
  float* out = xn + batch * dim;
  float* cos = out + batch * dim;
  float* sin = cos + batch * head_dim;
  float* work = sin + batch * head_dim;
  float* xp = work + batch * widest;
  float* tmp = xp + batch * widest;  /* (head_dim) */
  q8_input q8_store, *q8 = NULL;  /* the quantized GEMV inputs, when a matrix has int8 tables */
  int int8 = q8_applies(head);
  for (long l = 0; l < n_layers && !int8; ++l) {
    const mmafm_lut_layer_t* L = layers + l;
    int8 = q8_applies(&L->wq) || q8_applies(&L->wk) || q8_applies(&L->wv) || q8_applies(&L->wo)
           || q8_applies(&L->w_gate) || q8_applies(&L->w_up) || q8_applies(&L->w_down);
  }
  if (int8) {
    if (q8_alloc(&q8_store, batch, widest)) {
      free(block);
      return 1;
    }
    q8 = &q8_store;
  }
  for (long b = 0; b < batch; ++b) {
    lut_matrix_row(embed, tokens[b], dim, x + b * dim);
    memcpy(cos + b * head_dim, cos_table + positions[b] * head_dim, sizeof(float) * head_dim);
    memcpy(sin + b * head_dim, sin_table + positions[b] * head_dim, sizeof(float) * head_dim);
  }
  for (long l = 0; l < n_layers; ++l) {
    const mmafm_lut_layer_t* L = layers + l;
    const long kv_width = L->wk.data ? kv_heads * head_dim : 0, qkv_width = q_width + 2 * kv_width;
    const long keys = L->ring ? (column + 1 < L->slots ? column + 1 : L->slots) : column + 1;
    const long slot = L->ring ? column % L->slots : column;
    const float *cb = L->rope ? cos : NULL, *sb = L->rope ? sin : NULL;
    /* attention half: q | k | v in one GEMV, QK-norm + RoPE, cache write, attention, o_proj */
    float* qkv = work;                  /* (batch, qkv_width) */
    float* att = qkv + batch * qkv_width;  /* (batch, heads, head_dim) */
    float* scores = att + batch * q_width; /* (batch, heads, keys) */
    mmafm_rms_norm_f32(x, L->attn_norm, xn, batch, dim, eps);
    lut_multi_gemv(xn, xp, q8, &L->wq, kv_width ? &L->wk : NULL, kv_width ? &L->wv : NULL, q_width, kv_width, kv_width,
                   qkv, batch, dim, nthreads);
    for (long b = 0; b < batch; ++b) {
      float* row = qkv + b * qkv_width;
      norm_rope_heads(row, heads, head_dim, L->q_norm, eps, cb ? cb + b * head_dim : NULL,
                      sb ? sb + b * head_dim : NULL, tmp);
      if (!kv_width) continue;
      norm_rope_heads(row + q_width, kv_heads, head_dim, L->k_norm, eps, cb ? cb + b * head_dim : NULL,
                      sb ? sb + b * head_dim : NULL, tmp);
      for (long h = 0; h < kv_heads; ++h) {
        const long at = (b / chunk) * L->kv_batch_stride + h * L->kv_head_stride + (slot + b % chunk) * head_dim;
        memcpy(L->k_cache + at, row + q_width + h * head_dim, sizeof(float) * head_dim);
        memcpy(L->v_cache + at, row + q_width + kv_width + h * head_dim, sizeof(float) * head_dim);
      }
    }
    const long group = heads / kv_heads, pairs = batch * kv_heads;
    attention_job_f32 job = {.qkv = qkv, .k_cache = L->k_cache, .v_cache = L->v_cache, .att = att,
                             .scores = scores, .valid = L->ring ? NULL : valid, .valid_stride = valid_stride,
                             .kv_batch_stride = L->kv_batch_stride, .kv_head_stride = L->kv_head_stride,
                             .qkv_width = qkv_width, .heads = heads, .kv_heads = kv_heads, .group = group,
                             .keys = keys, .head_dim = head_dim, .chunk = chunk,
                             .scale = 1.0f / sqrtf((float)head_dim)};
    if (nthreads > 1 && pairs > 1 && pairs * group * keys * head_dim >= 65536L)
      pool_run(attend_pairs_f32, &job, pairs, 1, nthreads);
    else
      attend_pairs_f32(&job, 0, pairs);
    lut_multi_gemv(att, xp, q8, &L->wo, NULL, NULL, dim, 0, 0, out, batch, q_width, nthreads);
    for (long i = 0; i < batch * dim; ++i) y[i] = x[i] + out[i];
    /* SwiGLU half: gate | up in one GEMV, silu(gate) * up, down */
    float* gate_up = work;                        /* (batch, 2 hidden) */
    float* act = gate_up + batch * 2 * L->hidden; /* (batch, hidden) */
    mmafm_rms_norm_f32(y, L->ffn_norm, xn, batch, dim, eps);
    lut_multi_gemv(xn, xp, q8, &L->w_gate, &L->w_up, NULL, L->hidden, L->hidden, 0, gate_up, batch, dim, nthreads);
    for (long b = 0; b < batch; ++b)
      for (long i = 0; i < L->hidden; ++i) {
        const float g = gate_up[b * 2 * L->hidden + i];
        act[b * L->hidden + i] = g / (1.0f + expf(-g)) * gate_up[b * 2 * L->hidden + L->hidden + i];
      }
    lut_multi_gemv(act, xp, q8, &L->w_down, NULL, NULL, dim, 0, 0, out, batch, L->hidden, nthreads);
    for (long i = 0; i < batch * dim; ++i) x[i] = y[i] + out[i];
  }
  mmafm_rms_norm_f32(x, final_norm, xn, batch, dim, eps);
  lut_multi_gemv(xn, xp, q8, head, NULL, NULL, vocab, 0, 0, logits, batch, dim, nthreads);
  if (q8) q8_free(q8);
  free(block);
  return 0;
}
