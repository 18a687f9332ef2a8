"""Multi-head self-attention for the vision encoders, with optional decomposed relative positions.

Queries, keys and values come from one fused ``qkv`` linear (timm/SAM naming, so public weights
load by name); the product itself is :func:`mmafm.layers.attention.attend` (PyTorch SDPA).
ViTDet/SAM add a *decomposed relative position* bias (MViTv2, Li et al. 2022):
``bias[(i, j), (k, l)] = q_ij . Rh[i - k] + q_ij . Rw[j - l]``; tokens placed before the patch
grid (register tokens) have no position and get a zero bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmafm.layers.attention import attend

__all__ = ["Attention", "relative_positions", "decomposed_rel_pos_bias"]


def relative_positions(size: int, table: torch.Tensor) -> torch.Tensor:  # (size, size, D)
    """Embeddings of every query-key offset along one axis, ``out[q, k] = table[q - k + size - 1]``.

    ``table`` has ``2 * L - 1`` rows for the length ``L`` it was trained at; for another length it
    is linearly resampled to ``2 * size - 1`` rows (SAM's ``get_rel_pos``).
    """
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(
            table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=length, mode="linear"
        ).reshape(-1, length).permute(1, 0)
    coords = torch.arange(size, device=table.device)
    offsets = coords[:, None] - coords[None, :] + (size - 1)  # (size, size) in [0, 2 size - 2]
    return table[offsets]


def decomposed_rel_pos_bias(
    q: torch.Tensor,  # (B, H, Gh * Gw, D), queries of the grid tokens only
    rel_pos_h: torch.Tensor,  # (2 Lh - 1, D)
    rel_pos_w: torch.Tensor,  # (2 Lw - 1, D)
    grid: tuple[int, int],
) -> torch.Tensor:  # (B, H, Gh * Gw, Gh * Gw)
    """Additive attention bias of decomposed relative positions on a ``grid`` of tokens."""
    height, width = grid
    table_h = relative_positions(height, rel_pos_h)  # (Gh, Gh, D)
    table_w = relative_positions(width, rel_pos_w)  # (Gw, Gw, D)
    q_grid = q.reshape(*q.shape[:2], height, width, q.shape[-1])  # (B, H, Gh, Gw, D)
    bias_h = torch.einsum("bnhwd,hkd->bnhwk", q_grid, table_h)  # (B, H, Gh, Gw, Gh)
    bias_w = torch.einsum("bnhwd,wkd->bnhwk", q_grid, table_w)  # (B, H, Gh, Gw, Gw)
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # (B, H, Gh, Gw, Gh, Gw)
    return bias.reshape(*q.shape[:2], height * width, height * width)


class Attention(nn.Module):
    """Self-attention over a token sequence whose last ``Gh * Gw`` tokens form a grid.

    Args:
        dim: Model width.
        num_heads: Attention heads (``dim`` must be divisible by it).
        qkv_bias: Bias on the fused qkv projection.
        rel_pos_size: ``(Lh, Lw)`` grid the relative-position tables are sized for; None disables
            relative positions.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        rel_pos_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = rel_pos_size is not None
        if self.use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, self.head_dim))

    def forward(
        self,
        x: torch.Tensor,  # (B, N, C)
        grid: tuple[int, int] | None = None,
        mask: torch.Tensor | None = None,  # bool (N, N) or (B, 1, N, N), True = may attend
    ) -> torch.Tensor:  # (B, N, C)
        """Attend; ``grid`` locates the last ``Gh*Gw`` tokens for the relative-position bias."""
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
        if self.use_rel_pos:
            if grid is None:
                raise ValueError("relative-position attention needs the token grid (Gh, Gw)")
            num_grid = grid[0] * grid[1]
            num_prefix = length - num_grid
            bias = decomposed_rel_pos_bias(q[:, :, num_prefix:], self.rel_pos_h, self.rel_pos_w, grid)
            if num_prefix:  # register tokens carry no position: zero bias in their rows/columns
                bias = F.pad(bias, (num_prefix, 0, num_prefix, 0))
            if mask is not None:
                bias = bias.masked_fill(~mask, float("-inf"))
            mask = bias
        out = attend(q, k, v, mask=mask)  # (B, H, N, D)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))
