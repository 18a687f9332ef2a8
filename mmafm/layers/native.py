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
- :func:`single_query_attention`: one query per row over K/V cache views (GQA), one C call.

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

import ctypes
import hashlib
import os
import platform
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
    "MAX_NATIVE_ROWS",
    "MAX_NATIVE_NORM_ELEMENTS",
]

MAX_NATIVE_ROWS = 8  # more rows than this: a GEMM (F.linear) reuses the weights better

_SOURCE = r"""
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#define PARALLEL_MIN_ELEMENTS 131072L /* smaller weights: one thread (fork/join would dominate) */
/* y[b, o] = sum_i x[b, i] * w[o, i] for b < batch (few rows), written with row stride ystride:
   every weight row is read once and used for all input rows while it sits in L1; 16 float32
   accumulators per dot product (one AVX-512 register, or two AVX2 ones, once vectorised). */
static void gemv(const float* restrict x, const float* restrict w, float* restrict y,
                 long batch, long out, long in, long ystride) {
  /* orphaned work-sharing: inside mmafm_gemv3_f32's parallel region the rows are split over the
     team (no barrier until the region ends); outside one, this is a plain loop */
  #pragma omp for schedule(static) nowait
  for (long o0 = 0; o0 < out; o0 += 4) {
    const long rows = out - o0 < 4 ? out - o0 : 4;
    for (long b = 0; b < batch; ++b) {
      const float* xb = x + b * in;
      for (long r = 0; r < rows; ++r) {
        const float* wr = w + (o0 + r) * in;
        float acc[16] = {0};
        long i = 0;
        for (; i + 16 <= in; i += 16)
          for (int j = 0; j < 16; ++j) acc[j] += wr[i + j] * xb[i + j];
        float s = 0.0f;
        for (int j = 0; j < 16; ++j) s += acc[j];
        for (; i < in; ++i) s += wr[i] * xb[i];
        y[b * ystride + o0 + r] = s;
      }
    }
  }
}

/* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for rows r (RMSNorm, the arithmetic order of torch's) */
void mmafm_rms_norm_f32(const float* restrict x, const float* restrict w, float* restrict y,
                        long rows, long dim, float eps) {
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

/* softmax(q k^T * scale) v for ONE query per (row, head), grouped-query heads: query head h reads
   KV head h / (heads / kv_heads). q, out: (batch, heads, dim) contiguous; k, v: (batch, kv_heads,
   keys, dim) with the given batch / head strides (views of a KV cache). Returns 0, or 1 when out
   of memory (nothing written). */
int mmafm_decode_attention_f32(const float* restrict q, const float* restrict k, const float* restrict v,
                               float* restrict out, long batch, long heads, long kv_heads, long keys,
                               long dim, long kv_batch_stride, long kv_head_stride, float scale) {
  float* scores = malloc(sizeof(float) * (keys > 0 ? keys : 1));
  if (!scores) return 1;
  const long group = heads / kv_heads;
  for (long b = 0; b < batch; ++b) {
    for (long h = 0; h < heads; ++h) {
      const float* qh = q + (b * heads + h) * dim;
      const float* kh = k + b * kv_batch_stride + (h / group) * kv_head_stride;
      const float* vh = v + b * kv_batch_stride + (h / group) * kv_head_stride;
      float best = -INFINITY;
      for (long t = 0; t < keys; ++t) {
        const float* kt = kh + t * dim;
        float acc[16] = {0};  /* 16 lanes so the dot product vectorises without -ffast-math */
        long d = 0;
        for (; d + 16 <= dim; d += 16)
          for (int j = 0; j < 16; ++j) acc[j] += qh[d + j] * kt[d + j];
        float dot = 0.0f;
        for (int j = 0; j < 16; ++j) dot += acc[j];
        for (; d < dim; ++d) dot += qh[d] * kt[d];
        dot *= scale;
        scores[t] = dot;
        best = dot > best ? dot : best;
      }
      float total = 0.0f;
      #pragma omp simd reduction(+:total)
      for (long t = 0; t < keys; ++t) {
        scores[t] = expf(scores[t] - best);
        total += scores[t];
      }
      float* oh = out + (b * heads + h) * dim;
      for (long d = 0; d < dim; ++d) oh[d] = 0.0f;
      for (long t = 0; t < keys; ++t) {
        const float weight = scores[t] / total;
        const float* vt = vh + t * dim;
        for (long d = 0; d < dim; ++d) oh[d] += weight * vt[d];
      }
    }
  }
  free(scores);
  return 0;
}

/* up to three weights sharing one input (Q/K/V, gate/up): y = [x w0^T | x w1^T | x w2^T] */
void mmafm_gemv3_f32(const float* x, const float* w0, const float* w1, const float* w2, float* y,
                     long batch, long out0, long out1, long out2, long in, int nthreads) {
  const long stride = out0 + out1 + out2;
  #pragma omp parallel num_threads(nthreads) if (nthreads > 1 && stride * in >= PARALLEL_MIN_ELEMENTS)
  {
    gemv(x, w0, y, batch, out0, in, stride);
    if (out1) gemv(x, w1, y + out0, batch, out1, in, stride);
    if (out2) gemv(x, w2, y + out0 + out1, batch, out2, in, stride);
  }
}
"""
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_kernel = None  # the ctypes gemv function once loaded; False when unavailable
_norm_kernel = None  # the ctypes RMSNorm function, loaded with _kernel
_attention_kernel = None  # the ctypes single-query attention function, loaded with _kernel
_failure = ""  # why the kernel is unavailable


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
    global _kernel, _norm_kernel, _attention_kernel, _failure
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
            _kernel, _norm_kernel, _attention_kernel = function, norm, attention
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _kernel, _failure = False, str(error)
            warnings.warn(f"mmafm: native gemv kernel unavailable ({error}); using F.linear", stacklevel=3)
        return _kernel


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


def _plain(module: nn.Module) -> bool:
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
        and all(_plain(m) for m in modules)
        and all(_native_ok(x, m.weight) for m in modules)
    ):
        weights = tuple(m.weight for m in modules)
        return _native(x, weights).split([w.shape[0] for w in weights], dim=-1)
    return tuple(apply_linear(m, x) for m in modules)


def apply_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a plain bias-free ``nn.Linear`` without hooks goes through :func:`linear`.

    Anything else (adapters replacing the layer, hooks, biases) is called as a module.
    """
    if _plain(module):
        return linear(x, module.weight)
    return module(x)
