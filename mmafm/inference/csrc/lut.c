/* Packed low-bit GEMV for compressed weights (mmafm/compress/packed.py):

     y[b, o] = sum_i table[o / group_rows][code(o, i)] * x[b, i]     for b < batch (few rows)

   Codes are packed per weight row, lowest bits first (4-bit: the low nibble holds the even
   column; 2-bit: bits 0-1 hold column 4j), code_stride bytes per row; table holds 2^bits float32
   entries per group of group_rows rows (1: a table per row). The weights are never written out
   as floats: each run of 16 codes is expanded to 16 table entries in registers (AVX-512: one
   vpermps per 16 weights of 4 or 2 bits, a gather for 8) and multiplied into every input row at
   once, so a decode step reads 4 (2) bits per weight instead of 32. Other CPUs take the scalar
   loop. Rows are split over the kernels' thread pool (pool.h) like the float GEMV's. Included
   at the end of kernels.c (one translation unit, one pool). */
#include "common.h"

#define LUT_PARALLEL_MIN_ELEMENTS PARALLEL_MIN_ELEMENTS /* smaller weights: one thread */
#define LUT_CHUNK_BYTES 16384L                          /* code bytes per chunk a thread claims, at least */

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define LUT_MAX_BATCH 8

typedef struct {
  const float* x;
  const unsigned char* codes;
  const float* table;
  float* y;
  long batch, out, in, code_stride, group_rows;
  int bits;
} lut_job;

static inline long lut_code(const unsigned char* row, long i, int bits) {
  const long bit = i * bits;
  return (row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

/* columns [begin, in) of one weight row against every input row, scalar; adds into acc[b] */
static void lut_row_scalar(const unsigned char* row, const float* tab, const float* x, long in, long begin,
                           long batch, int bits, float* acc) {
  for (long i = begin; i < in; ++i) {
    const float w = tab[lut_code(row, i, bits)];
    for (long b = 0; b < batch; ++b) acc[b] += w * x[b * in + i];
  }
}

#if defined(__AVX512F__)
/* 16 weights of one row from their codes: table entries via vpermps (2/4 bits) or a gather (8) */
static inline __m512 lut_decode16(const unsigned char* row, long i, int bits, __m512 vtab, const float* tab) {
  if (bits == 4) {
    const __m128i packed = _mm_loadl_epi64((const __m128i*)(row + i / 2));  /* 8 bytes, 16 codes */
    const __m128i low = _mm_and_si128(packed, _mm_set1_epi8(0x0f));
    const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0f));
    return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(low, high)), vtab);
  }
  if (bits == 2) {
    int word;
    memcpy(&word, row + i / 4, 4);                                            /* 4 bytes, 16 codes */
    const __m128i bytes = _mm_shuffle_epi8(_mm_cvtsi32_si128(word),
                                           _mm_set_epi8(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0));
    const __m512i shifts = _mm512_set_epi32(6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0);
    const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(bytes), shifts), _mm512_set1_epi32(3));
    return _mm512_permutexvar_ps(idx, vtab);
  }
  return _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + i))), tab, 4);
}
#endif

static void lut_rows(void* ctx, long begin, long end) {
  const lut_job* job = ctx;
  const long in = job->in, batch = job->batch, levels = 1L << job->bits;
  const int bits = job->bits;
  for (long o = begin; o < end; ++o) {
    const float* tab = job->table + (o / job->group_rows) * levels;
    const unsigned char* row = job->codes + o * job->code_stride;
    float acc[LUT_MAX_BATCH] = {0};
    long i = 0;
#if defined(__AVX512F__)
    const __m512 vtab = levels <= 16 ? _mm512_maskz_loadu_ps((__mmask16)((1u << levels) - 1u), tab) : _mm512_setzero_ps();
    if (batch == 1) {  /* decode: two accumulators in registers hide the FMA latency */
      const float* x = job->x;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (; i + 32 <= in; i += 32) {
        a0 = _mm512_fmadd_ps(lut_decode16(row, i, bits, vtab, tab), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(lut_decode16(row, i + 16, bits, vtab, tab), _mm512_loadu_ps(x + i + 16), a1);
      }
      for (; i + 16 <= in; i += 16)
        a0 = _mm512_fmadd_ps(lut_decode16(row, i, bits, vtab, tab), _mm512_loadu_ps(x + i), a0);
      acc[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    } else {
      __m512 vacc[LUT_MAX_BATCH];
      for (long b = 0; b < batch; ++b) vacc[b] = _mm512_setzero_ps();
      for (; i + 16 <= in; i += 16) {
        const __m512 w = lut_decode16(row, i, bits, vtab, tab);
        for (long b = 0; b < batch; ++b) vacc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(job->x + b * in + i), vacc[b]);
      }
      for (long b = 0; b < batch; ++b) acc[b] = _mm512_reduce_add_ps(vacc[b]);
    }
#endif
    lut_row_scalar(row, tab, job->x, in, i, batch, bits, acc);
    for (long b = 0; b < batch; ++b) job->y[b * job->out + o] = acc[b];
  }
}

int mmafm_lut_gemv_f32(const float* x, const unsigned char* codes, const float* table, float* y, long batch,
                       long out, long in, long code_stride, int bits, long group_rows, int nthreads) {
  if (batch < 1 || batch > LUT_MAX_BATCH || (bits != 2 && bits != 4 && bits != 8) || group_rows < 1
      || code_stride * 8 < in * bits)
    return 2;
  lut_job job = {x, codes, table, y, batch, out, in, code_stride, group_rows, bits};
  if (nthreads <= 1 || out * in < LUT_PARALLEL_MIN_ELEMENTS) {
    lut_rows(&job, 0, out);
    return 0;
  }
  long grain = (LUT_CHUNK_BYTES + code_stride - 1) / code_stride;
  const long balanced = out / (4L * nthreads); /* >= 4 chunks per thread, as kernels.c's GEMV */
  if (grain > balanced) grain = balanced;
  pool_run(lut_rows, &job, out, grain < 1 ? 1 : grain, nthreads);
  return 0;
}
