"""Native CPU kernels for decode-sized inference: GEMV, RMSNorm, single-query attention.

Decoding one token at a time multiplies every weight matrix by a single vector, so a decode step
costs one read of all weights: its speed limit is memory bandwidth, not FLOPs. On the x86 CPUs
this project runs on, ``F.linear`` with one fp32 row reaches about half the bandwidth a plain
streaming read gets, and each small torch op costs microseconds of dispatch. So, for inference
only (no autograd, CPU, float32, not under ``torch.compile``):

- :func:`linear` / :func:`apply_linears`: at most :data:`MAX_NATIVE_ROWS` rows go to a C GEMV that
  streams each weight row once for all input rows (up to three weights sharing an input, e.g.
  Q/K/V, in one call); more rows (prefill) go to oneDNN's matmul;
- :func:`rms_norm`: up to :data:`MAX_NATIVE_NORM_ELEMENTS` elements in one C loop;
- :func:`single_query_attention`: one query per row over K/V cache views (GQA), one C call;
- fused decode: :func:`decode_attention_block` (RMSNorm, Q/K/V, QK-norm, RoPE, cache write,
  attention, output projection and residual of one layer) and :func:`decode_swiglu_block` (the
  FFN half) are one call each, taken by :class:`mmafm.models.text.Block` in a decode step; and
  :func:`decode_step` runs a whole step of a dense model (embedding to logits) in one call, which
  ``generate`` uses through :meth:`mmafm.models.text.DecoderLM.fused_decoder`, for float32 or
  bfloat16 weights and cache (the C source is instantiated per storage type). Python's per-op
  overhead (~1 ms per token at 8 layers) is then gone, and a step costs about one read of the
  weights. :func:`disabled` switches every kernel off for a block of code.

Everything else — training, other dtypes or devices, tracing — takes the plain torch call.

The C source below is compiled on first use with the system C compiler (``cc``/``gcc``, ``-O3
-march=native -fopenmp``), cached under ``$MMAFM_CACHE_DIR`` (default ``~/.cache/mmafm``) keyed by
source, flags and host CPU, and loaded with :mod:`ctypes` (calls release the GIL). Without a
compiler, or with ``MMAFM_NATIVE_LINEAR=0``, every function here is its torch counterpart. Sums
are accumulated in float32 in another order than torch's, so results match to float32 rounding
(about 1e-6 relative), not bit for bit. The GEMV splits rows over ``torch.get_num_threads()``
OpenMP threads (one parallel region per call) for weights of >= 128K elements; smaller ones run
on one thread, where fork/join would cost more than it saves.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

__all__ = [
    "linear",
    "apply_linear",
    "apply_linears",
    "rms_norm",
    "single_query_attention",
    "native_linear_available",
    "disabled",
    "plain_linear",
    "decode_attention_block",
    "decode_swiglu_block",
    "decode_layer",
    "decode_step",
    "DecodeLayer",
    "DecodeStep",
    "MAX_NATIVE_ROWS",
    "MAX_NATIVE_NORM_ELEMENTS",
]

MAX_NATIVE_ROWS = 8  # more rows than this (batched decode too): a GEMM (F.linear) reuses the weights better

_COMMON_SOURCE = r"""
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PARALLEL_MIN_ELEMENTS 131072L /* smaller weights: one thread (fork/join would dominate) */

/* bfloat16 storage: the upper 16 bits of a float32; stores round to nearest even like torch */
typedef uint16_t bf16_t;
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

/* one decoder layer's weights and K/V storage for a whole decode step (mirrored by DecodeLayer in
   Python); matrices and caches are float32 or bfloat16 as the step's variant says, gains float32 */
typedef struct {
  const float* attn_norm;
  const void *wq, *wk, *wv, *wo;  /* wk = wv = NULL: the layer shares K/V */
  const float *q_norm, *k_norm, *ffn_norm;
  const void *w_gate, *w_up, *w_down;
  void *k_cache, *v_cache;  /* (batch, kv_heads, slots, head_dim): its own, or its source layer's */
  long kv_batch_stride, kv_head_stride, slots;
  long ring;    /* 1: sliding-window ring buffer, column t in slot t % slots */
  long rope;    /* 1: RoPE, 0: no positional encoding */
  long hidden;  /* SwiGLU width */
} mmafm_layer_t;
"""

# one variant per storage type: WT / LW = weight type and its load to float32, CT / LC / SC = K/V
# cache type, load and store, SFX = the suffix of the exported names
_VARIANT_SOURCE = r"""
/* ======== variant SFX: WT weights, CT K/V cache, float32 activations ======== */

/* y[b, o] = sum_i x[b, i] * w[o, i] for b < batch (few rows), written with row stride ystride:
   every weight row is read once and used for all input rows while it sits in L1; 16 float32
   accumulators per dot product (one AVX-512 register, or two AVX2 ones, once vectorised). */
static void gemv_SFX(const float* restrict x, const WT* restrict w, float* restrict y,
                     long batch, long out, long in, long ystride) {
  /* orphaned work-sharing: inside mmafm_gemv3's parallel region the rows are split over the
     team (no barrier until the region ends); outside one, this is a plain loop */
  #pragma omp for schedule(static) nowait
  for (long o0 = 0; o0 < out; o0 += 4) {
    const long rows = out - o0 < 4 ? out - o0 : 4;
    for (long b = 0; b < batch; ++b) {
      const float* xb = x + b * in;
      for (long r = 0; r < rows; ++r) {
        const WT* wr = w + (o0 + r) * in;
        float acc[16] = {0};
        long i = 0;
        for (; i + 16 <= in; i += 16)
          for (int j = 0; j < 16; ++j) acc[j] += LW(wr[i + j]) * xb[i + j];
        float s = 0.0f;
        for (int j = 0; j < 16; ++j) s += acc[j];
        for (; i < in; ++i) s += LW(wr[i]) * xb[i];
        y[b * ystride + o0 + r] = s;
      }
    }
  }
}

/* up to three weights sharing one input (Q/K/V, gate/up): y = [x w0^T | x w1^T | x w2^T] */
void mmafm_gemv3_SFX(const float* x, const WT* w0, const WT* w1, const WT* w2, float* y,
                     long batch, long out0, long out1, long out2, long in, int nthreads) {
  const long stride = out0 + out1 + out2;
  #pragma omp parallel num_threads(nthreads) if (nthreads > 1 && stride * in >= PARALLEL_MIN_ELEMENTS)
  {
    gemv_SFX(x, w0, y, batch, out0, in, stride);
    if (out1) gemv_SFX(x, w1, y + out0, batch, out1, in, stride);
    if (out2) gemv_SFX(x, w2, y + out0 + out1, batch, out2, in, stride);
  }
}

/* single-query attention of the `group` query heads (rows of q and o, head_dim wide) that share
   one KV head, over keys [0, keys) of a K/V cache view: each K and V row is read once for the whole
   group. scores: group x keys scratch; valid: NULL or one byte per key column (0 = padding). */
static void attend_group_SFX(const float* restrict q, const CT* restrict kh, const CT* restrict vh,
                             float* restrict o, float* restrict scores, long group, long keys, long dim,
                             float scale, const unsigned char* restrict valid) {
  for (long t = 0; t < keys; ++t) {
    const CT* kt = kh + t * dim;
    for (long g = 0; g < group; ++g) {
      if (valid && !valid[t]) { scores[g * keys + t] = -INFINITY; continue; }
      const float* qg = q + g * dim;
      float acc[16] = {0};  /* 16 lanes so the dot product vectorises without -ffast-math */
      long d = 0;
      for (; d + 16 <= dim; d += 16)
        for (int j = 0; j < 16; ++j) acc[j] += qg[d + j] * LC(kt[d + j]);
      float dot = 0.0f;
      for (int j = 0; j < 16; ++j) dot += acc[j];
      for (; d < dim; ++d) dot += qg[d] * LC(kt[d]);
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
    const CT* vt = vh + t * dim;
    for (long g = 0; g < group; ++g) {
      const float weight = scores[g * keys + t];
      if (weight == 0.0f) continue;
      float* og = o + g * dim;
      for (long d = 0; d < dim; ++d) og[d] += weight * LC(vt[d]);
    }
  }
}

/* y = x + o_proj(attention(rope(qk_norm(q, k)), v)) of x_norm = rms_norm(x): the attention half of a
   pre-norm decoder layer for one new token per row. With wk == NULL the layer shares K/V: it reads
   keys [0, keys) of k_cache / v_cache and writes nothing; otherwise its new K/V go to cache slot
   write_slot first (so keys includes them). Caches are (batch, kv_heads, slots, head_dim) with
   unit inner strides. cos, sin: (batch, head_dim) or NULL (no RoPE); q_norm_w, k_norm_w: NULL
   without QK-norm; valid: NULL or (batch, valid_stride) bytes per key column. Returns 0, or 1 when
   out of memory (y untouched). */
int mmafm_attention_decode_SFX(
    const float* restrict x, float* restrict y, const float* norm_w, float eps,
    const WT* wq, const WT* wk, const WT* wv, const WT* wo,
    const float* q_norm_w, const float* k_norm_w, const float* cos, const float* sin,
    CT* k_cache, CT* v_cache, long kv_batch_stride, long kv_head_stride, long write_slot, long keys,
    const unsigned char* valid, long valid_stride,
    long batch, long dim, long heads, long kv_heads, long head_dim, int nthreads) {
  const long q_width = heads * head_dim, kv_width = wk ? kv_heads * head_dim : 0;
  const long qkv_width = q_width + 2 * kv_width;
  float* xn = malloc(sizeof(float) * batch * (dim + qkv_width + q_width + dim + head_dim));
  float* scores = malloc(sizeof(float) * batch * heads * (keys > 0 ? keys : 1));
  if (!xn || !scores) { free(xn); free(scores); return 1; }
  float* qkv = xn + batch * dim;        /* (batch, q | k | v) */
  float* att = qkv + batch * qkv_width; /* (batch, heads, head_dim) */
  float* out = att + batch * q_width;   /* (batch, dim) */
  float* tmp = out + batch * dim;       /* (head_dim) */
  mmafm_rms_norm_f32(x, norm_w, xn, batch, dim, eps);
  mmafm_gemv3_SFX(xn, wq, wk, wv, qkv, batch, q_width, kv_width, kv_width, dim, nthreads);
  for (long b = 0; b < batch; ++b) {
    float* row = qkv + b * qkv_width;
    const float* cb = cos ? cos + b * head_dim : NULL;
    const float* sb = sin ? sin + b * head_dim : NULL;
    norm_rope_heads(row, heads, head_dim, q_norm_w, eps, cb, sb, tmp);
    if (!wk) continue;
    norm_rope_heads(row + q_width, kv_heads, head_dim, k_norm_w, eps, cb, sb, tmp);
    for (long h = 0; h < kv_heads; ++h) {
      const long at = b * kv_batch_stride + h * kv_head_stride + write_slot * head_dim;
      for (long d = 0; d < head_dim; ++d) {
        k_cache[at + d] = SC(row[q_width + h * head_dim + d]);
        v_cache[at + d] = SC(row[q_width + kv_width + h * head_dim + d]);
      }
    }
  }
  const long group = heads / kv_heads, pairs = batch * kv_heads;
  const float scale = 1.0f / sqrtf((float)head_dim);
  #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && pairs > 1 && pairs * group * keys * head_dim >= 65536L)
  for (long p = 0; p < pairs; ++p) {  /* one (row, KV head) and its group of query heads */
    const long b = p / kv_heads, h = p % kv_heads;
    const long kv_at = b * kv_batch_stride + h * kv_head_stride;
    attend_group_SFX(qkv + b * qkv_width + h * group * head_dim, k_cache + kv_at, v_cache + kv_at,
                     att + (b * heads + h * group) * head_dim, scores + p * group * keys, group, keys, head_dim,
                     scale, valid ? valid + b * valid_stride : NULL);
  }
  mmafm_gemv3_SFX(att, wo, NULL, NULL, out, batch, dim, 0, 0, q_width, nthreads);
  for (long i = 0; i < batch * dim; ++i) y[i] = x[i] + out[i];
  free(xn);
  free(scores);
  return 0;
}

/* x += w_down(silu(w_gate x_norm) * w_up x_norm), x_norm = rms_norm(x): the SwiGLU half of a
   pre-norm decoder layer, in place on (batch, dim). Returns 0, or 1 when out of memory. */
int mmafm_swiglu_decode_SFX(float* x, const float* norm_w, float eps, const WT* w_gate,
                            const WT* w_up, const WT* w_down, long batch, long dim, long hidden,
                            int nthreads) {
  float* xn = malloc(sizeof(float) * batch * (dim + 2 * hidden + hidden + dim));
  if (!xn) return 1;
  float* gate_up = xn + batch * dim;          /* (batch, gate | up) */
  float* act = gate_up + batch * 2 * hidden;  /* (batch, hidden) */
  float* out = act + batch * hidden;          /* (batch, dim) */
  mmafm_rms_norm_f32(x, norm_w, xn, batch, dim, eps);
  mmafm_gemv3_SFX(xn, w_gate, w_up, NULL, gate_up, batch, hidden, hidden, 0, dim, nthreads);
  for (long b = 0; b < batch; ++b)
    for (long i = 0; i < hidden; ++i) {
      const float g = gate_up[b * 2 * hidden + i];
      act[b * hidden + i] = g / (1.0f + expf(-g)) * gate_up[b * 2 * hidden + hidden + i];
    }
  mmafm_gemv3_SFX(act, w_down, NULL, NULL, out, batch, dim, 0, 0, hidden, nthreads);
  for (long i = 0; i < batch * dim; ++i) x[i] += out[i];
  free(xn);
  return 0;
}

/* logits (batch, vocab) of one new token per row: embed, every layer (attention half, SwiGLU
   half), final RMSNorm, output head. column: the cache column of the new tokens (the K/V go there,
   or to column % slots in a ring); positions (batch,): their RoPE positions, rows of cos_table /
   sin_table (max_position, head_dim); valid: NULL or (batch, valid_stride) bytes, 0 = padding
   column (only with linear caches). Returns 0; 1 out of memory (this column of the cache may be
   part written); 2 a token outside the vocabulary or a position outside the table (nothing
   written). */
int mmafm_decode_step_SFX(
    const long* tokens, const WT* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, const unsigned char* valid, long valid_stride,
    const mmafm_layer_t* layers, long n_layers, const float* final_norm, const WT* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    int nthreads) {
  for (long b = 0; b < batch; ++b)
    if (tokens[b] < 0 || tokens[b] >= vocab || positions[b] < 0 || positions[b] >= max_position) return 2;
  float* block = malloc(sizeof(float) * batch * (3 * dim + 2 * head_dim));
  if (!block) return 1;
  float* x = block;  /* the residual stream, ping-ponged with y */
  float* y = x + batch * dim;
  float* xn = y + batch * dim;
  float* cos = xn + batch * dim;  /* (batch, head_dim) rows of this step's positions */
  float* sin = cos + batch * head_dim;
  for (long b = 0; b < batch; ++b) {
    for (long i = 0; i < dim; ++i) x[b * dim + i] = LW(embed[tokens[b] * dim + i]);
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
    failed = mmafm_attention_decode_SFX(
        x, y, L->attn_norm, eps, L->wq, L->wk, L->wv, L->wo, L->q_norm, L->k_norm,
        L->rope ? cos : NULL, L->rope ? sin : NULL, L->k_cache, L->v_cache, L->kv_batch_stride,
        L->kv_head_stride, slot, num_keys, L->ring ? NULL : valid, valid_stride,
        batch, dim, heads, kv_heads, head_dim, nthreads);
    if (!failed)
      failed = mmafm_swiglu_decode_SFX(y, L->ffn_norm, eps, L->w_gate, L->w_up, L->w_down, batch, dim,
                                       L->hidden, nthreads);
    float* swap = x; x = y; y = swap;
  }
  if (!failed) {
    mmafm_rms_norm_f32(x, final_norm, xn, batch, dim, eps);
    mmafm_gemv3_SFX(xn, head, NULL, NULL, logits, batch, vocab, 0, 0, dim, nthreads);
  }
  free(block);
  return failed;
}
"""

_STANDALONE_SOURCE = r"""
/* softmax(q k^T * scale) v for ONE query per (row, head), grouped-query heads: query head h reads
   KV head h / (heads / kv_heads). q, out: (batch, heads, dim) contiguous; k, v: (batch, kv_heads,
   keys, dim) with the given batch / head strides (views of a KV cache). Returns 0, or 1 when out
   of memory (nothing written). */
int mmafm_decode_attention_f32(const float* restrict q, const float* restrict k, const float* restrict v,
                               float* restrict out, long batch, long heads, long kv_heads, long keys,
                               long dim, long kv_batch_stride, long kv_head_stride, float scale) {
  const long group = heads / kv_heads;
  float* scores = malloc(sizeof(float) * group * (keys > 0 ? keys : 1));
  if (!scores) return 1;
  for (long b = 0; b < batch; ++b)
    for (long h = 0; h < kv_heads; ++h) {
      const long kv_at = b * kv_batch_stride + h * kv_head_stride;
      attend_group_f32(q + (b * heads + h * group) * dim, k + kv_at, v + kv_at, out + (b * heads + h * group) * dim,
                       scores, group, keys, dim, scale, NULL);
    }
  free(scores);
  return 0;
}
"""


def _variant_source(suffix: str, weight: str, cache: str) -> str:
    """The variant template for ``weight`` / ``cache`` storage types (``f32`` or ``bf16``)."""
    types = {"f32": "float", "bf16": "bf16_t"}
    names = {"WT": types[weight], "LW": f"{weight}_load", "CT": types[cache], "LC": f"{cache}_load",
             "SC": f"{cache}_store", "SFX": suffix}
    return re.sub(r"\b(WT|LW|CT|LC|SC)\b|(?<=_)SFX\b|(?<= )SFX\b", lambda m: names[m.group(0)], _VARIANT_SOURCE)


# float32 everywhere (the fp32 models), bfloat16 weights and cache (models cast to bf16)
_SOURCE = _COMMON_SOURCE + _variant_source("f32", "f32", "f32") + _variant_source("bf16", "bf16", "bf16") \
    + _STANDALONE_SOURCE
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_kernel = None  # the ctypes gemv function once loaded; False when unavailable
_norm_kernel = None  # the ctypes RMSNorm function, loaded with _kernel
_attention_kernel = None  # the ctypes single-query attention function, loaded with _kernel
_attention_block_kernel = None  # the fused decode halves of a decoder layer, loaded with _kernel
_swiglu_block_kernel = None
_decode_step_kernels: dict = {}  # dtype -> a whole decode step of a dense decoder, loaded with _kernel
_failure = ""  # why the kernel is unavailable


class DecodeLayer(ctypes.Structure):
    """One decoder layer for :class:`DecodeStep` (mirrors the C ``mmafm_layer_t``)."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "attn_norm", "wq", "wk", "wv", "wo", "q_norm", "k_norm", "ffn_norm", "w_gate", "w_up", "w_down",
        "k_cache", "v_cache",
    )] + [(name, ctypes.c_long) for name in ("kv_batch_stride", "kv_head_stride", "slots", "ring", "rope", "hidden")]


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            lines = [line for line in handle if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build() -> ctypes.CDLL:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(_FLAGS), compiler, platform.node(), _cpu_id()]).encode())
    cache_dir = Path(os.environ.get("MMAFM_CACHE_DIR", Path.home() / ".cache" / "mmafm")) / "native"
    library = cache_dir / f"gemv_{key.hexdigest()[:16]}.so"
    if not library.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
            source = Path(scratch) / "gemv.c"
            source.write_text(_SOURCE)
            built = Path(scratch) / "gemv.so"
            result = subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"compiling the gemv kernel failed: {result.stderr.strip()[:500]}")
            os.replace(built, library)  # atomic: concurrent builders all end with a whole file
    return ctypes.CDLL(str(library))


def _load():
    global _kernel, _norm_kernel, _attention_kernel, _attention_block_kernel, _swiglu_block_kernel
    global _failure
    with _lock:
        if _kernel is not None:
            return _kernel
        if os.environ.get("MMAFM_NATIVE_LINEAR", "1") == "0":
            _kernel, _failure = False, "disabled by MMAFM_NATIVE_LINEAR=0"
            return _kernel
        try:
            library = _build()
            function = library.mmafm_gemv3_f32
            function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 5 + [ctypes.c_int]
            function.restype = None
            norm = library.mmafm_rms_norm_f32
            norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float]
            norm.restype = None
            attention = library.mmafm_decode_attention_f32
            attention.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 7 + [ctypes.c_float]
            attention.restype = ctypes.c_int
            attention_block = library.mmafm_attention_decode_f32
            attention_block.argtypes = (
                [ctypes.c_void_p] * 3 + [ctypes.c_float] + [ctypes.c_void_p] * 10 + [ctypes.c_long] * 4
                + [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_long] * 5 + [ctypes.c_int]
            )
            attention_block.restype = ctypes.c_int
            swiglu_block = library.mmafm_swiglu_decode_f32
            swiglu_block.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_float] + [ctypes.c_void_p] * 3
                                     + [ctypes.c_long] * 3 + [ctypes.c_int])
            swiglu_block.restype = ctypes.c_int
            steps = {}
            for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
                step = getattr(library, f"mmafm_decode_step_{suffix}")
                step.argtypes = (
                    [ctypes.c_void_p] * 5 + [ctypes.c_long] * 2 + [ctypes.c_void_p, ctypes.c_long]
                    + [ctypes.POINTER(DecodeLayer), ctypes.c_long] + [ctypes.c_void_p] * 3 + [ctypes.c_long] * 6
                    + [ctypes.c_float, ctypes.c_int]
                )
                step.restype = ctypes.c_int
                steps[dtype] = step
            # all or nothing: _kernel set last, so a half-loaded library is never used
            _decode_step_kernels.update(steps)
            _attention_block_kernel, _swiglu_block_kernel = attention_block, swiglu_block
            _norm_kernel, _attention_kernel = norm, attention
            _kernel = function
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:  # AttributeError: missing symbol
            _kernel, _failure = False, str(error)
            warnings.warn(f"mmafm: native gemv kernel unavailable ({error}); using F.linear", stacklevel=3)
        return _kernel


@contextlib.contextmanager
def disabled():
    """Inside this block every function here takes its torch path (e.g. to time or check the
    module-by-module computation against the native one); the kernels come back after it. The
    switch is process-wide, not per thread."""
    global _kernel
    saved = _kernel
    _kernel = False
    try:
        yield
    finally:
        _kernel = saved


def native_linear_available() -> bool:
    """Can :func:`linear` use the native kernel here (compiling it on first call)?"""
    return bool(_load())


_F32 = torch.float32
_Tensor = torch.Tensor
# oneDNN's fp32 matmul (what inductor lowers CPU linears to) is 5-20% faster than F.linear's MKL
# call for prefill-sized inputs on this project's CPUs; used for inference only
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_onednn_linear = torch.ops.mkldnn._linear_pointwise if _ONEDNN else None


def _inference_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # cheapest tests first: this runs ~30 times per decoded token
    return not (
        x.dtype != _F32
        or weight.dtype != _F32
        or not x.is_cpu
        or not weight.is_cpu
        or type(x) is not _Tensor  # no tensor subclasses (DTensor, fake tensors, proxies)
        or weight.dim() != 2
        or x.shape[-1] != weight.shape[1]
        or not weight.is_contiguous()
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or torch.compiler.is_compiling()
    )


def _native_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return 0 < x.numel() <= MAX_NATIVE_ROWS * weight.shape[1] and _inference_ok(x, weight)


def _native(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:  # (..., sum of outs)
    outs = [w.shape[0] for w in weights] + [0] * (3 - len(weights))
    pointers = [w.data_ptr() for w in weights] + [0] * (3 - len(weights))
    in_features = x.shape[-1]
    rows = x.reshape(-1, in_features).contiguous()
    y = torch.empty(x.shape[:-1] + (sum(outs),), dtype=_F32)
    _kernel(rows.data_ptr(), *pointers, y.data_ptr(), rows.shape[0], *outs, in_features, torch.get_num_threads())
    return y


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # (..., in) x (out, in) -> (..., out)
    """``F.linear(x, weight)``: few-row CPU float32 inference through the native kernel, many-row
    (prefill) through oneDNN's matmul, everything else (training, other dtypes) plain."""
    if x.numel() <= MAX_NATIVE_ROWS * x.shape[-1]:
        if (_kernel if _kernel is not None else _load()) and _native_ok(x, weight):
            return _native(x, (weight,))
    elif _ONEDNN and _inference_ok(x, weight):
        return _onednn_linear(x, weight, None, "none", [], "")
    return F.linear(x, weight)


MAX_NATIVE_NORM_ELEMENTS = 16384  # larger inputs: torch's vectorised, multi-threaded rms_norm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # (..., dim)
    """``F.rms_norm(x, (dim,), weight, eps)``; small CPU float32 inference inputs (a decode step)
    go to a native loop, equal to torch's up to float32 summation order."""
    if (
        (_kernel if _kernel is not None else _load())
        and x.dtype == _F32
        and weight.dtype == _F32
        and x.is_cpu
        and weight.is_cpu
        and type(x) is _Tensor
        and weight.dim() == 1
        and x.shape[-1] == weight.shape[0]
        and 0 < x.numel() <= MAX_NATIVE_NORM_ELEMENTS
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
    ):
        rows = x.contiguous()
        y = torch.empty(x.shape, dtype=_F32)
        _norm_kernel(rows.data_ptr(), weight.data_ptr(), y.data_ptr(), rows.numel() // weight.shape[0],
                     weight.shape[0], eps)
        return y
    return F.rms_norm(x, weight.shape, weight, eps)


def single_query_attention(
    q: torch.Tensor,  # (B, H, 1, D)
    k: torch.Tensor,  # (B, Hkv, S, D)
    v: torch.Tensor,  # (B, Hkv, S, D)
) -> torch.Tensor | None:  # (B, H, 1, D), or None where the native kernel does not apply
    """Unmasked attention of one query per row (a decode step) by the native kernel: CPU float32
    inference with K/V rows of unit stride (e.g. views of a KV cache); None otherwise."""
    if not ((_kernel if _kernel is not None else _load())
            and q.dtype == _F32 and k.dtype == _F32 and v.dtype == _F32
            and q.is_cpu and k.is_cpu and v.is_cpu
            and type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor
            and q.dim() == 4 and q.shape[2] == 1 and k.dim() == 4 and k.shape == v.shape
            and q.shape[1] % k.shape[1] == 0 and k.shape[2] > 0
            and k.stride() == v.stride() and k.stride(3) == 1 and k.stride(2) == k.shape[3]
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and not torch.compiler.is_compiling()):
        return None
    batch, heads, _, dim = q.shape
    queries = q.contiguous()
    out = torch.empty((batch, heads, 1, dim), dtype=_F32)
    failed = _attention_kernel(queries.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), batch, heads,
                               k.shape[1], k.shape[2], dim, k.stride(0), k.stride(1), dim**-0.5)
    return None if failed else out


def plain_linear(module: nn.Module) -> bool:
    """Is ``module`` exactly a bias-free ``nn.Linear`` without hooks (so ``x @ weight.T`` is all it does)?"""
    return (type(module) is nn.Linear and module.bias is None and not module._forward_hooks
            and not module._forward_pre_hooks and not _global_forward_hooks and not _global_forward_pre_hooks)


def apply_linears(x: torch.Tensor, *modules: nn.Module) -> tuple[torch.Tensor, ...]:
    """``tuple(m(x) for m in modules)`` for up to three layers reading the same input (Q/K/V,
    gate/up); with the native kernel all of them are one call. Outputs may be views of one buffer.
    """
    if not 1 <= len(modules) <= 3:
        raise ValueError(f"apply_linears takes 1 to 3 layers, got {len(modules)}")
    if (
        (_kernel if _kernel is not None else _load())
        and all(plain_linear(m) for m in modules)
        and all(_native_ok(x, m.weight) for m in modules)
    ):
        weights = tuple(m.weight for m in modules)
        return _native(x, weights).split([w.shape[0] for w in weights], dim=-1)
    return tuple(apply_linear(m, x) for m in modules)


def apply_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a plain bias-free ``nn.Linear`` without hooks goes through :func:`linear`.

    Anything else (adapters replacing the layer, hooks, biases) is called as a module.
    """
    if plain_linear(module):
        return linear(x, module.weight)
    return module(x)


# ----------------------------------------------------------------------------- fused decode blocks


_PLAIN_TYPES = (_Tensor, nn.Parameter)  # no tensor subclasses (DTensor, fake tensors, proxies)


def _cpu_of(dtype: torch.dtype, *tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.dtype == dtype and t.is_cpu and type(t) in _PLAIN_TYPES) for t in tensors)


def _f32_cpu(*tensors: torch.Tensor | None) -> bool:
    return _cpu_of(_F32, *tensors)


def _contiguous(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.is_contiguous() for t in tensors)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def decode_attention_block(
    x: torch.Tensor,  # (B, 1, dim): the residual stream of one new token per row
    norm_weight: torch.Tensor,  # (dim,) pre-attention RMSNorm gain
    eps: float,
    wq: torch.Tensor,  # (H * D, dim)
    wk: torch.Tensor | None,  # (Hkv * D, dim); None: the layer shares K/V (reads the cache, writes nothing)
    wv: torch.Tensor | None,  # (Hkv * D, dim)
    wo: torch.Tensor,  # (dim, H * D)
    q_norm_weight: torch.Tensor | None,  # (D,) QK-norm gains, None without QK-norm
    k_norm_weight: torch.Tensor | None,
    cos: torch.Tensor | None,  # (B, 1, D) RoPE of the new positions; None = no positional encoding
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,  # (B, Hkv, S, D) float32 storage (or a view with unit inner strides)
    v_cache: torch.Tensor,
    write_slot: int,  # slot of the new K/V (ignored when sharing)
    num_keys: int,  # attend over slots [0, num_keys), the new one included
    key_valid: torch.Tensor | None = None,  # (B, >= num_keys) bool, False = padding column
) -> torch.Tensor | None:  # (B, 1, dim), or None where the fused kernel does not apply
    """The attention half of a pre-norm decoder layer for one decode step, in one native call:
    ``x + o_proj(attn(rope(qk_norm(q)), rope(qk_norm(k)), v))`` of ``rms_norm(x)``, writing the new
    K/V into the cache. For CPU float32 inference (the caller checks autograd); None otherwise.

    Equal to the module-by-module computation up to float32 summation order."""
    if not (_kernel if _kernel is not None else _load()):
        return None
    if x.dim() != 3 or x.shape[1] != 1 or not 0 < x.shape[0] <= MAX_NATIVE_ROWS or k_cache.dim() != 4:
        return None  # more rows: torch's GEMMs (oneDNN) beat a GEMV per row
    batch, _, dim = x.shape
    _, kv_heads, slots, head_dim = k_cache.shape
    q_width = wq.shape[0]
    if not (
        _f32_cpu(x, norm_weight, wq, wk, wv, wo, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache)
        and _contiguous(x, norm_weight, wq, wk, wv, wo, q_norm_weight, k_norm_weight, cos, sin)
        and (wk is None) == (wv is None) and (cos is None) == (sin is None)
        and q_width % head_dim == 0 and (q_width // head_dim) % kv_heads == 0
        and wq.shape == (q_width, dim) and wo.shape == (dim, q_width) and norm_weight.shape == (dim,)
        and (wk is None or wk.shape == wv.shape == (kv_heads * head_dim, dim))
        and (q_norm_weight is None or q_norm_weight.shape == (head_dim,))
        and (k_norm_weight is None or k_norm_weight.shape == (head_dim,))
        and (cos is None or cos.shape == sin.shape == (batch, 1, head_dim))
        and k_cache.shape == v_cache.shape and k_cache.shape[0] == batch
        and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and k_cache.stride(2) == head_dim
        and 0 < num_keys <= slots and (wk is None or 0 <= write_slot < num_keys)
        and (key_valid is None or (key_valid.dtype == torch.bool and key_valid.dim() == 2
                                   and key_valid.shape[0] == batch and key_valid.shape[1] >= num_keys
                                   and key_valid.stride(1) == 1))
    ):
        return None
    y = torch.empty_like(x)
    failed = _attention_block_kernel(
        x.data_ptr(), y.data_ptr(), norm_weight.data_ptr(), eps,
        wq.data_ptr(), _ptr(wk), _ptr(wv), wo.data_ptr(), _ptr(q_norm_weight), _ptr(k_norm_weight),
        _ptr(cos), _ptr(sin), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
        write_slot, num_keys, _ptr(key_valid), 0 if key_valid is None else key_valid.stride(0),
        batch, dim, q_width // head_dim, kv_heads, head_dim, torch.get_num_threads(),
    )
    return None if failed else y


def decode_swiglu_block(
    x: torch.Tensor,  # (B, 1, dim), updated in place
    norm_weight: torch.Tensor,  # (dim,) pre-FFN RMSNorm gain
    eps: float,
    w_gate: torch.Tensor,  # (hidden, dim)
    w_up: torch.Tensor,  # (hidden, dim)
    w_down: torch.Tensor,  # (dim, hidden)
) -> bool:
    """``x += w_down(silu(w_gate n) * w_up n)`` with ``n = rms_norm(x)``, in place, in one native
    call (CPU float32 inference, the caller checks autograd). False, with ``x`` untouched, where
    the kernel does not apply."""
    if not (_kernel if _kernel is not None else _load()):
        return False
    if x.dim() != 3 or x.shape[1] != 1 or not 0 < x.shape[0] <= MAX_NATIVE_ROWS:
        return False
    batch, _, dim = x.shape
    hidden = w_gate.shape[0]
    if not (
        _f32_cpu(x, norm_weight, w_gate, w_up, w_down)
        and _contiguous(x, norm_weight, w_gate, w_up, w_down)
        and norm_weight.shape == (dim,) and w_gate.shape == w_up.shape == (hidden, dim)
        and w_down.shape == (dim, hidden)
    ):
        return False
    failed = _swiglu_block_kernel(x.data_ptr(), norm_weight.data_ptr(), eps, w_gate.data_ptr(), w_up.data_ptr(),
                                  w_down.data_ptr(), batch, dim, hidden, torch.get_num_threads())
    return not failed


class DecodeStep:
    """A whole decode step of a dense pre-norm decoder (``generate``'s inner loop) in one native
    call: embedding, every layer through the fused attention and SwiGLU halves, final RMSNorm and
    output head, K/V written into the cache. Weights and cache are float32, or bfloat16 (read at
    half the bytes, converted to float32 in registers: activations and sums stay float32). Built by :func:`decode_step` from validated tensors,
    which it keeps alive; the caller keeps the cache's bookkeeping (columns, positions)."""

    def __init__(self, layers: list[tuple[DecodeLayer, tuple]], embed: torch.Tensor, final_norm: torch.Tensor,
                 head: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, heads: int, kv_heads: int,
                 head_dim: int, eps: float):
        self._tensors = [t for _, kept in layers for t in kept] + [embed, final_norm, head, cos_table, sin_table]
        self._layers = (DecodeLayer * len(layers))(*(layer for layer, _ in layers))
        self.n_layers, self.dim = len(layers), embed.shape[1]
        self.embed, self.final_norm, self.head = embed, final_norm, head
        self.cos_table, self.sin_table = cos_table, sin_table
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps

    def __call__(
        self,
        tokens: torch.Tensor,  # (B,) int64, one new token per row
        positions: torch.Tensor,  # (B,) int64 RoPE positions
        column: int,  # cache column of the new tokens
        key_valid: torch.Tensor | None = None,  # (B, >= column + 1) bool, False = padding column
    ) -> torch.Tensor:  # (B, V) float32 logits
        tokens, positions = tokens.contiguous(), positions.contiguous()
        if tokens.dtype != torch.int64 or positions.dtype != torch.int64 or tokens.dim() != 1 \
                or positions.shape != tokens.shape:
            raise ValueError(f"tokens and positions must be (batch,) int64, got {tokens.dtype} {tuple(tokens.shape)} "
                             f"and {positions.dtype} {tuple(positions.shape)}")
        batch = tokens.shape[0]
        if key_valid is not None and not (key_valid.dtype == torch.bool and key_valid.dim() == 2
                                          and key_valid.shape[0] == batch and key_valid.shape[1] > column
                                          and key_valid.stride(1) == 1):
            raise ValueError(f"key_valid must be ({batch}, > {column}) bool with unit column stride")
        logits = torch.empty((batch, self.head.shape[0]), dtype=_F32)
        failed = _decode_step_kernels[self.head.dtype](
            tokens.data_ptr(), self.embed.data_ptr(), positions.data_ptr(), self.cos_table.data_ptr(),
            self.sin_table.data_ptr(), self.cos_table.shape[0], column, _ptr(key_valid),
            0 if key_valid is None else key_valid.stride(0), self._layers, self.n_layers,
            self.final_norm.data_ptr(), self.head.data_ptr(), logits.data_ptr(), batch, self.dim, self.heads,
            self.kv_heads, self.head_dim, self.head.shape[0], self.eps, torch.get_num_threads(),
        )
        if failed == 2:
            raise ValueError(f"decode step: a token outside [0, {self.head.shape[0]}) or a position outside "
                             f"[0, {self.cos_table.shape[0]})")
        if failed:
            raise MemoryError("decode step: out of memory in the native kernel")
        return logits


_STEP_DTYPES = (torch.float32, torch.bfloat16)  # weight (and cache) storage the decode step takes


def _gain(t: torch.Tensor | None) -> torch.Tensor | None:
    """A norm gain as the kernels read it: float32, contiguous (a copy for bf16 models)."""
    return None if t is None else t.detach().float().contiguous()


def decode_layer(
    attn_norm: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor | None, wv: torch.Tensor | None, wo: torch.Tensor,
    q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, ffn_norm: torch.Tensor, w_gate: torch.Tensor,
    w_up: torch.Tensor, w_down: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ring: bool, rope: bool,
    heads: int,
) -> tuple[DecodeLayer, tuple] | None:
    """One layer of a :class:`DecodeStep` (weights as in :func:`decode_attention_block` and
    :func:`decode_swiglu_block`; ``k_cache`` / ``v_cache`` the whole (B, Hkv, slots, D) storage of
    the layer, or of its source when ``wk`` is None; ``heads`` query heads), or None where the
    native step cannot run it. Matrices and caches are all float32 or all bfloat16; the norm gains
    are read as float32 (copies for bf16)."""
    if k_cache.dim() != 4 or wq.dtype not in _STEP_DTYPES:
        return None
    _, kv_heads, slots, head_dim = k_cache.shape
    dim, hidden, q_width = wq.shape[1], w_gate.shape[0], wq.shape[0]
    matrices = (wq, wk, wv, wo, w_gate, w_up, w_down)
    gains = tuple(_gain(t) for t in (attn_norm, q_norm, k_norm, ffn_norm))
    if not (
        _cpu_of(wq.dtype, *matrices, k_cache, v_cache) and _contiguous(*matrices)
        and all(t is None or t.is_cpu for t in (attn_norm, q_norm, k_norm, ffn_norm))
        and (wk is None) == (wv is None)
        and attn_norm.shape == ffn_norm.shape == (dim,) and q_width == heads * head_dim and heads % kv_heads == 0
        and wo.shape == (dim, q_width) and (wk is None or wk.shape == wv.shape == (kv_heads * head_dim, dim))
        and (q_norm is None or q_norm.shape == (head_dim,)) and (k_norm is None or k_norm.shape == (head_dim,))
        and w_gate.shape == w_up.shape == (hidden, dim) and w_down.shape == (dim, hidden)
        and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
        and k_cache.stride(3) == 1 and k_cache.stride(2) == head_dim
    ):
        return None
    attn_gain, q_gain, k_gain, ffn_gain = gains
    layer = DecodeLayer(
        *(_ptr(t) for t in (attn_gain, wq, wk, wv, wo, q_gain, k_gain, ffn_gain, w_gate, w_up, w_down)),
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), slots, int(ring), int(rope),
        hidden,
    )
    return layer, (wq, *(t for t in (*matrices, *gains, k_cache, v_cache) if t is not None))


def decode_step(
    layers: list[tuple[DecodeLayer, tuple]], embed: torch.Tensor, final_norm: torch.Tensor, head: torch.Tensor,
    cos_table: torch.Tensor, sin_table: torch.Tensor, heads: int, kv_heads: int, head_dim: int, eps: float,
) -> DecodeStep | None:
    """A :class:`DecodeStep` over ``layers`` (from :func:`decode_layer`), or None without the
    native kernels or with tensors they cannot take. ``embed`` (V, dim) and ``head`` (V', dim) in
    the layers' storage type (float32 or bfloat16); RoPE tables float32."""
    if not (_kernel if _kernel is not None else _load()):
        return None
    dtype = embed.dtype
    if not (
        layers and dtype in _STEP_DTYPES and _cpu_of(dtype, embed, head) and _f32_cpu(cos_table, sin_table)
        and final_norm.is_cpu and _contiguous(embed, head, cos_table, sin_table)
        and embed.dim() == head.dim() == 2 and embed.shape[1] == head.shape[1] == final_norm.shape[0]
        and cos_table.shape == sin_table.shape == (cos_table.shape[0], head_dim)
        and heads % kv_heads == 0
        and all(kept[0].dtype == dtype and kept[0].shape == (heads * head_dim, embed.shape[1]) and layer.hidden
                for layer, kept in layers)
    ):
        return None
    return DecodeStep(layers, embed, _gain(final_norm), head, cos_table, sin_table, heads, kv_heads, head_dim, eps)
