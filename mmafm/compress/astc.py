"""ASTC-style 6x6 block compression of weights: 128 bits per block of 36 weights (3.5556 bpw).

The 2025 server model stores its weights as ASTC textures with 6x6 blocks, decoded by the GPU's
texture hardware (WAVE2.md "Compression"). No ASTC encoder package is installed here (astcenc
has no PyPI wheel for this machine), so this is a **faithful pure-torch encoder/decoder of the
format class, not bit-exact ASTC**: it uses the block layout a single-partition, single-plane,
luminance-only (CEM 0, LDR) ASTC 6x6 block with a full 6x6 weight grid would use:

- 17 header bits (block mode 11, partition count 2, endpoint mode 4; a constant here, as every
  block has the same mode), 2 endpoints of 8 bits, 36 weights of 5 levels packed as base-5
  triples in 7 bits (what ASTC's quint encoding achieves: 84 bits), 11 bits unused: 128 bits;
- decoding as ASTC's LDR path does: endpoints expanded to 16 bits (``e * 257``), weights
  unquantized to {0, 16, 32, 48, 64}, ``C = (E0 (64 - w) + E1 w + 32) >> 6``, a 16-bit UNORM
  value, mapped to the tensor's range (two float32 per tensor: a texture's value range).

5 levels is the most a 6x6 grid of 36 weights fits beside 8-bit endpoints (6 levels need 120
bits). The encoder starts each block at its min/max, then alternates nearest-level assignment
and a least-squares refit of the two endpoints (quantized to 8 bits) for a few rounds, keeping
the best block seen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BLOCK", "BLOCK_BITS", "LEVELS", "encode_blocks", "decode_blocks", "ASTCLinear", "astc_bits"]

BLOCK = 6  # block side: 36 weights
BLOCK_BITS = 128
LEVELS = 5  # interpolation weights per block (quint range)
_HEADER = 0b1_0100_0110_1011_0010  # 17 bits: a fixed block mode / partition / CEM pattern (not decoded)
_UNQUANT = torch.tensor([0, 16, 32, 48, 64])  # ASTC's unquantized weights of the 5-level range


def astc_bits(rows: int, cols: int) -> int:
    """Stored bits of a (rows, cols) matrix: 128 per 6x6 block (edges padded) + 64 for its range."""
    return math.ceil(rows / BLOCK) * math.ceil(cols / BLOCK) * BLOCK_BITS + 64


def _blocks_of(weight: torch.Tensor) -> torch.Tensor:  # (R, C) -> (nb, 36), edges padded by replication
    rows, cols = weight.shape
    pad_r, pad_c = -rows % BLOCK, -cols % BLOCK
    padded = F.pad(weight[None, None], (0, pad_c, 0, pad_r), mode="replicate")[0, 0] if pad_r or pad_c else weight
    grid = padded.reshape(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK)
    return grid.permute(0, 2, 1, 3).reshape(-1, BLOCK * BLOCK)


def _interpolate(e0: torch.Tensor, e1: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """ASTC LDR decode: 16-bit UNORM ``((257 e0) (64 - w) + (257 e1) w + 32) >> 6`` as a float in [0, 1]."""
    w = _UNQUANT.to(levels.device)[levels]
    value = (e0[:, None] * 257 * (64 - w) + e1[:, None] * 257 * w + 32) // 64
    return value.double() / 65535.0


def _assign(unit: torch.Tensor, e0: torch.Tensor, e1: torch.Tensor) -> torch.Tensor:  # nearest decoded level
    candidates = torch.stack([_interpolate(e0, e1, torch.full_like(unit, k, dtype=torch.long))
                              for k in range(LEVELS)], -1)  # (nb, 36, 5)
    return (candidates - unit[..., None]).abs().argmin(-1)


def encode_blocks(weight: torch.Tensor, rounds: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a (rows, cols) weight: ``(blocks (nb, 16) uint8, value_range (2,) float32)``."""
    w = weight.detach().double().cpu()
    lo, hi = w.min(), w.max()
    span = (hi - lo).clamp_min(1e-30)
    unit = (_blocks_of(w) - lo) / span  # (nb, 36) in [0, 1]
    e0 = (unit.min(1).values * 255).floor().long().clamp(0, 255)
    e1 = (unit.max(1).values * 255).ceil().long().clamp(0, 255)
    best_error = torch.full((unit.shape[0],), float("inf"), dtype=torch.float64)
    best_e0, best_e1, best_levels = e0, e1, torch.zeros_like(unit, dtype=torch.long)
    for _ in range(rounds):
        levels = _assign(unit, e0, e1)
        error = ((_interpolate(e0, e1, levels) - unit) ** 2).sum(1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_e0, best_e1 = torch.where(better, e0, best_e0), torch.where(better, e1, best_e1)
        best_levels = torch.where(better[:, None], levels, best_levels)
        # least-squares endpoints for these levels: unit ~ a + (b - a) t, t = level / 4
        t = levels.double() / (LEVELS - 1)
        n, st, stt = t.shape[1], t.sum(1), (t * t).sum(1)
        sv, stv = unit.sum(1), (t * unit).sum(1)
        det = n * stt - st * st
        slope = torch.where(det > 0, (n * stv - st * sv) / det.clamp_min(1e-30), torch.zeros_like(det))
        intercept = (sv - slope * st) / n
        e0 = (intercept * 255).round().long().clamp(0, 255)
        e1 = ((intercept + slope) * 255).round().long().clamp(0, 255)
    return _pack(best_e0, best_e1, best_levels), torch.stack([lo, hi]).float()


def _pack(e0: torch.Tensor, e1: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:  # -> (nb, 16) uint8
    count = e0.shape[0]
    bits = torch.zeros(count, BLOCK_BITS, dtype=torch.long)
    position = 0

    def put(values: torch.Tensor, width: int) -> None:
        nonlocal position
        shifts = torch.arange(width)
        bits[:, position:position + width] = (values[:, None] >> shifts) & 1
        position += width

    put(torch.full((count,), _HEADER, dtype=torch.long), 17)
    put(e0, 8)
    put(e1, 8)
    triples = levels.reshape(count, 12, 3)
    codes = triples[..., 0] + 5 * triples[..., 1] + 25 * triples[..., 2]  # 0..124: 7 bits (quint-like)
    for k in range(12):
        put(codes[:, k], 7)
    return (bits.reshape(count, 16, 8) << torch.arange(8)).sum(-1).to(torch.uint8)


def _unpack(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bits = ((blocks.long()[..., None] >> torch.arange(8, device=blocks.device)) & 1).reshape(blocks.shape[0], -1)

    def get(start: int, width: int) -> torch.Tensor:
        return (bits[:, start:start + width] << torch.arange(width, device=blocks.device)).sum(1)

    e0, e1 = get(17, 8), get(25, 8)
    codes = torch.stack([get(33 + 7 * k, 7) for k in range(12)], 1)  # (nb, 12)
    levels = torch.stack([codes % 5, codes // 5 % 5, codes // 25], -1).reshape(-1, 36)
    return e0, e1, levels


def decode_blocks(blocks: torch.Tensor, value_range: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The (rows, cols) float32 weight of :func:`encode_blocks`' output."""
    e0, e1, levels = _unpack(blocks)
    unit = _interpolate(e0, e1, levels)  # (nb, 36)
    lo, hi = value_range.double()
    values = (lo + (hi - lo) * unit).float()
    block_rows, block_cols = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    grid = values.reshape(block_rows, block_cols, BLOCK, BLOCK).permute(0, 2, 1, 3)
    return grid.reshape(block_rows * BLOCK, block_cols * BLOCK)[:rows, :cols].contiguous()


class ASTCLinear(nn.Module):
    """A bias-free linear whose weight is stored as 6x6 ASTC-style blocks (decoded per call)."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rows, self.cols = out_features, in_features
        count = math.ceil(out_features / BLOCK) * math.ceil(in_features / BLOCK)
        self.register_buffer("blocks", torch.zeros(count, 16, dtype=torch.uint8, device=device))
        self.register_buffer("value_range", torch.zeros(2, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "ASTCLinear":
        if linear.bias is not None:
            raise ValueError("ASTCLinear: linears with a bias are not supported")
        module = cls(linear.in_features, linear.out_features)
        blocks, value_range = encode_blocks(linear.weight)
        module.blocks.copy_(blocks)
        module.value_range.copy_(value_range)
        return module.to(linear.weight.device)

    def dequantize(self) -> torch.Tensor:
        return decode_blocks(self.blocks.cpu(), self.value_range.cpu(), self.rows, self.cols).to(self.blocks.device)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def storage_bits(self) -> int:
        return self.blocks.numel() * 8 + self.value_range.numel() * 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))
