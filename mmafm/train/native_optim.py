"""The native CPU kernel of AdaStar's update (``csrc/adastar.c``): build, load, call.

:class:`mmafm.train.optim.AdaStar` makes about a dozen ``torch._foreach_*`` passes over the
parameter-sized tensors of a param group per step; on the CPU each is a separate read and write
of every tensor. The C does the same arithmetic in two passes (pass 1: the state EMAs and each
block's sum of squares of the raw update; pass 2: the clipped update, its EMA, decay and the
parameter), one call each for all the float32 parameters of a group, split over
``torch.get_num_threads()`` threads of the decode kernels' pool (``mmafm/inference/csrc/pool.h``).

It is built like the decode kernels (:func:`mmafm.inference.kernels.build_library`: the system C
compiler with ``-O3 -march=native``, cached by source, flags, compiler and CPU, loaded with
ctypes) on first use; a failed build is one warning, after which AdaStar takes its foreach path.
``MMAFM_NATIVE_LINEAR=0`` and :func:`mmafm.inference.kernels.kernels_disabled` switch it off too.
"""

from __future__ import annotations

import array
import ctypes
import os
import threading
import warnings
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["SOURCE", "adastar_kernels", "adastar_unavailable_reason", "count_steps", "native_ready", "pass1", "pass2",
           "step"]

SOURCE = Path(__file__).with_name("csrc") / "adastar.c"

_P, _L, _F, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
_SYMBOLS = {  # the functions of csrc/adastar.c: restype, argtypes
    "mmafm_adastar_pass1_f32": (_I, [_L, _P, _P, _P, _P, _P, _P, _F, _F, _P, _I]),
    "mmafm_adastar_pass2_f32": (_I, [_L, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _F, _F, _F, _F, _I, _I]),
    "mmafm_adastar_step_f32": (_I, [_L, _P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_double, _P, _P, _F, _F, _F, _F, _I]),
    "mmafm_adastar_count_f32": (_L, [_L, _P, _P]),
    "mmafm_pool_helpers": (_I, []),
}

_lock = threading.Lock()
_library: ctypes.CDLL | bool | None = None  # None: not tried yet; False: unavailable
_failure = ""


def _load() -> ctypes.CDLL | bool:
    global _failure
    from mmafm.inference.kernels import KernelBuildError, build_library

    if os.environ.get("MMAFM_NATIVE_LINEAR", "1") == "0":
        _failure = "disabled by MMAFM_NATIVE_LINEAR=0"
        return False
    try:
        library = ctypes.CDLL(str(build_library(source=SOURCE)))
        for symbol, (restype, argtypes) in _SYMBOLS.items():
            try:
                function = getattr(library, symbol)
            except AttributeError as error:
                raise KernelBuildError(f"{library._name} lacks the symbol {symbol}") from error
            function.restype, function.argtypes = restype, argtypes
        return library
    except (KernelBuildError, OSError) as error:
        _failure = str(error)
        warnings.warn(f"mmafm: the native AdaStar kernel is unavailable ({error}); AdaStar takes its foreach path",
                      RuntimeWarning, stacklevel=3)
        return False


def adastar_kernels() -> ctypes.CDLL | None:
    """The loaded library (built on first call, once), or None where it cannot be built or is
    switched off (``MMAFM_NATIVE_LINEAR=0``, :func:`~mmafm.inference.kernels.kernels_disabled`)."""
    global _library
    from mmafm.inference.kernels import kernels_switched_off

    if kernels_switched_off():
        return None
    if _library is None:
        with _lock:
            if _library is None:
                _library = _load()
    return _library or None


def adastar_unavailable_reason() -> str:
    """Why :func:`adastar_kernels` returns None ("" when it does not)."""
    from mmafm.inference.kernels import kernels_switched_off

    if adastar_kernels() is not None:
        return ""
    return "switched off by kernels_disabled()" if kernels_switched_off() else _failure


def native_ready(*tensors: torch.Tensor | None) -> bool:
    """May the kernel update these tensors in place? Plain contiguous float32 CPU tensors (the
    local shards of DTensors qualify), not under ``torch.compile``; None entries are skipped."""
    from mmafm.inference.kernels import kernel_ready

    return kernel_ready(torch.float32, *tensors)


# The arguments as Python arrays (built from a list in C, much faster than a ctypes array for the
# few hundred pointers of a step), passed by address; the caller keeps them alive for the call.
_POINTER_CODE = "Q" if ctypes.sizeof(ctypes.c_void_p) == 8 else "I"
_LONG_CODE = {4: "i", 8: "q"}[ctypes.sizeof(ctypes.c_long)]


def _address(values: array.array | None) -> int | None:
    return None if values is None else values.buffer_info()[0]


def _pointers(tensors: Sequence[torch.Tensor] | None) -> array.array | None:
    """The tensors' data pointers as a C array, or None (a NULL array) for ``None``."""
    return None if tensors is None else array.array(_POINTER_CODE, [t.data_ptr() for t in tensors])


def _floats(values: Sequence[float] | None) -> array.array | None:
    return None if values is None else array.array("f", values)


def _sizes(tensors: Sequence[torch.Tensor]) -> array.array:
    return array.array(_LONG_CODE, [t.numel() for t in tensors])


def _call(symbol: str, *args) -> None:
    """The kernel function ``symbol`` with the array arguments passed by address (the arrays live
    until it returns); its nonzero status (it could not allocate its work plan) raises."""
    function = getattr(adastar_kernels(), symbol)
    status = function(*[_address(a) if isinstance(a, array.array) or a is None else a for a in args])
    if status:
        raise MemoryError(f"{symbol}: out of memory for its work plan")


def count_steps(steps: Sequence[torch.Tensor]) -> tuple[list[int], int | None]:
    """Advance the blocks' step counts (float32 CPU scalars, in place) by one, in one call.

    Returns:
        (the new counts, their common value or None when they differ).
    """
    counts = array.array(_LONG_CODE, bytes(ctypes.sizeof(ctypes.c_long) * len(steps)))
    pointers = _pointers(steps)  # alive until the call returns
    common = adastar_kernels().mmafm_adastar_count_f32(len(steps), _address(pointers), _address(counts))
    return counts.tolist(), None if common < 0 else common


def pass1(
    grads: Sequence[torch.Tensor],
    square_emas: Sequence[torch.Tensor],
    grad_emas: Sequence[torch.Tensor] | None,
    under_sqrt: Sequence[float],
    over_sqrt: Sequence[float],
    b2: float,
    grad_ema_weight: float,
) -> torch.Tensor:
    """Pass 1 over N blocks (in place): ``v = b2 v + (1 - b2) g^2``, ``m = lerp(m, g, w)`` when
    ``grad_emas`` is given, and each block's sum of ``(n / (sqrt(v + a) + e))^2`` (n = m or g).

    Args:
        grads, square_emas, grad_emas: N float32 CPU tensors each, block by block the same size.
        under_sqrt, over_sqrt: ``a`` and ``e`` of each block.
        b2: the gradient-square EMA decay; grad_ema_weight: the gradient EMA's lerp weight.

    Returns:
        (N,) float64: the sums of squares of the raw updates (this process's elements).
    """
    sums = torch.zeros(len(grads), dtype=torch.float64)  # (N,)
    _call(
        "mmafm_adastar_pass1_f32", len(grads), _sizes(grads), _pointers(grads), _pointers(square_emas), _pointers(grad_emas),
        _floats(under_sqrt), _floats(over_sqrt), b2, grad_ema_weight, sums.data_ptr(), torch.get_num_threads())
    return sums


def pass2(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    square_emas: Sequence[torch.Tensor],
    grad_emas: Sequence[torch.Tensor] | None,
    update_emas: Sequence[torch.Tensor] | None,
    under_sqrt: Sequence[float],
    over_sqrt: Sequence[float],
    block_scales: Sequence[float],
    update_divisors: Sequence[float] | None,
    alphas: Sequence[float],
    b2: float,
    grad_ema_weight: float,
    update_ema_weight: float,
    decay: float,
    update_state: bool,
) -> None:
    """Pass 2 over N blocks (in place): ``u = n / (sqrt(v + a) + e) * s``, ``q = lerp(q, u, w)``
    and ``x = q / d`` when ``update_emas`` is given (else ``x = u``), ``p = p * decay + alpha x``.

    With ``update_state`` it first does pass 1's state update (``v``, ``m``) element by element:
    the whole step in one pass, for groups without the RMS clip. Arguments as :func:`pass1`, plus
    the parameters, update EMAs, each block's scale ``s``, EMA divisor ``d`` (None: 1) and
    ``alpha`` (``-lr * mu-param scale``), the update EMA's lerp weight and ``decay``.
    """
    _call(
        "mmafm_adastar_pass2_f32", len(params), _sizes(params), _pointers(params), _pointers(grads), _pointers(square_emas),
        _pointers(grad_emas), _pointers(update_emas), _floats(under_sqrt), _floats(over_sqrt), _floats(block_scales),
        _floats(update_divisors), _floats(alphas), b2, grad_ema_weight, update_ema_weight, decay, int(update_state),
        torch.get_num_threads())


def step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    square_emas: Sequence[torch.Tensor],
    grad_emas: Sequence[torch.Tensor] | None,
    update_emas: Sequence[torch.Tensor] | None,
    under_sqrt: Sequence[float],
    over_sqrt: Sequence[float],
    base_scales: Sequence[float],
    threshold: float,
    update_divisors: Sequence[float] | None,
    alphas: Sequence[float],
    b2: float,
    grad_ema_weight: float,
    update_ema_weight: float,
    decay: float,
) -> None:
    """The whole step with the RMS clip for blocks that are not sharded, in one call: pass 1,
    each block's scale ``base_scale / max(1, base_scale * rms(u) / threshold)`` (rms over the
    block's own elements, in float64 as :meth:`AdaStar._update_native` computes it), pass 2; a
    cache-sized batch of blocks at a time. Arguments as :func:`pass2`; ``base_scales`` are the
    block scales before the clip."""
    _call(
        "mmafm_adastar_step_f32", len(params), _sizes(params), _pointers(params), _pointers(grads), _pointers(square_emas),
        _pointers(grad_emas), _pointers(update_emas), _floats(under_sqrt), _floats(over_sqrt),
        array.array("d", base_scales), threshold, _floats(update_divisors), _floats(alphas),
        b2, grad_ema_weight, update_ema_weight, decay, torch.get_num_threads())
