"""Packed low-bit weights: codes of 2, 4 or 8 bits plus fp16 tables, as linear and embedding modules.

One storage format serves every scheme of :mod:`mmafm.compress` (WAVE2.md "Compression"):

- ``codes`` (rows, ceil(cols * bits / 8)) uint8: each row's codes packed little-end first (4-bit:
  the low nibble holds the even column; 2-bit: bits 0-1 hold column 4j);
- a table per group of ``group_size`` rows (``axis=0``) or columns (``axis=1``):
  ``scheme="lut"`` stores it, ``lut`` (groups, 2^bits) fp16, fitted by k-means (palettization);
  ``scheme="uniform"`` stores one fp16 ``scale`` per row and derives the table as
  ``scale * (c - (2^bits - 1) / 2)`` for codes c, the balanced grid of the 2025 report's 2-bit QAT
  ({-1.5, -0.5, 0.5, 1.5} at 2 bits) and of the per-channel 8-/4-bit embeddings;
- optionally (lut scheme, ``per_channel_scale=True``, coremltools' ``enable_per_channel_scale``)
  one fp16 ``row_scale`` per row multiplying that row's table entries: the shared table is fitted
  to rows divided by their max-abs, so one table no longer clips each row's largest weights.

A weight is ``table[group(r, c), code[r, c]]`` (times ``row_scale[r]`` when stored). :class:`PackedLinear` and
:class:`PackedEmbedding` hold such a weight in place of ``nn.Linear`` / ``nn.Embedding`` without
any model file knowing: their ``weight`` property dequantizes (so a tied head reading
``embed.weight`` reads the same table), and :meth:`PackedLinear.forward` multiplies few rows at
inference straight from the packed codes in the native LUT GEMV
(:func:`mmafm.inference.kernels.lut_linear`), anything else by the dequantized matrix, so the
two give equal logits up to float32 summation order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BITS", "SCHEMES", "ACT_DTYPES", "pack_codes", "unpack_codes", "balanced_grid", "Packed", "PackedLinear",
           "PackedEmbedding", "set_act_dtype"]

BITS = (2, 4, 8)
SCHEMES = ("lut", "uniform")
ACT_DTYPES = ("float32", "int8")  # what the packed decode step multiplies these weights with


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:  # (R, C) ints < 2^bits -> (R, ceil(C bits / 8)) uint8
    """Pack each row's codes into bytes, lowest bits first (a row padded with zero codes)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    rows, cols = codes.shape
    per_byte = 8 // bits
    padded = torch.zeros(rows, math.ceil(cols / per_byte) * per_byte, dtype=torch.int32, device=codes.device)
    padded[:, :cols] = codes.to(torch.int32)
    if codes.numel() and (int(codes.max()) >= 1 << bits or int(codes.min()) < 0):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits} bits")
    parts = padded.view(rows, -1, per_byte)  # (R, bytes, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (parts << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:  # -> (R, cols) long
    """Inverse of :func:`pack_codes`."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)  # (..., bytes, per_byte)
    return codes.flatten(-2)[..., :cols].long()


def balanced_grid(bits: int, device=None) -> torch.Tensor:  # (2^bits,) float32
    """The balanced integer levels ``c - (2^b - 1) / 2``: {-1.5, -0.5, 0.5, 1.5} at 2 bits."""
    return torch.arange(1 << bits, dtype=torch.float32, device=device) - ((1 << bits) - 1) / 2


class Packed(nn.Module):
    """A (rows, cols) weight stored as packed codes and fp16 tables (see the module docstring).

    Args:
        rows, cols: the weight's shape (out, in for a linear; vocab, dim for an embedding).
        bits: 2, 4 or 8.
        scheme: ``"lut"`` (a fitted table per group) or ``"uniform"`` (a scale per row).
        group_size: rows (``axis=0``) or columns (``axis=1``) sharing one table; the last group
            may be smaller when it does not divide. ``"uniform"`` is per row (group_size 1, axis 0).
        axis: 0 or 1.
        per_channel_scale: (lut scheme) also store one fp16 scale per row multiplying its table
            entries [coremltools: enable_per_channel_scale].
    """

    def __init__(self, rows: int, cols: int, bits: int, scheme: str = "lut", group_size: int = 16, axis: int = 0,
                 device=None, per_channel_scale: bool = False):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if axis not in (0, 1):
            raise ValueError(f"axis must be 0 (groups of rows) or 1 (groups of columns), got {axis}")
        if scheme == "uniform" and (group_size, axis) != (1, 0):
            raise ValueError("the uniform scheme has one scale per row (group_size=1, axis=0)")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if per_channel_scale and scheme != "lut":
            raise ValueError(f"per_channel_scale is an option of the lut scheme, not of {scheme!r}")
        self.per_channel_scale = bool(per_channel_scale)
        self.rows, self.cols, self.bits, self.scheme = rows, cols, bits, scheme
        self.group_size, self.axis = group_size, axis
        self.groups = math.ceil((rows if axis == 0 else cols) / group_size)
        self.register_buffer("codes", torch.zeros(rows, math.ceil(cols * bits / 8), dtype=torch.uint8, device=device))
        if scheme == "lut":
            self.register_buffer("lut", torch.zeros(self.groups, 1 << bits, dtype=torch.float16, device=device))
        else:
            self.register_buffer("scale", torch.zeros(rows, dtype=torch.float16, device=device))
        if self.per_channel_scale:
            self.register_buffer("row_scale", torch.ones(rows, dtype=torch.float16, device=device))
        self._table_cache: tuple | None = None
        # decode-time choice, not stored in checkpoints: "int8" = the whole packed decode step reads
        # this 2-/4-/8-bit weight with Q8_0 activations and integer dot products (set_act_dtype)
        self.act_dtype = "float32"

    def _apply(self, fn, recurse=True):
        """Moves keep the storage types: ``.to(bfloat16)`` of a model leaves codes uint8 and tables fp16."""
        super()._apply(fn, recurse)
        for name, dtype in (("codes", torch.uint8), ("lut", torch.float16), ("scale", torch.float16),
                            ("row_scale", torch.float16)):
            tensor = self._buffers.get(name)
            if tensor is not None and tensor.dtype != dtype:
                self._buffers[name] = tensor.to(dtype)
        self._table_cache = None
        return self

    def extra_repr(self) -> str:
        return (f"rows={self.rows}, cols={self.cols}, bits={self.bits}, scheme={self.scheme}, "
                f"group_size={self.group_size}, axis={self.axis}"
                + (", per_channel_scale=True" if self.per_channel_scale else ""))

    # -- filling
    def set_packed(self, codes: torch.Tensor, table: torch.Tensor, row_scale: torch.Tensor | None = None) -> "Packed":
        """Store (rows, cols) integer ``codes`` and the table: ``lut`` (groups, 2^bits) for the
        lut scheme, ``scale`` (rows,) for the uniform one, and ``row_scale`` (rows,) exactly when
        the module was made with ``per_channel_scale`` (all rounded to fp16)."""
        if codes.shape != (self.rows, self.cols):
            raise ValueError(f"codes of shape {tuple(codes.shape)} for a ({self.rows}, {self.cols}) weight")
        self.codes.copy_(pack_codes(codes, self.bits))
        expected = (self.groups, 1 << self.bits) if self.scheme == "lut" else (self.rows,)
        if tuple(table.shape) != expected:
            raise ValueError(f"{self.scheme} table of shape {tuple(table.shape)}, expected {expected}")
        if (row_scale is not None) != self.per_channel_scale:
            raise ValueError("row_scale must be given exactly when per_channel_scale is set "
                             f"(per_channel_scale={self.per_channel_scale})")
        if row_scale is not None:
            if tuple(row_scale.shape) != (self.rows,):
                raise ValueError(f"row_scale of shape {tuple(row_scale.shape)}, expected ({self.rows},)")
            self.row_scale.copy_(row_scale.to(torch.float16))
        (self.lut if self.scheme == "lut" else self.scale).copy_(table.to(torch.float16))
        self._table_cache = None
        return self

    # -- reading
    def table(self) -> torch.Tensor:  # (groups, 2^bits) float32; per row for uniform
        """The float32 lookup table of every group (made once and cached until the buffers change)."""
        source = self.lut if self.scheme == "lut" else self.scale
        key = (source.data_ptr(), source._version, source.device)
        if self._table_cache is None or self._table_cache[0] != key:
            if self.scheme == "lut":
                table = self.lut.float()
            else:
                table = self.scale.float()[:, None] * balanced_grid(self.bits, self.scale.device)
            self._table_cache = (key, table.contiguous())
        return self._table_cache[1]

    def lut_operands(self) -> tuple | None:
        """What the native packed decode step reads (``csrc/lut.c``, groups along rows only):
        ``(codes, table, bits, group_rows, row_scale)``; the lut scheme's float32 tables per
        group (with its float32 ``row_scale`` when stored, else None), or the uniform scheme's
        one balanced grid with a float32 scale per row. None for groups along columns."""
        if self.axis != 0:
            return None
        if self.scheme == "lut":
            return self.codes, self.table(), self.bits, self.group_size, self._row_scale_f32()
        grid = balanced_grid(self.bits, self.scale.device)[None]  # (1, 2^bits), shared by every row
        return self.codes, grid, self.bits, self.rows, self.scale.float()

    def _row_scale_f32(self) -> torch.Tensor | None:  # (rows,) float32 or None
        return self.row_scale.float() if self.per_channel_scale else None

    def _group_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows // self.group_size if self.scheme == "lut" else rows

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:  # (...,) long -> (..., cols) float32
        """The dequantized weight rows ``rows`` (an embedding lookup reads only these)."""
        codes = unpack_codes(self.codes[rows], self.bits, self.cols)  # (..., cols)
        table = self.table()
        if self.axis == 0:
            values = table[self._group_of_rows(rows)].gather(-1, codes)
        else:
            column_group = torch.arange(self.cols, device=codes.device) // self.group_size  # (cols,)
            values = table[column_group, codes]
        if self.per_channel_scale:
            values = values * self.row_scale[rows].float()[..., None]
        return values

    def dequantize(self) -> torch.Tensor:  # (rows, cols) float32
        """The whole weight as float32."""
        return self.dequantize_rows(torch.arange(self.rows, device=self.codes.device))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32), e.g. for a tied head ``F.linear(h, embed.weight)``."""
        return self.dequantize()

    def storage_bits(self) -> int:
        """Bits this weight occupies: packed codes + fp16 tables (+ fp16 row scales when stored;
        the bits-per-weight numerator)."""
        table = self.lut if self.scheme == "lut" else self.scale
        return self.codes.numel() * 8 + table.numel() * 16 + (self.rows * 16 if self.per_channel_scale else 0)

    def packed_linear(self, x: torch.Tensor) -> torch.Tensor:  # (..., cols) -> (..., rows) float32
        """``x @ weight.T`` from the packed codes: the native LUT GEMV for a few float32 rows at
        inference (groups along rows), the dequantized matmul otherwise."""
        from mmafm.inference import kernels  # the kernels import nothing from here

        if self.axis == 0 and not torch.is_grad_enabled():
            y = kernels.lut_linear(x, self.codes, self.table(), self.bits, 1 if self.scheme == "uniform" else self.group_size)
            if y is not None:
                # the row scale multiplies each output after the sum, as csrc/lut.c's row_scale does
                return y if not self.per_channel_scale else y * self._row_scale_f32()
        return F.linear(x.float() if x.dtype != torch.float32 else x, self.dequantize())


class PackedLinear(Packed):
    """A bias-free linear whose (out, in) weight is packed (see :class:`Packed`). Inputs of
    another dtype are computed in float32 and returned in their dtype."""

    def __init__(self, in_features: int, out_features: int, bits: int, scheme: str = "lut", group_size: int = 16,
                 axis: int = 0, device=None, per_channel_scale: bool = False):
        super().__init__(out_features, in_features, bits, scheme, group_size, axis, device, per_channel_scale)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.packed_linear(x).to(x.dtype)


class PackedEmbedding(Packed):
    """An embedding whose (vocab, dim) table is packed, one table per row (``uniform``) or per
    group of rows (``lut``): a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, scheme: str = "uniform",
                 group_size: int = 1, axis: int = 0, device=None):
        super().__init__(num_embeddings, embedding_dim, bits, scheme, group_size, axis, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.max_norm = None  # what callers of nn.Embedding look at

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., dim) float32
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token id outside [0, {self.num_embeddings})")
        return self.dequantize_rows(ids)


def set_act_dtype(model: nn.Module, act_dtype: str) -> int:
    """Choose what the packed decode step (``mmafm.inference.plan``, ``csrc/lut.c``) multiplies the
    packed weights of ``model`` with: ``"float32"`` (default: the exact float path, logits equal to
    the dequantized model's up to summation order) or ``"int8"`` (opt-in: each GEMV input quantized
    to int8 per block of 32 with a float scale, like llama.cpp's Q8_0, and integer dot products
    against int8 tables for 2-/4-/8-bit weights, ``csrc/q8.c``; float matrices stay float).
    Returns how many packed modules were set."""
    if act_dtype not in ACT_DTYPES:
        raise ValueError(f"act_dtype must be one of {ACT_DTYPES}, got {act_dtype!r}")
    modules = [module for module in model.modules() if isinstance(module, Packed)]
    for module in modules:
        module.act_dtype = act_dtype
    return len(modules)
