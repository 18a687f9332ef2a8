"""Native CPU kernels for decode-sized inference: GEMV, RMSNorm, fused decoder halves, a whole step.

Decoding one token at a time multiplies every weight matrix by a single vector, so a decode step
costs one read of all weights: its speed limit is memory bandwidth, not FLOPs. On the x86 CPUs
this project runs on, ``F.linear`` with one fp32 row reaches about half the bandwidth a plain
streaming read gets, and each small torch op costs microseconds of dispatch. The C in ``csrc/``
(float32 and bfloat16 variants of one template, made by the preprocessor) removes both:

- :func:`linears` / :func:`linear`: at most :data:`MAX_ROWS` rows go to a C GEMV that streams each
  weight row once for all input rows (up to three weights sharing an input in one call); more
  rows (prefill) go to oneDNN's matmul; :func:`kernel_linears` routes every ``F.linear`` of a block
  of code there (what the prefill of :mod:`mmafm.inference.generate` runs under);
- :func:`attention_block` (RMSNorm, Q/K/V, QK-norm, RoPE, cache write, attention, output
  projection and residual of one layer) and :func:`swiglu_block` (the FFN half): one call each;
- :func:`lut_linear`: a GEMV over packed 2/4/8-bit codes and their lookup tables
  (``csrc/lut.c``), for the compressed linears of :mod:`mmafm.compress`;
- :func:`decode_step`: a whole step of a dense decoder (embedding to logits) in one call, for
  float32 or bfloat16 weights and cache. Python's per-op overhead is then gone, and a step costs
  about one read of the weights.
  Built with LoRA factors (:func:`lora_layer`), it also runs a mixed-adapter batch: each row's
  adapter ``s B A x`` added to every adapted projection inside the same call (``csrc/lora.c``).

Which of these runs for which layer is decided by :mod:`mmafm.inference.plan`; this module only
knows tensors. Every function here is for inference (no autograd, CPU, not under
``torch.compile``) and falls back to torch, or returns None, for anything else; one helper,
:func:`kernel_ready`, says whether a kernel may read a set of tensors.

The C is compiled on first use with the system C compiler (``$MMAFM_CC``, else ``cc`` / ``gcc``;
``-O3 -march=native -pthread``), cached under ``$MMAFM_CACHE_DIR`` (default ``~/.cache/mmafm``)
keyed by source, flags, compiler and host CPU, and loaded with :mod:`ctypes` (calls release the
GIL). A failed build (no compiler, bad flags) is one warning, after which everything takes the
torch path; ``MMAFM_NATIVE_LINEAR=0`` or :func:`kernels_disabled` switch the kernels off. Sums
are accumulated in float32 in another order than torch's, so results match to float32 rounding
(about 1e-6 relative), not bit for bit. The GEMV splits rows over ``torch.get_num_threads()``
threads for weights of >= 128K elements (smaller ones run on one thread), and so does the
attention over a long cache, on the kernels' own thread pool (``csrc/pool.h``), not OpenMP: the
threads claim chunks of rows instead of being assigned a share, so a helper thread that the OS
has not scheduled (another process wants the core) holds nothing up, and idle helpers sleep
after ``$MMAFM_SPIN_US`` microseconds (default 50) instead of spinning for milliseconds. On a
busy machine an OpenMP team made decode several times slower than one thread (issue 12). Results
do not depend on the thread count: each output is one thread's sum in a fixed order.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mmafm.io import atomic_path

__all__ = [
    "MAX_ROWS",
    "MAX_NORM_ELEMENTS",
    "CSRC",
    "FLAGS",
    "SYMBOLS",
    "KernelBuildError",
    "build_library",
    "KernelLoader",
    "Kernels",
    "kernels",
    "kernels_available",
    "kernels_unavailable_reason",
    "kernels_disabled",
    "kernels_switched_off",
    "kernel_ready",
    "linear",
    "linears",
    "kernel_linears",
    "rms_norm",
    "attention_block",
    "swiglu_block",
    "DecodeLayer",
    "DecodeStep",
    "decode_layer",
    "decode_step",
    "LORA_PROJECTIONS",
    "LoRAMatrix",
    "LoRALayer",
    "lora_layer",
    "lut_linear",
    "int8_tables",
    "int8_codes",
    "affine_tables",
    "q8_quantize",
    "q8_linear",
    "PackedMatrix",
    "PackedDecodeLayer",
    "PackedDecodeStep",
    "packed_decode_layer",
    "packed_decode_step",
]

MAX_ROWS = 8  # more rows than this (batched decode too): a GEMM (oneDNN) reuses the weights better
MAX_NORM_ELEMENTS = 16384  # larger inputs: torch's vectorised, multi-threaded rms_norm
_F32 = torch.float32

CSRC = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-pthread", "-shared", "-fPIC")


class DecodeLayer(ctypes.Structure):
    """One decoder layer for :class:`DecodeStep` (mirrors ``mmafm_layer_t`` in ``csrc/api.h``)."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "attn_norm", "wq", "wk", "wv", "wo", "q_norm", "k_norm", "ffn_norm", "w_gate", "w_up", "w_down",
        "k_cache", "v_cache",
    )] + [(name, ctypes.c_long) for name in ("kv_batch_stride", "kv_head_stride", "slots", "ring", "rope", "hidden")]


# the adapted projections of a layer, in the order of csrc/api.h's MMAFM_LORA_WQ ... MMAFM_LORA_W_DOWN
LORA_PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class LoRAMatrix(ctypes.Structure):
    """One projection's adapters for a mixed-adapter :class:`DecodeStep` (mirrors
    ``mmafm_lora_matrix_t``): float32 ``A`` (S, r, in), ``B`` transposed (S, r, out), ``scale``
    (S,); A = NULL: not adapted."""

    _fields_ = [("A", ctypes.c_void_p), ("B", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("rank", ctypes.c_long)]


class LoRALayer(ctypes.Structure):
    """One layer's :class:`LoRAMatrix` per :data:`LORA_PROJECTIONS` (mirrors ``mmafm_lora_layer_t``)."""

    _fields_ = [("m", LoRAMatrix * len(LORA_PROJECTIONS))]


class _LoRAStep(ctypes.Structure):
    """The adapters of one call (mirrors ``mmafm_lora_t``): every layer's, each cache row's slot."""

    _fields_ = [("layers", ctypes.c_void_p), ("row_slot", ctypes.c_void_p), ("slots", ctypes.c_long)]


_P, _L, _F, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
_GEMV3 = (None, [_P] * 5 + [_L] * 5 + [_I])
_ATTENTION = (_I, [_P] * 3 + [_F] + [_P] * 10 + [_L] * 4 + [_P, _L] + [_L] * 5 + [_I])
_SWIGLU = (_I, [_P] * 2 + [_F] + [_P] * 3 + [_L] * 3 + [_I])
_STEP = (_I, [_P] * 5 + [_L] * 2 + [_P, _L] + [ctypes.POINTER(DecodeLayer), _L] + [_P] * 3 + [_L] * 6 + [_F, _I])
_CHUNK = (_I, [_P] * 5 + [_L] * 3 + [_P, _L] + [ctypes.POINTER(DecodeLayer), _L] + [_P] * 3 + [_L] * 6 + [_F, _I])
_LORA_STEP, _LORA_CHUNK = ((_I, argtypes[:-1] + [_P, _I]) for _, argtypes in (_STEP, _CHUNK))  # + the adapters
# symbol -> (restype, argtypes): every function csrc/api.h declares, in its order (a test parses
# api.h and checks the two agree)
SYMBOLS: dict[str, tuple] = {
    "mmafm_rms_norm_f32": (None, [_P] * 3 + [_L] * 2 + [_F]),
    "mmafm_gemv3_f32": _GEMV3,
    "mmafm_gemv3_bf16": _GEMV3,
    "mmafm_attention_decode_f32": _ATTENTION,
    "mmafm_attention_decode_bf16": _ATTENTION,
    "mmafm_swiglu_decode_f32": _SWIGLU,
    "mmafm_swiglu_decode_bf16": _SWIGLU,
    "mmafm_decode_step_f32": _STEP,
    "mmafm_decode_step_bf16": _STEP,
    "mmafm_decode_chunk_f32": _CHUNK,
    "mmafm_decode_chunk_bf16": _CHUNK,
    "mmafm_lora_decode_step_f32": _LORA_STEP,  # csrc/lora.c: mixed-adapter batches
    "mmafm_lora_decode_step_bf16": _LORA_STEP,
    "mmafm_lora_decode_chunk_f32": _LORA_CHUNK,
    "mmafm_lora_decode_chunk_bf16": _LORA_CHUNK,
    "mmafm_pool_helpers": (_I, []),
    "mmafm_lut_gemv_f32": (_I, [_P] * 4 + [_L] * 4 + [_I, _L, _I]),  # csrc/lut.c (mmafm.compress)
    "mmafm_lut_decode_chunk_f32": (_I, [_P] * 5 + [_L] * 3 + [_P, _L] + [_P, _L] + [_P] * 3 + [_L] * 6 + [_F, _I]),
    "mmafm_q8_quantize": (None, [_P] * 3 + [_L] * 2),  # csrc/q8.c: the opt-in int8-activation path
    "mmafm_q8_gemv_f32": (_I, [_P] * 6 + [_L] * 4 + [_I, _L, _I]),
}
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}  # storage type -> variant


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded (no compiler, bad flags, missing symbol)."""


class Kernels:
    """The loaded library: each :data:`SYMBOLS` entry as an attribute without its ``mmafm_``
    prefix (``kernels.gemv3_f32(...)``), its ctypes signature set."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library
        for symbol, (restype, argtypes) in SYMBOLS.items():
            try:
                function = getattr(library, symbol)
            except AttributeError as error:
                raise KernelBuildError(f"{library._name} lacks the symbol {symbol}") from error
            function.restype, function.argtypes = restype, argtypes
            setattr(self, symbol.removeprefix("mmafm_"), function)

    def variant(self, name: str, dtype: torch.dtype):
        """The ``name`` kernel for weights stored as ``dtype`` (float32 or bfloat16)."""
        return getattr(self, f"{name}_{_SUFFIX[dtype]}")


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            lines = [line for line in handle if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def build_library(compiler: str | None = None, flags: Sequence[str] = FLAGS, cache_dir: str | Path | None = None,
                  source: str | Path | None = None) -> Path:
    """Compile ``csrc/kernels.c`` (or ``source``) into a shared library (once per source, flags,
    compiler and CPU).

    Args:
        compiler: executable name or path; default ``$MMAFM_CC``, else ``cc``, else ``gcc``.
        flags: compiler flags (``-shared -fPIC`` included).
        cache_dir: where built libraries are kept; default ``$MMAFM_CACHE_DIR/native`` or
            ``~/.cache/mmafm/native``.
        source: another C file to build instead (e.g. ``mmafm/train/csrc/adastar.c``); it may
            include this ``csrc/``'s headers (``pool.h``), and the cache key covers the ``.c`` /
            ``.h`` files of both folders. The library is named after its stem.

    Returns:
        The path of the library.

    Raises:
        KernelBuildError: no such compiler, or the compilation failed (with its first 500
            characters of stderr).
    """
    name = compiler or os.environ.get("MMAFM_CC") or shutil.which("cc") or shutil.which("gcc")
    resolved = shutil.which(name) if name else None
    if resolved is None:
        raise KernelBuildError(f"no C compiler: {name or 'cc/gcc'!r} not found (set MMAFM_CC or install cc)")
    source = Path(source) if source is not None else CSRC / "kernels.c"
    folders = [CSRC] if source.parent == CSRC else [source.parent, CSRC]
    sources = "\0".join(path.read_text() for folder in folders for path in sorted(folder.glob("*.[ch]")))  # all the build reads
    key = hashlib.sha256("\0".join([sources, " ".join(flags), resolved, platform.node(), _cpu_id()]).encode())
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("MMAFM_CACHE_DIR", Path.home() / ".cache" / "mmafm"))
    library = root / "native" / f"{source.stem}_{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    with atomic_path(library) as built:  # concurrent builders all end with a whole file
        command = [resolved, *flags, *(f"-I{folder}" for folder in folders), str(source), "-o", str(built), "-lm"]
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except (OSError, subprocess.SubprocessError) as error:
            raise KernelBuildError(f"running {resolved} failed: {error}") from error
        if result.returncode:
            raise KernelBuildError(
                f"compiling {source} with {' '.join([resolved, *flags])} failed: "
                f"{result.stderr.strip()[:500]}"
            )
    return library


class KernelLoader:
    """Builds and loads the kernels on first :meth:`get`, once; a failure is one warning and
    remembered (``failure`` says why), after which :meth:`get` returns None.

    Args:
        compiler, flags, cache_dir: as :func:`build_library`.
    """

    def __init__(self, compiler: str | None = None, flags: Sequence[str] = FLAGS,
                 cache_dir: str | Path | None = None):
        self.compiler, self.flags, self.cache_dir = compiler, tuple(flags), cache_dir
        self.failure = ""
        self._kernels: Kernels | bool | None = None  # None: not tried yet; False: unavailable
        self._lock = threading.Lock()

    def get(self) -> Kernels | None:
        """The kernels, or None where they cannot be built (or ``MMAFM_NATIVE_LINEAR=0``)."""
        if self._kernels is None:
            with self._lock:
                if self._kernels is None:
                    self._kernels = self._load()
        return self._kernels or None

    def _load(self) -> Kernels | bool:
        if os.environ.get("MMAFM_NATIVE_LINEAR", "1") == "0":
            self.failure = "disabled by MMAFM_NATIVE_LINEAR=0"
            return False
        try:
            return Kernels(ctypes.CDLL(str(build_library(self.compiler, self.flags, self.cache_dir))))
        except (KernelBuildError, OSError) as error:
            self.failure = str(error)
            warnings.warn(f"mmafm: native decode kernels unavailable ({error}); decoding takes the torch path",
                          RuntimeWarning, stacklevel=3)
            return False


_LOADER = KernelLoader()
_switched_off = False  # kernels_disabled() in effect


def kernels() -> Kernels | None:
    """The process's kernels (built on first use), or None when unavailable or switched off."""
    return None if _switched_off else _LOADER.get()


def kernels_available() -> bool:
    """Can the kernels run here (building them on first call), and are they switched on?"""
    return kernels() is not None


def kernels_unavailable_reason() -> str:
    """Why :func:`kernels` returns None ("" when it does not): the build error, the environment
    switch, or :func:`kernels_disabled`."""
    if kernels_available():
        return ""
    return "switched off by kernels_disabled()" if _switched_off else _LOADER.failure


@contextlib.contextmanager
def kernels_disabled() -> Iterator[None]:
    """Inside this block every decode takes the plain torch module path (e.g. to time or check
    the module-by-module computation against the kernels); they come back after it. The switch
    is process-wide, not per thread."""
    global _switched_off
    saved, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = saved


def kernels_switched_off() -> bool:
    """Is :func:`kernels_disabled` in effect? (Other native code, e.g. AdaStar's update in
    :mod:`mmafm.train.native_optim`, honours the same switch without building these kernels.)"""
    return _switched_off


# ----------------------------------------------------------------------------- eligibility

_PLAIN = (torch.Tensor, nn.Parameter)  # no tensor subclasses (DTensor, fake tensors, proxies)


def kernel_ready(dtype: torch.dtype, *tensors: torch.Tensor | None, contiguous: bool = True) -> bool:
    """May a kernel read ``tensors`` (None entries skipped) in place of torch? Plain CPU tensors
    of ``dtype`` (contiguous unless told otherwise), nothing autograd would record, not traced by
    ``torch.compile``. The one check every wrapper below makes before its call."""
    if torch.compiler.is_compiling():
        return False
    recording = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if (type(t) not in _PLAIN or t.dtype != dtype or not t.is_cpu or (contiguous and not t.is_contiguous())
                or (recording and t.requires_grad)):
            return False
    return True


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_chunk(tokens: torch.Tensor, positions: torch.Tensor, column: int, key_valid: torch.Tensor | None,
                 max_rows: int | None = None) -> None:
    """The arguments of a decode chunk (``DecodeStep.chunk``, ``PackedDecodeStep.chunk``): tokens and
    positions (B, T) int64 (B <= ``max_rows`` when given), key_valid None or (B, >= column + T) bool
    with unit column stride; ValueError naming what is wrong."""
    if tokens.dtype != torch.int64 or tokens.dim() != 2 or positions.shape != tokens.shape \
            or positions.dtype != torch.int64 or (max_rows is not None and not 0 < tokens.shape[0] <= max_rows):
        rows = "batch" if max_rows is None else f"batch <= {max_rows}"
        raise ValueError(f"tokens and positions must be ({rows}, T) int64, got {tokens.dtype} {tuple(tokens.shape)} "
                         f"and {positions.dtype} {tuple(positions.shape)}")
    batch, chunk = tokens.shape
    if key_valid is not None and not (key_valid.dtype == torch.bool and key_valid.dim() == 2
                                      and key_valid.shape[0] == batch and key_valid.shape[1] >= column + chunk
                                      and key_valid.stride(1) == 1):
        raise ValueError(f"key_valid must be ({batch}, >= {column + chunk}) bool with unit column stride")


# ----------------------------------------------------------------------------- linear layers

# oneDNN's fp32 matmul (what inductor lowers CPU linears to) is 5-20% faster than F.linear's MKL
# call for prefill-sized inputs on this project's CPUs; used for inference only
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linears(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tuple(F.linear(x, w) for w in weights)`` for 1 to 3 weights reading the same input
    (Q/K/V, gate/up): with the kernels and at most :data:`MAX_ROWS` rows, one GEMV call for all
    of them (the outputs are then views of one buffer)."""
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"linears takes 1 to 3 weights, got {len(weights)}")
    library = kernels()
    in_features = x.shape[-1]
    if (
        library is not None and 0 < x.numel() <= MAX_ROWS * in_features
        and kernel_ready(_F32, x, contiguous=False) and kernel_ready(_F32, *weights)
        and all(w.dim() == 2 and w.shape[1] == in_features for w in weights)
    ):
        outs = [w.shape[0] for w in weights] + [0] * (3 - len(weights))
        pointers = [w.data_ptr() for w in weights] + [None] * (3 - len(weights))
        rows = x.reshape(-1, in_features).contiguous()  # (N, in)
        y = torch.empty(x.shape[:-1] + (sum(outs),), dtype=_F32)  # (..., out0 + out1 + out2)
        library.gemv3_f32(rows.data_ptr(), *pointers, y.data_ptr(), rows.shape[0], *outs, in_features,
                          torch.get_num_threads())
        return y.split([w.shape[0] for w in weights], dim=-1)
    return tuple(F.linear(x, w) for w in weights)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # (..., in) x (out, in) -> (..., out)
    """``F.linear(x, weight)``: few-row CPU float32 inference through the GEMV kernel, many-row
    (prefill) through oneDNN's matmul, everything else (training, other dtypes) plain."""
    if x.numel() <= MAX_ROWS * x.shape[-1]:
        return linears(x, weight)[0]
    if (
        _ONEDNN and not _switched_off and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
        and kernel_ready(_F32, x, contiguous=False) and kernel_ready(_F32, weight)
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


class _KernelLinears(TorchFunctionMode):
    """Every bias-free ``F.linear`` (what ``nn.Linear`` and most adapters call) goes to
    :func:`linear`; every other op runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, *rest = args  # nn.Linear passes its bias (None) positionally
            if (rest[0] if rest else kwargs.get("bias")) is None:
                return linear(x, weight)
        return func(*args, **kwargs)


@contextlib.contextmanager
def kernel_linears() -> Iterator[None]:
    """Inside this block ``F.linear`` calls take :func:`linear` (GEMV for few rows, oneDNN for
    many): the prefill's dispatch, whatever modules call them. It costs a Python call per torch
    op, which a prefill does not notice and a decode step of a small model would, so decode steps
    run through the plan's kernels instead."""
    with _KernelLinears():
        yield


def lut_linear(
    x: torch.Tensor,  # (..., in) float32
    codes: torch.Tensor,  # (out, code_stride) uint8: codes of `bits` packed per row, lowest bits first
    table: torch.Tensor,  # (groups, 2^bits) float32: the table of each group of `group_rows` rows
    bits: int,
    group_rows: int,
    threads: int | None = None,  # default torch.get_num_threads()
) -> torch.Tensor | None:  # (..., out) float32, or None where the kernel does not apply
    """``x @ W.T`` for a packed weight ``W[o, i] = table[o // group_rows, code(o, i)]`` straight
    from the codes (``csrc/lut.c``), for at most :data:`MAX_ROWS` float32 CPU rows at inference;
    None otherwise (the caller dequantizes). The packed modules of :mod:`mmafm.compress` call it."""
    library = kernels()
    if library is None or x.dim() == 0 or not 0 < x.numel() <= MAX_ROWS * x.shape[-1] or bits not in (2, 4, 8):
        return None
    out, stride = codes.shape if codes.dim() == 2 else (0, 0)
    in_features = x.shape[-1]
    if not (
        codes.dtype == torch.uint8 and kernel_ready(torch.uint8, codes) and kernel_ready(_F32, table)
        and kernel_ready(_F32, x, contiguous=False) and stride * 8 >= in_features * bits
        and table.dim() == 2 and table.shape[1] == 1 << bits and table.shape[0] * group_rows >= out
    ):
        return None
    rows = x.reshape(-1, in_features).contiguous()  # (N, in)
    y = torch.empty(x.shape[:-1] + (out,), dtype=_F32)
    failed = library.lut_gemv_f32(rows.data_ptr(), codes.data_ptr(), table.data_ptr(), y.data_ptr(), rows.shape[0],
                                  out, in_features, stride, bits, group_rows, threads or torch.get_num_threads())
    return None if failed else y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # (..., dim)
    """``F.rms_norm(x, (dim,), weight, eps)``; up to :data:`MAX_NORM_ELEMENTS` float32 CPU
    elements go to the kernels' RMSNorm (the one every fused kernel applies), equal to torch's
    up to float32 summation order."""
    library = kernels()
    if (
        library is not None and weight.dim() == 1 and x.shape[-1] == weight.shape[0]
        and 0 < x.numel() <= MAX_NORM_ELEMENTS
        and kernel_ready(_F32, x, contiguous=False) and kernel_ready(_F32, weight)
    ):
        rows = x.contiguous()
        y = torch.empty(x.shape, dtype=_F32)
        library.rms_norm_f32(rows.data_ptr(), weight.data_ptr(), y.data_ptr(), rows.numel() // weight.shape[0],
                             weight.shape[0], eps)
        return y
    return F.rms_norm(x, weight.shape, weight, eps)


# ----------------------------------------------------------------------------- fused decoder halves


def attention_block(
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
) -> torch.Tensor | None:  # (B, 1, dim), or None where the kernel does not apply
    """The attention half of a pre-norm decoder layer for one decode step, in one native call:
    ``x + o_proj(attn(rope(qk_norm(q)), rope(qk_norm(k)), v))`` of ``rms_norm(x)``, writing the new
    K/V into the cache. For float32 CPU inference; None (nothing written) otherwise.

    Equal to the module-by-module computation up to float32 summation order."""
    library = kernels()
    if library is None or x.dim() != 3 or x.shape[1] != 1 or not 0 < x.shape[0] <= MAX_ROWS or k_cache.dim() != 4:
        return None  # more rows: torch's GEMMs (oneDNN) beat a GEMV per row
    batch, _, dim = x.shape
    _, kv_heads, slots, head_dim = k_cache.shape
    q_width = wq.shape[0]
    if not (
        kernel_ready(_F32, x, norm_weight, wq, wk, wv, wo, q_norm_weight, k_norm_weight, cos, sin)
        and kernel_ready(_F32, k_cache, v_cache, contiguous=False)
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
    failed = library.attention_decode_f32(
        x.data_ptr(), y.data_ptr(), norm_weight.data_ptr(), eps,
        wq.data_ptr(), _ptr(wk), _ptr(wv), wo.data_ptr(), _ptr(q_norm_weight), _ptr(k_norm_weight),
        _ptr(cos), _ptr(sin), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
        write_slot, num_keys, _ptr(key_valid), 0 if key_valid is None else key_valid.stride(0),
        batch, dim, q_width // head_dim, kv_heads, head_dim, torch.get_num_threads(),
    )
    return None if failed else y


def swiglu_block(
    x: torch.Tensor,  # (B, 1, dim), updated in place
    norm_weight: torch.Tensor,  # (dim,) pre-FFN RMSNorm gain
    eps: float,
    w_gate: torch.Tensor,  # (hidden, dim)
    w_up: torch.Tensor,  # (hidden, dim)
    w_down: torch.Tensor,  # (dim, hidden)
) -> bool:
    """``x += w_down(silu(w_gate n) * w_up n)`` with ``n = rms_norm(x)``, in place, in one native
    call (float32 CPU inference). False, with ``x`` untouched, where the kernel does not apply."""
    library = kernels()
    if library is None or x.dim() != 3 or x.shape[1] != 1 or not 0 < x.shape[0] <= MAX_ROWS:
        return False
    batch, _, dim = x.shape
    hidden = w_gate.shape[0]
    if not (
        kernel_ready(_F32, x, norm_weight, w_gate, w_up, w_down)
        and norm_weight.shape == (dim,) and w_gate.shape == w_up.shape == (hidden, dim)
        and w_down.shape == (dim, hidden)
    ):
        return False
    failed = library.swiglu_decode_f32(x.data_ptr(), norm_weight.data_ptr(), eps, w_gate.data_ptr(), w_up.data_ptr(),
                                       w_down.data_ptr(), batch, dim, hidden, torch.get_num_threads())
    return not failed


# ----------------------------------------------------------------------------- whole decode step


class DecodeStep:
    """A whole decode step of a dense pre-norm decoder in one native call: embedding, every layer
    through the fused attention and SwiGLU halves, final RMSNorm and output head, K/V written into
    the cache. Weights and cache are float32, or bfloat16 (read at half the bytes, converted to
    float32 in registers: activations and sums stay float32). Built by :func:`decode_step` from
    validated tensors, which it keeps alive; the caller keeps the cache's bookkeeping (columns,
    positions).

    Built with LoRA adapters (``lora``, :func:`lora_layer` per layer), a call given
    ``adapter_rows`` (one slot per cache row, -1 = none) adds each row's adapter to every adapted
    projection inside the same native call (``csrc/lora.c``: a mixed-adapter batch); without
    ``adapter_rows`` it runs the plain step, unchanged.
    """

    def __init__(self, library: Kernels, layers: list[tuple[DecodeLayer, tuple]], embed: torch.Tensor,
                 final_norm: torch.Tensor, head: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                 heads: int, kv_heads: int, head_dim: int, eps: float,
                 lora: list[tuple[LoRALayer, tuple]] | None = None, lora_slots: int = 0):
        self._tensors = [t for _, kept in layers for t in kept] + [embed, final_norm, head, cos_table, sin_table]
        self._layers = (DecodeLayer * len(layers))(*(layer for layer, _ in layers))
        self._kernel = library.variant("decode_step", head.dtype)
        self._chunk_kernel = library.variant("decode_chunk", head.dtype)
        self.lora_slots = lora_slots if lora else 0  # adapter slots the step holds (0: no adapters)
        if lora:
            self._tensors += [t for _, kept in lora for t in kept]
            self._lora_layers = (LoRALayer * len(lora))(*(layer for layer, _ in lora))
            self._lora_kernel = library.variant("lora_decode_step", head.dtype)
            self._lora_chunk_kernel = library.variant("lora_decode_chunk", head.dtype)
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
        adapter_rows: torch.Tensor | None = None,  # (B,) int64 adapter slot per row, -1 = none
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
        arguments = (
            tokens.data_ptr(), self.embed.data_ptr(), positions.data_ptr(), self.cos_table.data_ptr(),
            self.sin_table.data_ptr(), self.cos_table.shape[0], column, _ptr(key_valid),
            0 if key_valid is None else key_valid.stride(0), self._layers, self.n_layers,
            self.final_norm.data_ptr(), self.head.data_ptr(), logits.data_ptr(), batch, self.dim, self.heads,
            self.kv_heads, self.head_dim, self.head.shape[0], self.eps,
        )
        if adapter_rows is None:
            failed = self._kernel(*arguments, torch.get_num_threads())
        else:
            rows = self._adapter_rows(adapter_rows, batch)
            failed = self._lora_kernel(*arguments, ctypes.addressof(self._lora_step(rows)), torch.get_num_threads())
        if failed == 2:
            raise ValueError(f"decode step: a token outside [0, {self.head.shape[0]}) or a position outside "
                             f"[0, {self.cos_table.shape[0]})")
        if failed:
            raise MemoryError("decode step: out of memory in the native kernel")
        return logits

    def chunk(
        self,
        tokens: torch.Tensor,  # (B, T) int64: T consecutive new tokens per cache row
        positions: torch.Tensor,  # (B, T) int64 RoPE positions
        column: int,  # cache column of each row's first new token (the t-th goes to column + t)
        key_valid: torch.Tensor | None = None,  # (B, >= column + T) bool, False = padding column
        adapter_rows: torch.Tensor | None = None,  # (B,) int64 adapter slot per cache row, -1 = none
    ) -> torch.Tensor:  # (B, T, V) float32 logits
        """T new tokens per row in one call, each attending to the cache and to the tokens of its
        row before it (the verification forward of speculative decoding): the weights are read once
        for all B x T rows. Each row's logits equal, bit for bit, those of feeding its tokens one
        step at a time (every sum keeps the one-row order). Linear (non-ring) caches only."""
        _check_chunk(tokens, positions, column, key_valid)
        batch, chunk = tokens.shape
        tokens, positions = tokens.contiguous(), positions.contiguous()
        logits = torch.empty((batch, chunk, self.head.shape[0]), dtype=_F32)
        arguments = (
            tokens.data_ptr(), self.embed.data_ptr(), positions.data_ptr(), self.cos_table.data_ptr(),
            self.sin_table.data_ptr(), self.cos_table.shape[0], column, chunk, _ptr(key_valid),
            0 if key_valid is None else key_valid.stride(0), self._layers, self.n_layers,
            self.final_norm.data_ptr(), self.head.data_ptr(), logits.data_ptr(), batch * chunk, self.dim, self.heads,
            self.kv_heads, self.head_dim, self.head.shape[0], self.eps,
        )
        if adapter_rows is None:
            failed = self._chunk_kernel(*arguments, torch.get_num_threads())
        else:
            rows = self._adapter_rows(adapter_rows, batch)
            failed = self._lora_chunk_kernel(*arguments, ctypes.addressof(self._lora_step(rows)),
                                             torch.get_num_threads())
        if failed == 2:
            raise ValueError(f"decode chunk: a token outside [0, {self.head.shape[0]}), a position outside "
                             f"[0, {self.cos_table.shape[0]}), a ring cache or no room for {chunk} columns at {column}")
        if failed:
            raise MemoryError("decode chunk: out of memory in the native kernel")
        return logits

    def _adapter_rows(self, adapter_rows: torch.Tensor, batch: int) -> torch.Tensor:  # (B,) int64
        """``adapter_rows`` checked against this step: one slot per cache row in [-1, slots)."""
        if not self.lora_slots:
            raise ValueError("adapter_rows given to a decode step built without LoRA adapters")
        if not (adapter_rows.dtype == torch.int64 and adapter_rows.shape == (batch,) and adapter_rows.is_cpu):
            raise ValueError(f"adapter_rows must be ({batch},) int64 on the CPU, got {adapter_rows.dtype} "
                             f"{tuple(adapter_rows.shape)} on {adapter_rows.device}")
        if batch and not -1 <= int(adapter_rows.min()) <= int(adapter_rows.max()) < self.lora_slots:
            raise ValueError(f"adapter_rows {adapter_rows.tolist()} outside [-1, {self.lora_slots})")
        return adapter_rows.contiguous()

    def _lora_step(self, rows: torch.Tensor) -> _LoRAStep:
        """The ``mmafm_lora_t`` of one call (``rows`` must outlive it)."""
        self._lora_call = _LoRAStep(ctypes.addressof(self._lora_layers), rows.data_ptr(), self.lora_slots)
        return self._lora_call


def lora_layer(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],  # name -> (A, B, scale)
    shapes: dict[str, tuple[int, int]],  # name -> (out, in) of that projection's weight
    slots: int,
) -> tuple[LoRALayer, tuple] | None:
    """One layer's adapters for a mixed-adapter :class:`DecodeStep`: for each name of
    :data:`LORA_PROJECTIONS` in ``factors``, ``A`` (slots, r, in), ``B`` (slots, out, r) and
    ``scale`` (slots,) as :class:`~mmafm.layers.lora.LoRALinear` holds them (any float dtype:
    the kernel reads float32, so bfloat16 factors are copied, exactly; float32 ``A`` and ``scale``
    are read in place; ``B`` is copied transposed, (slots, r, out), for the kernel's vector sums,
    so a step sees ``B`` as it was when built: a plan per decode call, as :func:`build_plan`
    makes them). Projections not in ``factors`` have no adapter.
    Returns ``(LoRALayer, tensors to keep alive)``, or None where the kernel cannot take them
    (a shape, a device, a rank over 256)."""
    matrices, kept = [LoRAMatrix() for _ in LORA_PROJECTIONS], []
    for name, (lora_A, lora_B, scale) in factors.items():
        if name not in LORA_PROJECTIONS or name not in shapes:
            return None
        out, in_features = shapes[name]
        lora_A, lora_B, scale = (t.detach().float().contiguous() for t in (lora_A, lora_B, scale))
        rank = lora_A.shape[1] if lora_A.dim() == 3 else 0
        if not (kernel_ready(_F32, lora_A, lora_B, scale) and 1 <= rank <= 256
                and lora_A.shape == (slots, rank, in_features) and lora_B.shape == (slots, out, rank)
                and scale.shape == (slots,)):
            return None
        lora_B = lora_B.transpose(1, 2).contiguous()  # (slots, r, out): csrc/lora.c's lora_up
        matrices[LORA_PROJECTIONS.index(name)] = LoRAMatrix(lora_A.data_ptr(), lora_B.data_ptr(), scale.data_ptr(),
                                                            rank)
        kept += [lora_A, lora_B, scale]
    return LoRALayer((LoRAMatrix * len(LORA_PROJECTIONS))(*matrices)), tuple(kept)


def _gain(t: torch.Tensor | None) -> torch.Tensor | None:
    """A norm gain as the kernels read it: float32, contiguous (a copy for bf16 models)."""
    return None if t is None else t.detach().float().contiguous()


def decode_layer(
    attn_norm: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor | None, wv: torch.Tensor | None, wo: torch.Tensor,
    q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, ffn_norm: torch.Tensor, w_gate: torch.Tensor,
    w_up: torch.Tensor, w_down: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ring: bool, rope: bool,
    heads: int,
) -> tuple[DecodeLayer, tuple] | None:
    """One layer of a :class:`DecodeStep` (weights as in :func:`attention_block` and
    :func:`swiglu_block`; ``k_cache`` / ``v_cache`` the whole (B, Hkv, slots, D) storage of the
    layer, or of its source when ``wk`` is None; ``heads`` query heads), or None where the step
    cannot run it. Matrices and caches are all float32 or all bfloat16; the norm gains are read
    as float32 (copies for bf16)."""
    if k_cache.dim() != 4 or wq.dtype not in _SUFFIX:
        return None
    _, kv_heads, slots, head_dim = k_cache.shape
    dim, hidden, q_width = wq.shape[1], w_gate.shape[0], wq.shape[0]
    matrices = (wq, wk, wv, wo, w_gate, w_up, w_down)
    if not (
        kernel_ready(wq.dtype, *matrices) and kernel_ready(wq.dtype, k_cache, v_cache, contiguous=False)
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
    gains = tuple(_gain(t) for t in (attn_norm, q_norm, k_norm, ffn_norm))
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
    lora: list[tuple[LoRALayer, tuple]] | None = None, lora_slots: int = 0,
) -> DecodeStep | None:
    """A :class:`DecodeStep` over ``layers`` (from :func:`decode_layer`), or None without the
    kernels or with tensors they cannot take. ``embed`` (V, dim) and ``head`` (V', dim) in the
    layers' storage type (float32 or bfloat16); RoPE tables float32. ``lora``: one
    :func:`lora_layer` per layer, holding ``lora_slots`` adapters (a mixed-adapter batch)."""
    if lora is not None and (len(lora) != len(layers) or lora_slots < 1):
        return None
    library = kernels()
    dtype = embed.dtype
    if not (
        library is not None and layers and dtype in _SUFFIX
        and kernel_ready(dtype, embed, head) and kernel_ready(_F32, cos_table, sin_table) and final_norm.is_cpu
        and embed.dim() == head.dim() == 2 and embed.shape[1] == head.shape[1] == final_norm.shape[0]
        and cos_table.shape == sin_table.shape == (cos_table.shape[0], head_dim)
        and heads % kv_heads == 0
        and all(kept[0].dtype == dtype and kept[0].shape == (heads * head_dim, embed.shape[1]) and layer.hidden
                for layer, kept in layers)
    ):
        return None
    return DecodeStep(library, layers, embed, _gain(final_norm), head, cos_table, sin_table, heads, kv_heads,
                      head_dim, eps, lora, lora_slots)


# ----------------------------------------------------------------------------- packed whole step (csrc/lut.c)

# What the packed step reads for one matrix: a float32 (out, in) tensor, or the LUT operands of a
# packed one, (codes (out, stride) uint8, table (groups, 2^bits) float32, bits, group_rows,
# row_scale (out,) float32 or None), as mmafm.compress's Packed.lut_operands() gives them.


class PackedMatrix(ctypes.Structure):
    """One weight matrix of a :class:`PackedDecodeStep` (mirrors ``mmafm_matrix_t`` in ``csrc/api.h``)."""

    _fields_ = [("data", _P), ("table", _P), ("row_scale", _P), ("code_stride", _L), ("group_rows", _L), ("bits", _L),
                ("qtable", _P), ("qaffine", _P)]


class PackedDecodeLayer(ctypes.Structure):
    """One decoder layer of a :class:`PackedDecodeStep` (mirrors ``mmafm_lut_layer_t`` in ``csrc/api.h``)."""

    _fields_ = ([(name, _P) for name in ("attn_norm", "q_norm", "k_norm", "ffn_norm")]
                + [(name, PackedMatrix) for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
                + [(name, _P) for name in ("k_cache", "v_cache")]
                + [(name, _L) for name in ("kv_batch_stride", "kv_head_stride", "slots", "ring", "rope", "hidden")])


def int8_tables(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (G, L) -> (G, L) uint8, (G, 2)
    """The tables of the int8-activation path (``csrc/q8.c``): each group's float32 entries as u8
    codes ``u`` of an affine grid, ``table ~ offset + step * u`` with 255 steps from the group's
    smallest entry to its largest (error <= step / 2; a constant table: step 0, u 0, exact).
    The grid spans the finite entries only: an entry no code reads may be infinite (SmolLM2's
    8-bit tables had such entries before ``kmeans_1d`` held its centroids to their points), and
    would otherwise make every step infinite; a non-finite entry gets the grid's nearest end.
    Returns ``(u, affine)``, ``affine[g] = (offset, step)`` float32."""
    table = table.float()
    finite = torch.isfinite(table)
    low = torch.where(finite, table, torch.full_like(table, float("inf"))).amin(1, keepdim=True)  # (G, 1)
    high = torch.where(finite, table, torch.full_like(table, float("-inf"))).amax(1, keepdim=True)  # (G, 1)
    low, high = torch.where(finite.any(1, keepdim=True), low, 0.0), torch.where(finite.any(1, keepdim=True), high, 0.0)
    table = torch.where(finite, table, torch.where(table > 0, high, low))
    step = (high - low) / 255
    inverse = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    codes = torch.round((table - low) * inverse).clamp_(0, 255).to(torch.uint8)
    return codes.contiguous(), torch.cat([low, step], 1).contiguous()


def int8_codes(codes: torch.Tensor, qtable: torch.Tensor, group_rows: int) -> torch.Tensor:  # (out, in) uint8
    """8-bit codes (out, in) as the int8 path reads them: each code replaced by its group's
    :func:`int8_tables` value ``u``, so the kernel feeds the bytes to its integer dot products
    as they are (no 256-entry lookup per weight); made once, when a step is built."""
    groups = torch.arange(codes.shape[0]) // group_rows  # (out,)
    return torch.gather(qtable[groups], 1, codes.long()).contiguous()  # (out, in)


def affine_tables(qaffine: torch.Tensor, levels: int = 256) -> torch.Tensor:  # (G, 2) -> (G, levels) float32
    """The float tables of :func:`int8_codes`' values: ``offset + step * u`` for u = 0..levels-1."""
    return (qaffine[:, :1] + qaffine[:, 1:] * torch.arange(levels, dtype=_F32)).contiguous()


def q8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:  # (N, in) -> (N, in), (N, ceil(in / 32))
    """Q8_0 activations as the int8 path makes them (``csrc/q8.c``): blocks of 32 columns,
    ``d = max|x| / 127``, ``q = rint(x * (1 / d))`` (ties to even). None without the kernels."""
    library = kernels()
    if library is None or x.dim() != 2 or not kernel_ready(_F32, x):
        return None
    rows, in_features = x.shape
    q = torch.empty(rows, in_features, dtype=torch.int8)
    d = torch.empty(rows, -(-in_features // 32), dtype=_F32)
    library.q8_quantize(x.data_ptr(), q.data_ptr(), d.data_ptr(), rows, in_features)
    return q, d


def q8_linear(
    x: torch.Tensor,  # (N <= MAX_ROWS, in) float32
    codes: torch.Tensor,  # (out, code_stride) uint8, as lut_linear's
    qtable: torch.Tensor,  # (groups, 2^bits) uint8: int8_tables' codes
    qaffine: torch.Tensor,  # (groups, 2) float32: int8_tables' (offset, step)
    bits: int,
    group_rows: int,
    row_scale: torch.Tensor | None = None,  # (out,) float32
    threads: int | None = None,
) -> torch.Tensor | None:  # (N, out) float32
    """The int8-activation GEMV of a 2-/4-/8-bit packed weight (``csrc/q8.c``, what a
    :class:`PackedDecodeStep` built with ``int8_activations`` runs): x quantized to Q8_0, integer
    dot products against the u8 tables; None where the kernel does not apply. At 8 bits ``codes``
    are :func:`int8_codes` (the u8 values; ``qtable`` is then not read)."""
    library = kernels()
    if library is None or x.dim() != 2 or not 0 < x.shape[0] <= MAX_ROWS or bits not in (2, 4, 8):
        return None
    out, stride = codes.shape
    if not (codes.dtype == torch.uint8 == qtable.dtype and kernel_ready(torch.uint8, codes, qtable)
            and kernel_ready(_F32, x, qaffine, row_scale) and qtable.shape[1] == 1 << bits
            and qaffine.shape == (qtable.shape[0], 2) and qtable.shape[0] * group_rows >= out):
        return None
    y = torch.empty(x.shape[0], out, dtype=_F32)
    failed = library.q8_gemv_f32(x.data_ptr(), codes.data_ptr(), qtable.data_ptr(), qaffine.data_ptr(),
                                 _ptr(row_scale), y.data_ptr(), x.shape[0], out, x.shape[1], stride, bits, group_rows,
                                 torch.get_num_threads() if threads is None else threads)
    if failed:
        raise (MemoryError if failed == 1 else ValueError)(f"q8 GEMV failed ({failed})")
    return y


def _int8_operands(codes: torch.Tensor, table: torch.Tensor, bits: int, group_rows: int, in_features: int) -> tuple:
    """``(codes, table, qtable, qaffine)`` of the int8 path (see :func:`_matrix`), kept on the codes
    tensor until its contents, the table or the grouping change: a plan is built per generate call,
    and mapping SmolLM2's 8-bit codes (:func:`int8_codes`) took ~0.25 s of each build."""
    cached = getattr(codes, "_mmafm_int8", None)
    if cached is not None and cached[0] == (codes._version, group_rows, in_features) and torch.equal(cached[1], table):
        qtable, qaffine, mapped, grid = cached[2]
    else:
        qtable, qaffine = int8_tables(table)
        mapped = grid = None  # 2/4 bits: the kernel reads the codes and table as they are
        if bits == 8:
            mapped, grid = int8_codes(codes[:, :in_features], qtable, group_rows), affine_tables(qaffine)
        codes._mmafm_int8 = ((codes._version, group_rows, in_features), table.clone(), (qtable, qaffine, mapped, grid))
    return (codes, table, qtable, qaffine) if mapped is None else (mapped, grid, qtable, qaffine)


def _matrix(operand, out: int, in_features: int, int8_activations: bool = False) -> tuple[PackedMatrix, tuple] | None:
    """``(PackedMatrix, tensors to keep alive)`` for a float32 (out, in) weight or LUT operands of
    that shape, or None where the kernel cannot read them. ``int8_activations``: 2-/4-/8-bit
    matrices also carry :func:`int8_tables`, so the step reads them on the int8 path; an 8-bit
    matrix's codes are then replaced by :func:`int8_codes` (a copy, one byte per weight) and its
    float table by :func:`affine_tables`, so a float-path read of the matrix (``csrc/lut.c``'s
    LUT GEMV) sees the same weights as the int8 path."""
    if isinstance(operand, torch.Tensor):
        if not (kernel_ready(_F32, operand) and operand.shape == (out, in_features)):
            return None
        return PackedMatrix(operand.data_ptr(), None, None, 0, 0, 32), (operand,)
    codes, table, bits, group_rows, row_scale = operand
    if not (
        bits in (2, 4, 8) and codes.dtype == torch.uint8 and kernel_ready(torch.uint8, codes)
        and kernel_ready(_F32, table, row_scale) and codes.dim() == 2 and codes.shape[0] == out
        and codes.shape[1] * 8 >= in_features * bits and table.dim() == 2 and table.shape[1] == 1 << bits
        and group_rows >= 1 and table.shape[0] * group_rows >= out and (row_scale is None or row_scale.shape == (out,))
    ):
        return None
    qtable = qaffine = None
    if int8_activations:
        codes, table, qtable, qaffine = _int8_operands(codes, table, bits, group_rows, in_features)
    kept = (codes, table) + (() if row_scale is None else (row_scale,)) + (() if qtable is None else (qtable, qaffine))
    return PackedMatrix(codes.data_ptr(), table.data_ptr(), _ptr(row_scale), codes.shape[1], group_rows, bits,
                        _ptr(qtable), _ptr(qaffine)), kept


def packed_decode_layer(
    attn_norm: torch.Tensor, wq, wk, wv, wo, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
    ffn_norm: torch.Tensor, w_gate, w_up, w_down, k_cache: torch.Tensor, v_cache: torch.Tensor, ring: bool,
    rope: bool, heads: int, dim: int, hidden: int, int8_activations: bool = False,
) -> tuple[PackedDecodeLayer, tuple] | None:
    """One layer of a :class:`PackedDecodeStep`, as :func:`decode_layer` but each matrix a float32
    tensor or LUT operands (see above); ``wk`` = ``wv`` = None: the layer shares K/V.
    The cache is float32. ``int8_activations``: its 2-/4-bit matrices run on the int8 path
    (``csrc/q8.c``). None where the step cannot run it."""
    if k_cache.dim() != 4 or (wk is None) != (wv is None):
        return None
    _, kv_heads, slots, head_dim = k_cache.shape
    q_width = heads * head_dim
    shapes = {"wq": (wq, q_width, dim), "wk": (wk, kv_heads * head_dim, dim), "wv": (wv, kv_heads * head_dim, dim),
              "wo": (wo, dim, q_width), "w_gate": (w_gate, hidden, dim), "w_up": (w_up, hidden, dim),
              "w_down": (w_down, dim, hidden)}
    matrices, kept = {}, []
    for name, (operand, out, in_features) in shapes.items():
        if operand is None:
            matrices[name] = PackedMatrix()
            continue
        made = _matrix(operand, out, in_features, int8_activations)
        if made is None:
            return None
        matrices[name], held = made
        kept += held
    if not (
        kernel_ready(_F32, k_cache, v_cache, contiguous=False) and heads % kv_heads == 0
        and all(t is None or t.is_cpu for t in (attn_norm, q_norm, k_norm, ffn_norm))
        and attn_norm.shape == ffn_norm.shape == (dim,)
        and (q_norm is None or q_norm.shape == (head_dim,)) and (k_norm is None or k_norm.shape == (head_dim,))
        and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
        and k_cache.stride(3) == 1 and k_cache.stride(2) == head_dim
    ):
        return None
    gains = tuple(_gain(t) for t in (attn_norm, q_norm, k_norm, ffn_norm))
    layer = PackedDecodeLayer(*(_ptr(t) for t in gains), **matrices, k_cache=k_cache.data_ptr(),
                              v_cache=v_cache.data_ptr(), kv_batch_stride=k_cache.stride(0),
                              kv_head_stride=k_cache.stride(1), slots=slots, ring=int(ring), rope=int(rope),
                              hidden=hidden)
    return layer, (*kept, *(t for t in gains if t is not None), k_cache, v_cache)


class PackedDecodeStep:
    """A whole decode step of a dense decoder whose matrices are packed (2/4/8-bit codes + LUTs)
    or float32, in one native call (``mmafm_lut_decode_chunk_f32``, a chunk of one token): the
    embedding row, every layer (Q/K/V and gate/up as one GEMV each), final norm and head, the K/V
    written into the float32 cache. Called like :class:`DecodeStep`; built by :func:`packed_decode_step`.

    ``int8_activations`` (opt-in; default the float path, whose logits equal the dequantized
    model's): every 2-/4-/8-bit matrix built with it reads Q8_0-quantized inputs through
    :func:`int8_tables` with integer dot products (``csrc/q8.c``), llama.cpp's kind of arithmetic;
    its logits then follow that quantized math, not the dequantized model's."""

    def __init__(self, library: Kernels, layers: list[tuple[PackedDecodeLayer, tuple]], embed: tuple,
                 final_norm: torch.Tensor, head: tuple, vocab: int, dim: int, cos_table: torch.Tensor,
                 sin_table: torch.Tensor, heads: int, kv_heads: int, head_dim: int, eps: float,
                 int8_activations: bool = False):
        self.int8_activations = int8_activations
        self._layers = (PackedDecodeLayer * len(layers))(*(layer for layer, _ in layers))
        self._embed, self._head = embed[0], head[0]
        self._tensors = [t for _, kept in layers for t in kept] + list(embed[1]) + list(head[1])
        self.final_norm, self.cos_table, self.sin_table = _gain(final_norm), cos_table, sin_table
        self.n_layers, self.vocab, self.dim = len(layers), vocab, dim
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps
        self._kernel = library.lut_decode_chunk_f32  # a step is a chunk of one token per row

    def __call__(
        self,
        tokens: torch.Tensor,  # (B,) int64, one new token per row
        positions: torch.Tensor,  # (B,) int64 RoPE positions
        column: int,  # cache column of the new tokens
        key_valid: torch.Tensor | None = None,  # (B, >= column + 1) bool, False = padding column
    ) -> torch.Tensor:  # (B, V) float32 logits
        _check_chunk(tokens[:, None], positions[:, None], column, key_valid, MAX_ROWS)  # a chunk of one token
        tokens, positions, batch = tokens.contiguous(), positions.contiguous(), tokens.shape[0]
        logits = torch.empty((batch, self.vocab), dtype=_F32)
        self._native(tokens, positions, column, 1, key_valid, logits)
        return logits

    def _native(self, tokens: torch.Tensor, positions: torch.Tensor, column: int, chunk: int,
                key_valid: torch.Tensor | None, out: torch.Tensor) -> None:
        """One ``mmafm_lut_decode_chunk_f32`` call: ``tokens`` / ``positions`` contiguous, B x
        ``chunk`` of them, logits into the contiguous ``out``; its failures as errors."""
        failed = self._kernel(
            tokens.data_ptr(), ctypes.addressof(self._embed), positions.data_ptr(), self.cos_table.data_ptr(),
            self.sin_table.data_ptr(), self.cos_table.shape[0], column, chunk, _ptr(key_valid),
            0 if key_valid is None else key_valid.stride(0), ctypes.addressof(self._layers), self.n_layers,
            self.final_norm.data_ptr(), ctypes.addressof(self._head), out.data_ptr(), tokens.numel(), self.dim,
            self.heads, self.kv_heads, self.head_dim, self.vocab, self.eps, torch.get_num_threads(),
        )
        if failed == 2:
            raise ValueError(f"packed decode step: a token outside [0, {self.vocab}), a position outside "
                             f"[0, {self.cos_table.shape[0]}), or for a chunk of {chunk} a ring cache or no room "
                             f"at column {column}")
        if failed:
            raise MemoryError("packed decode step: out of memory in the native kernel")

    def chunk(self, tokens: torch.Tensor, positions: torch.Tensor, column: int,
              key_valid: torch.Tensor | None = None) -> torch.Tensor:  # (B, T) -> (B, T, V) float32
        """T new tokens per row (arguments as :meth:`DecodeStep.chunk`; causal: token t sees the
        ones before it), in native calls of ``MAX_ROWS // B`` tokens per row: each call reads
        every matrix once for all its B x T' rows, so a packed prompt (a packed draft's prompt and
        catch-up) costs about one step per call, not per token. Each row's logits equal one-token
        steps' bit for bit. Linear (non-ring) caches only, as :meth:`DecodeStep.chunk`."""
        _check_chunk(tokens, positions, column, key_valid, MAX_ROWS)
        batch, total = tokens.shape
        logits = torch.empty((batch, total, self.vocab), dtype=_F32)
        width = MAX_ROWS // batch  # tokens per row in one call
        for start in range(0, total, width):
            piece = slice(start, min(start + width, total))
            view = logits[:, piece]  # (B, T', V): written in place where contiguous (one row, or one call)
            out = view if view.is_contiguous() else torch.empty_like(view)
            self._native(tokens[:, piece].contiguous(), positions[:, piece].contiguous(), column + start,
                         view.shape[1], key_valid, out)
            if out is not view:
                view.copy_(out)
        return logits


def packed_decode_step(
    layers: list[tuple[PackedDecodeLayer, tuple]], embed, final_norm: torch.Tensor, head, cos_table: torch.Tensor,
    sin_table: torch.Tensor, heads: int, kv_heads: int, head_dim: int, eps: float, vocab: int, dim: int,
    int8_activations: bool = False,
) -> PackedDecodeStep | None:
    """A :class:`PackedDecodeStep` over ``layers`` (from :func:`packed_decode_layer`, built with the
    same ``int8_activations``); ``embed`` (vocab, dim) and ``head`` (vocab, dim) float32 tensors or
    LUT operands. None without the kernels or with tensors they cannot take."""
    library = kernels()
    if library is None or not layers or not kernel_ready(_F32, cos_table, sin_table) or not final_norm.is_cpu \
            or final_norm.shape != (dim,) or cos_table.shape != sin_table.shape \
            or cos_table.shape[1:] != (head_dim,) or heads % kv_heads:
        return None
    embed_matrix, head_matrix = _matrix(embed, vocab, dim), _matrix(head, vocab, dim, int8_activations)
    if embed_matrix is None or head_matrix is None:
        return None
    return PackedDecodeStep(library, layers, embed_matrix, final_norm, head_matrix, vocab, dim, cos_table,
                            sin_table, heads, kv_heads, head_dim, eps, int8_activations)
