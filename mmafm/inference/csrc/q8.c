/* The opt-in int8-activation path of the packed decode (lut.c): integer dot products for 2-/4-/8-bit
   palettized weights, the way llama.cpp's Q4_0 x Q8_0 runs, but over a lookup table.

   The math, exact up to float32 summation order (tests/test_compress_q8.py checks it against a
   NumPy reference of the same formula):

   - activations (Q8_0): each GEMV input row is cut in blocks of 32 columns; block k gets
     d_k = max|x| / 127 and q_i = round(x_i * (1 / d_k)) (to nearest, ties to even: rintf) in
     [-127, 127], d_k kept as float32 (llama.cpp stores it as fp16);
   - weights: a matrix's table of group g (16 or 4 float entries) is replaced by u8 codes of an
     affine grid, table[g][c] ~ offset_g + step_g * u_g[c] with u in [0, 255] (kernels.py
     int8_tables: 255 steps between the table's min and max; the uniform scheme's balanced grid
     c - (L - 1) / 2 lands on it, u = 17c at 4 bits, but for float32 rounding of the step);
   - y[o] = row_scale[o] * (step_g * S1[o] + offset_g * S0),  S1[o] = sum_k d_k sum_{i in k} u[c(o,i)] q_i,
                                                                S0 = sum_k d_k sum_{i in k} q_i,
     where the inner sums are exact int32 (u8 x s8 products: what vpdpbusd multiplies) and S0,
     shared by every row, is computed once per input.

   With AVX512-VNNI, 64 codes at a time become 64 u8 table entries with one vpshufb (the 16-entry
   table is a register, like IQ4_NL's in llama.cpp) after a broadcast load, a shift and a mask,
   and one vpdpbusd multiplies them with 64 int8 activations into 16 int32 lanes; each lane is
   one block's, so one convert and one FMA with the lanes' d_k finish the 64. The activations are
   put once per input in the lane order the codes come out in (as lut.c does for its floats):

   - 4 bits: 32 code bytes broadcast to [A B A B] (A, B: 16 bytes each), the upper half shifted by
     4, masked to nibbles: 128-bit lane L, byte k holds column (L & 1) * 32 + 2k + (L >> 1);
   - 2 bits: 16 code bytes broadcast to 4 lanes, lane L shifted by 2L: lane L, byte k holds
     column 4k + L.
   - 8 bits: the codes are the u8 values themselves, in column order (no table lookup in the
     kernel: kernels.py maps each code through its group's int8_tables codes once, when the step
     is built, and gives the float path the affine grid as its table, so any float read of the
     matrix sees the same weights); 64 code bytes are one vpdpbusd operand as they are, llama.cpp's Q8_0 x Q8_0.
   With AVX2 only (no VNNI), the same lane order in two 256-bit halves: the u8 weights and int8
   activations widened to int16 16 at a time, vpmaddwd (exact: no saturation) into 8 int32 lanes,
   each pair of columns in one block. Columns past the last whole 64 take the scalar loop, which is
   also the loop of other CPUs. Included from kernels.c before lut.c. */
#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define Q8_VNNI 1
#define Q8_AVX2 0
#elif defined(__AVX2__)
#include <immintrin.h>
#define Q8_VNNI 0
#define Q8_AVX2 1
#else
#define Q8_VNNI 0
#define Q8_AVX2 0
#endif

#define Q8_BLOCK 32 /* columns per activation scale */
#define Q8_SPAN 64  /* columns per vector step */
#ifndef Q8_PREFETCH
#define Q8_PREFETCH 4096 /* code bytes read ahead of the rows being multiplied (measured: 1.5x) */
#endif

/* one quantized GEMV input of up to `capacity` columns per row and its lane-ordered copies */
typedef struct {
  long batch, in, blocks, capacity;
  int8_t* q;        /* (batch, capacity) natural order */
  float* d;         /* (batch, capacity / 32 + 1) block scales */
  float* s0;        /* (batch,) sum_k d_k sum_{i in k} q_i */
  int8_t* lanes[3]; /* 4-bit, 2-bit order: (batch, capacity), whole spans of 64 only; 8-bit (natural): q */
  float* lane_d[3]; /* (batch, capacity / 4) the block scale of each int32 lane */
  float* pair_d[3]; /* (batch, capacity / 2) the block scale of each pair of lanes (AVX2 path) */
  void* block;
} q8_input;

static void q8_free(q8_input* a) {
  free(a->block);
  a->block = NULL;
}

static int q8_alloc(q8_input* a, long batch, long capacity) {
  const long blocks = capacity / Q8_BLOCK + 1, lanes = capacity / 4 + 1, pairs = capacity / 2 + 1;
  const size_t floats = (size_t)batch * (blocks + 1 + 3 * lanes + 3 * pairs), bytes = (size_t)batch * 3 * capacity;
  a->block = malloc(sizeof(float) * floats + bytes + 64);
  if (!a->block) return 1;
  a->batch = batch;
  a->capacity = capacity;
  float* f = a->block;
  a->d = f;
  a->s0 = a->d + batch * blocks;
  a->lane_d[0] = a->s0 + batch;
  a->lane_d[1] = a->lane_d[0] + batch * lanes;
  a->lane_d[2] = a->lane_d[1] + batch * lanes;
  a->pair_d[0] = a->lane_d[2] + batch * lanes;
  a->pair_d[1] = a->pair_d[0] + batch * pairs;
  a->pair_d[2] = a->pair_d[1] + batch * pairs;
  int8_t* q = (int8_t*)(a->pair_d[2] + batch * pairs);
  a->q = q;
  a->lanes[0] = q + batch * capacity;
  a->lanes[1] = a->lanes[0] + batch * capacity;
  a->lanes[2] = q;  /* 8 bits: natural order, the quantized input itself */
  return 0;
}

/* column (within a span of 64) of the code at byte position p of the vector kernel's register */
static inline long q8_lane_column(int bits, long p) {
  const long lane = p / 16, k = p % 16;
  if (bits == 8) return p;  /* a code byte per column, in order */
  return bits == 4 ? (lane & 1) * 32 + 2 * k + (lane >> 1) : 4 * k + lane;
}

/* the lane order (index into q8_input's lanes) of a bit width */
static inline int q8_order_of(int bits) { return bits == 4 ? 0 : bits == 2 ? 1 : 2; }

/* q8_lane_column of every position, for 4 bits ([0]), 2 bits ([1]) and 8 bits ([2]), made once */
static unsigned char q8_order[3][Q8_SPAN];
static pthread_once_t q8_order_once = PTHREAD_ONCE_INIT;
static void q8_order_init(void) {
  static const int widths[3] = {4, 2, 8};
  for (int order = 0; order < 3; ++order)
    for (long p = 0; p < Q8_SPAN; ++p) q8_order[order][p] = (unsigned char)q8_lane_column(widths[order], p);
}

/* x (batch, in) -> Q8_0 blocks (natural order), S0, and the lane orders `need[0]` (4-bit),
   `need[1]` (2-bit) and `need[2]` (8-bit) ask for; in <= capacity */
static void q8_quantize(q8_input* a, const float* x, long batch, long in, const int need[3]) {
  const long blocks = a->capacity / Q8_BLOCK + 1, lanes = a->capacity / 4 + 1;
  a->batch = batch;
  a->in = in;
  a->blocks = (in + Q8_BLOCK - 1) / Q8_BLOCK;
  for (long b = 0; b < batch; ++b) {
    const float* xb = x + b * in;
    int8_t* q = a->q + b * a->capacity;
    float* d = a->d + b * blocks;
    float s0 = 0.0f;
    long k = 0;
#if Q8_VNNI
    for (; (k + 1) * Q8_BLOCK <= in; ++k) {  /* whole blocks: cvtps rounds to nearest even, as rintf */
      const __m512 lo = _mm512_loadu_ps(xb + k * Q8_BLOCK), hi = _mm512_loadu_ps(xb + k * Q8_BLOCK + 16);
      const float dk = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi))) / 127.0f;
      const __m512 inv = _mm512_set1_ps(dk != 0.0f ? 1.0f / dk : 0.0f);
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
      _mm_storeu_si128((__m128i*)(q + k * Q8_BLOCK), _mm512_cvtepi32_epi8(qlo));
      _mm_storeu_si128((__m128i*)(q + k * Q8_BLOCK + 16), _mm512_cvtepi32_epi8(qhi));
      d[k] = dk;
      s0 += dk * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
#endif
    for (; k * Q8_BLOCK < in; ++k) {
      const long lo = k * Q8_BLOCK, hi = lo + Q8_BLOCK < in ? lo + Q8_BLOCK : in;
      float amax = 0.0f;
      for (long i = lo; i < hi; ++i) amax = fmaxf(amax, fabsf(xb[i]));
      const float dk = amax / 127.0f, inv = dk != 0.0f ? 1.0f / dk : 0.0f;
      int32_t sum = 0;
      for (long i = lo; i < hi; ++i) {
        q[i] = (int8_t)rintf(xb[i] * inv);  /* to nearest, ties to even (vectorized) */
        sum += q[i];
      }
      d[k] = dk;
      s0 += dk * (float)sum;
    }
    a->s0[b] = s0;
    const long whole = in / Q8_SPAN * Q8_SPAN;
    pthread_once(&q8_order_once, q8_order_init);
    for (int order = 0; order < 3; ++order) {
      if (!need[order]) continue;
      const unsigned char* column = q8_order[order];
      int8_t* lane_q = a->lanes[order] + b * a->capacity;
      float* lane_d = a->lane_d[order] + b * lanes;
      for (long span = 0; span < whole; span += Q8_SPAN) {
        if (lane_q != q) {  /* 4 and 2 bits: the kernel's lane order (8 bits reads q as it is) */
#if Q8_VNNI && defined(__AVX512VBMI__)
          const __m512i at = _mm512_loadu_si512(column);
          _mm512_storeu_si512(lane_q + span, _mm512_permutexvar_epi8(at, _mm512_loadu_si512(q + span)));
#else
          for (long p = 0; p < Q8_SPAN; ++p) lane_q[span + p] = q[span + column[p]];
#endif
        }
        for (long j = 0; j < Q8_SPAN / 4; ++j) lane_d[span / 4 + j] = d[(span + column[4 * j]) / Q8_BLOCK];
        float* pair_d = a->pair_d[order] + b * (a->capacity / 2 + 1);
        for (long j = 0; j < Q8_SPAN / 2; ++j) pair_d[span / 2 + j] = d[(span + column[2 * j]) / Q8_BLOCK];
      }
    }
  }
}

/* sum_k d_k sum_{i in k, i >= begin} u[c(i)] q_i of one weight row; begin a multiple of 32 */
static float q8_row_scalar(const unsigned char* row, const unsigned char* u, const int8_t* q, const float* d,
                           long begin, long in, int bits) {
  float s1 = 0.0f;
  for (long i = begin; i < in;) {
    const long k = i / Q8_BLOCK, hi = (k + 1) * Q8_BLOCK < in ? (k + 1) * Q8_BLOCK : in;
    int32_t sum = 0;
    for (; i < hi; ++i) {
      const long bit = i * bits;
      const int code = (row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
      sum += (int32_t)(bits == 8 ? code : u[code]) * q[i];  /* 8 bits: the code is the u8 value */
    }
    s1 += d[k] * (float)sum;
  }
  return s1;
}

#if Q8_VNNI
static inline __m512i q8_table(const unsigned char* u, int bits) {  /* the u8 table in every 128-bit lane */
  if (bits == 8) return _mm512_setzero_si512();  /* unused: 8-bit codes are the u8 values (see q8_rows) */
  if (bits == 4) return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)u));
  int word;
  memcpy(&word, u, 4);
  return _mm512_broadcast_i32x4(_mm_cvtsi32_si128(word));
}

/* 64 codes from 32 (4-bit) or 16 (2-bit) bytes at p, in the lane order described at the top */
static inline __m512i q8_codes(const unsigned char* p, int bits) {
  if (bits == 4) {
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0)), _mm512_set1_epi8(0x0F));
  }
  const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p));
  return _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_set_epi64(6, 6, 4, 4, 2, 2, 0, 0)), _mm512_set1_epi8(3));
}

/* S1 over the whole spans of R rows (R = 4 or 1, four independent chains sharing each load of x) */
static inline __attribute__((always_inline)) void q8_spans(const unsigned char* const* rows, const __m512i* tables,
                                                           const int8_t* lane_q, const float* lane_d, long whole,
                                                           int bits, const int R, float* s1) {
  __m512 acc[4];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const long step = 8 * bits; /* code bytes per 64 columns */
  for (long span = 0; span < whole; span += Q8_SPAN) {
    const __m512i xq = _mm512_loadu_si512(lane_q + span);
    const __m512 dk = _mm512_loadu_ps(lane_d + span / 4);
    const long at = span / Q8_SPAN * step;
    for (int r = 0; r < R; ++r) {
#if Q8_PREFETCH > 0
      if (bits != 8) _mm_prefetch((const char*)(rows[r] + at + Q8_PREFETCH), _MM_HINT_T0);
#endif
      const __m512i w = bits == 8 ? _mm512_loadu_si512(rows[r] + at)
                                  : _mm512_shuffle_epi8(tables[r], q8_codes(rows[r] + at, bits));
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xq);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dk, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) s1[r] = _mm512_reduce_add_ps(acc[r]);
}

/* S1 of one row against B inputs (B <= 8, a batch: a prefill or verification chunk): each span's
   codes are loaded (and looked up) once for all B inputs, so B tokens cost about one weight read
   plus B x the integer work, where B single-row calls read the weights B times. Each input's
   chain is q8_spans' (same operations, same order), so every row's S1 equals a one-row call's
   bit for bit. */
static inline __attribute__((always_inline)) void q8_spans_batch(const unsigned char* row, __m512i table,
                                                                 const int8_t* lane_q, const float* lane_d,
                                                                 long q_stride, long d_stride, long whole, int bits,
                                                                 const int B, float* s1) {
  __m512 acc[8];
  for (int b = 0; b < B; ++b) acc[b] = _mm512_setzero_ps();
  const long step = 8 * bits; /* code bytes per 64 columns */
  for (long span = 0; span < whole; span += Q8_SPAN) {
    const long at = span / Q8_SPAN * step;
    const __m512i w = bits == 8 ? _mm512_loadu_si512(row + at) : _mm512_shuffle_epi8(table, q8_codes(row + at, bits));
    for (int b = 0; b < B; ++b) {
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(lane_q + b * q_stride + span));
      acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(lane_d + b * d_stride + span / 4), acc[b]);
    }
  }
  for (int b = 0; b < B; ++b) s1[b] = _mm512_reduce_add_ps(acc[b]);
}

/* q8_spans_batch with a constant B and bit width per instantiation (the accumulators stay in registers) */
static void q8_spans_batch_any(const unsigned char* row, __m512i table, const int8_t* lane_q, const float* lane_d,
                               long q_stride, long d_stride, long whole, int bits, long B, float* s1) {
#define Q8_BATCH_CASE(n)                                                                              \
  case n:                                                                                             \
    if (bits == 8) q8_spans_batch(row, table, lane_q, lane_d, q_stride, d_stride, whole, 8, n, s1);   \
    else if (bits == 4) q8_spans_batch(row, table, lane_q, lane_d, q_stride, d_stride, whole, 4, n, s1); \
    else q8_spans_batch(row, table, lane_q, lane_d, q_stride, d_stride, whole, 2, n, s1);             \
    return;
  switch (B) {
    Q8_BATCH_CASE(2) Q8_BATCH_CASE(3) Q8_BATCH_CASE(4) Q8_BATCH_CASE(5)  /* 2..8: q8_rows' batched case */
    Q8_BATCH_CASE(6) Q8_BATCH_CASE(7) Q8_BATCH_CASE(8)
  }
#undef Q8_BATCH_CASE
}
#endif

#if Q8_AVX2
/* S1 over the whole spans of one row, AVX2: the lane order of the VNNI path in 256-bit halves */
static float q8_row_avx2(const unsigned char* row, const unsigned char* u, const int8_t* lane_q, const float* pair_d,
                         long whole, int bits) {
  int word;
  memcpy(&word, u, 4);
  const __m256i table = _mm256_broadcastsi128_si256(bits == 4 ? _mm_loadu_si128((const __m128i*)u) : _mm_cvtsi32_si128(word));
  __m256 acc = _mm256_setzero_ps();
  for (long span = 0; bits == 8 && span < whole; span += Q8_SPAN)  /* 8 bits: the codes are the u8 values */
    for (int g = 0; g < 4; ++g) {
      const long at = span + 16 * g;
      const __m256i w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(row + at)));
      const __m256i x16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(lane_q + at)));
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(w16, x16)), _mm256_loadu_ps(pair_d + at / 2), acc);
    }
  for (long span = 0; bits != 8 && span < whole; span += Q8_SPAN) {
    __m256i codes[2];
    if (bits == 4) {  /* [A | B] -> low nibbles (positions 0-31), high nibbles (32-63) */
      const __m256i v = _mm256_loadu_si256((const __m256i*)(row + span / 2));
      codes[0] = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
      codes[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
    } else {  /* 16 bytes in both halves, 128-bit lane L of the span shifted by 2L */
      const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(row + span / 4)));
      codes[0] = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_set_epi64x(2, 2, 0, 0)), _mm256_set1_epi8(3));
      codes[1] = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_set_epi64x(6, 6, 4, 4)), _mm256_set1_epi8(3));
    }
    for (int half = 0; half < 2; ++half) {
      const __m256i w = _mm256_shuffle_epi8(table, codes[half]);
      for (int g = 0; g < 2; ++g) {  /* 16 columns: u8 and int8 to int16, pairs summed into int32 */
        const long at = span + 32 * half + 16 * g;
        const __m256i w16 = _mm256_cvtepu8_epi16(g ? _mm256_extracti128_si256(w, 1) : _mm256_castsi256_si128(w));
        const __m256i x16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(lane_q + at)));
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(w16, x16));
        acc = _mm256_fmadd_ps(dot, _mm256_loadu_ps(pair_d + at / 2), acc);
      }
    }
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}
#endif

/* rows [begin, end) of a 2-/4-/8-bit matrix with int8 tables against the quantized input a:
   y[b * ystride + o] */
static void q8_rows(const mmafm_matrix_t* m, const q8_input* a, float* y, long ystride, long begin, long end) {
  const int bits = (int)m->bits;
  const long levels = 1L << bits, in = a->in, dblocks = a->capacity / Q8_BLOCK + 1;
  const unsigned char* codes = m->data;
#if Q8_VNNI
  if (a->batch > 1 && a->batch <= 8) {  /* several inputs: each row's codes read once for all of them */
    const long whole = in / Q8_SPAN * Q8_SPAN;
    const int order = q8_order_of(bits);
    const long d_stride = a->capacity / 4 + 1;
    float s1[8];
    for (long o = begin; o < end; ++o) {
      const long g = o / m->group_rows;
      const unsigned char* row = codes + o * m->code_stride;
      q8_spans_batch_any(row, q8_table(m->qtable + g * levels, bits), a->lanes[order], a->lane_d[order], a->capacity,
                         d_stride, whole, bits, a->batch, s1);
      for (long b = 0; b < a->batch; ++b) {
        const float total = s1[b] + q8_row_scalar(row, m->qtable + g * levels, a->q + b * a->capacity,
                                                  a->d + b * dblocks, whole, in, bits);
        const float v = m->qaffine[2 * g + 1] * total + m->qaffine[2 * g] * a->s0[b];
        y[b * ystride + o] = m->row_scale ? v * m->row_scale[o] : v;
      }
    }
    return;
  }
#endif
  for (long b = 0; b < a->batch; ++b) {
    const int8_t* q = a->q + b * a->capacity;
    const float* d = a->d + b * dblocks;
    const float s0 = a->s0[b];
    long o = begin;
    float s1[4];
#if Q8_VNNI
    const long whole = in / Q8_SPAN * Q8_SPAN;
    const int order = q8_order_of(bits);
    const int8_t* lane_q = a->lanes[order] + b * a->capacity;
    const float* lane_d = a->lane_d[order] + b * (a->capacity / 4 + 1);
    while (o < end) {  /* four rows at a time, then one */
      /* 8 bits: one row at a time, one sequential stream the hardware prefetcher follows (four
         interleaved 576-byte rows with software prefetch streamed SmolLM2's codes at ~9 GB/s,
         one row without it at ~15: a decode step 16 -> 8.7 ms, 1 thread, 2026-12-01) */
      const int R = o + 4 <= end && bits != 8 ? 4 : 1;
      const unsigned char* rows[4];
      __m512i tables[4];
      for (int r = 0; r < R; ++r) {
        rows[r] = codes + (o + r) * m->code_stride;
        tables[r] = q8_table(m->qtable + ((o + r) / m->group_rows) * levels, bits);
      }
      /* a constant width and row count per call: each its own loop, no width test per span */
      if (bits == 8) q8_spans(rows, tables, lane_q, lane_d, whole, 8, 1, s1);
      else if (bits == 4) {
        if (R == 4) q8_spans(rows, tables, lane_q, lane_d, whole, 4, 4, s1);
        else q8_spans(rows, tables, lane_q, lane_d, whole, 4, 1, s1);
      } else if (R == 4) q8_spans(rows, tables, lane_q, lane_d, whole, 2, 4, s1);
      else q8_spans(rows, tables, lane_q, lane_d, whole, 2, 1, s1);
      for (int r = 0; r < R; ++r) {
        const long row = o + r, g = row / m->group_rows;
        const float total = s1[r] + q8_row_scalar(rows[r], m->qtable + g * levels, q, d, whole, in, bits);
        const float v = m->qaffine[2 * g + 1] * total + m->qaffine[2 * g] * s0;
        y[b * ystride + row] = m->row_scale ? v * m->row_scale[row] : v;
      }
      o += R;
    }
#elif Q8_AVX2
    const long whole = in / Q8_SPAN * Q8_SPAN;
    const int order = q8_order_of(bits);
    const int8_t* lane_q = a->lanes[order] + b * a->capacity;
    const float* pair_d = a->pair_d[order] + b * (a->capacity / 2 + 1);
    for (; o < end; ++o) {
      const long g = o / m->group_rows;
      const unsigned char* row = codes + o * m->code_stride;
      const float total = q8_row_avx2(row, m->qtable + g * levels, lane_q, pair_d, whole, bits)
                          + q8_row_scalar(row, m->qtable + g * levels, q, d, whole, in, bits);
      const float v = m->qaffine[2 * g + 1] * total + m->qaffine[2 * g] * s0;
      y[b * ystride + o] = m->row_scale ? v * m->row_scale[o] : v;
    }
#endif
    for (; o < end; ++o) {
      const long g = o / m->group_rows;
      s1[0] = q8_row_scalar(codes + o * m->code_stride, m->qtable + g * levels, q, d, 0, in, bits);
      const float v = m->qaffine[2 * g + 1] * s1[0] + m->qaffine[2 * g] * s0;
      y[b * ystride + o] = m->row_scale ? v * m->row_scale[o] : v;
    }
  }
}

/* the int8 path applies to this matrix: 2-/4-/8-bit codes with int8 tables (8 bits: codes mapped to their u8 values) */
static inline int q8_applies(const mmafm_matrix_t* m) {
  return m && (m->bits == 2 || m->bits == 4 || m->bits == 8) && m->qtable && m->qaffine;
}

void mmafm_q8_quantize(const float* x, signed char* q, float* d, long rows, long in) {
  q8_input a;
  const int need[3] = {0, 0, 0};
  if (rows < 1 || in < 1 || q8_alloc(&a, 1, in)) return;
  for (long r = 0; r < rows; ++r) {
    q8_quantize(&a, x + r * in, 1, in, need);
    memcpy(q + r * in, a.q, (size_t)in);
    memcpy(d + r * a.blocks, a.d, sizeof(float) * a.blocks);
  }
  q8_free(&a);
}

typedef struct {
  const mmafm_matrix_t* m;
  const q8_input* a;
  float* y;
  long ystride;
} q8_job;

static void q8_job_rows(void* ctx, long begin, long end) {
  const q8_job* job = ctx;
  q8_rows(job->m, job->a, job->y, job->ystride, begin, end);
}

int mmafm_q8_gemv_f32(const float* x, const unsigned char* codes, const unsigned char* qtable, const float* qaffine,
                      const float* row_scale, float* y, long batch, long out, long in, long code_stride, int bits,
                      long group_rows, int nthreads) {
  const mmafm_matrix_t m = {.data = codes, .row_scale = row_scale, .code_stride = code_stride,
                            .group_rows = group_rows, .bits = bits, .qtable = qtable, .qaffine = qaffine};
  if ((bits != 2 && bits != 4 && bits != 8) || batch < 1 || batch > 8 || group_rows < 1 || code_stride * 8 < in * bits
      || !qtable || !qaffine)
    return 2;
  q8_input a;
  if (q8_alloc(&a, batch, in)) return 1;
  const int need[3] = {bits == 4, bits == 2, bits == 8};
  q8_quantize(&a, x, batch, in, need);
  q8_job job = {&m, &a, y, out};
  const long grain = (16384L + code_stride - 1) / code_stride;
  if (nthreads > 1 && out * in >= PARALLEL_MIN_ELEMENTS) pool_run(q8_job_rows, &job, out, (grain + 3) / 4 * 4, nthreads);
  else q8_job_rows(&job, 0, out);
  q8_free(&a);
  return 0;
}
