/* Shared by both storage variants of kernels.h: bfloat16 conversion, the float32 RMSNorm, the
   per-head QK-norm + RoPE, and the per-layer descriptor of a whole decode step. Included once. */
#ifndef MMAFM_COMMON_H
#define MMAFM_COMMON_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "pool.h"

/* a * b + c as the GEMV's dot products compute it: one fused multiply-add where the target has one
   (what -ffp-contract makes of the decode step's `acc += w * x` there), else a multiply and an add
   (what that loop computes without FMA; fmaf would be a slow libm call that rounds once, and a
   decode step and a verification chunk would then give different bits) */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define MADD(a, b, c) fmaf((a), (b), (c))
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

#define PARALLEL_MIN_ELEMENTS 131072L /* smaller weights: one thread (waking helpers would dominate) */
#define CHUNK_BYTES 65536L            /* weight bytes per chunk a thread claims, at least */

/* rows per chunk of a GEMV over `rows` weight rows of row_bytes each: about CHUNK_BYTES, and at
   least 4 chunks per thread (so threads that run take over the share of one that does not),
   a multiple of the GEMV's 4-row blocks */
static long gemv_grain(long rows, long row_bytes, int nthreads) {
  long grain = (CHUNK_BYTES + row_bytes - 1) / row_bytes;
  const long balanced = rows / (4L * nthreads);
  if (grain > balanced) grain = balanced;
  grain = (grain + 3) / 4 * 4;
  return grain < 4 ? 4 : grain;
}

/* bfloat16 storage: the upper 16 bits of a float32; stores round to nearest even like torch */
static inline float bf16_load(bf16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline bf16_t bf16_store(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 64u); /* NaN stays NaN */
  return (bf16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float f32_load(float v) { return v; }
static inline float f32_store(float v) { return v; }

/* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for rows r (RMSNorm, the arithmetic order of torch's);
   y may be x (in place) */
void mmafm_rms_norm_f32(const float* x, const float* w, float* y, long rows, long dim, float eps) {
  for (long r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    float acc[16] = {0};
    long i = 0;
    for (; i + 16 <= dim; i += 16)
      for (int j = 0; j < 16; ++j) acc[j] += xr[i + j] * xr[i + j];
    float s = 0.0f;
    for (int j = 0; j < 16; ++j) s += acc[j];
    for (; i < dim; ++i) s += xr[i] * xr[i];
    const float inv = 1.0f / sqrtf(s / (float)dim + eps);
    for (i = 0; i < dim; ++i) yr[i] = (xr[i] * inv) * w[i];
  }
}

/* q (or k) heads in place: optional per-head RMSNorm (QK-norm), then optional rotate-half RoPE */
static void norm_rope_heads(float* restrict v, long heads, long dim, const float* restrict norm_w, float eps,
                            const float* restrict cos, const float* restrict sin, float* restrict tmp) {
  for (long h = 0; h < heads; ++h) {
    float* vh = v + h * dim;
    if (norm_w) mmafm_rms_norm_f32(vh, norm_w, vh, 1, dim, eps);  /* in place */
    if (cos) {
      const long half = dim / 2;
      for (long d = 0; d < half; ++d) tmp[d] = -vh[d + half];
      for (long d = half; d < dim; ++d) tmp[d] = vh[d - half];
      for (long d = 0; d < dim; ++d) vh[d] = vh[d] * cos[d] + tmp[d] * sin[d];
    }
  }
}

/* NAME(mmafm_gemv3) -> mmafm_gemv3_f32 / mmafm_gemv3_bf16, after STORAGE_SUFFIX */
#define MMAFM_CAT_(a, b) a##_##b
#define MMAFM_CAT(a, b) MMAFM_CAT_(a, b)
#define NAME(base) MMAFM_CAT(base, STORAGE_SUFFIX)

#endif /* MMAFM_COMMON_H */
