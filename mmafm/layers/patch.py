"""Patch embedding and position-embedding resampling for the vision encoders.

An image is cut into ``patch x patch`` squares, each projected to the model width by a strided
convolution (ViT, Dosovitskiy et al. 2021). Learned absolute position embeddings are stored at the
pretraining grid and resampled (bicubic, as timm does) to whatever grid the input has, so one
model runs at 224, 448, 672 or on 672-pixel tiles of a 1344 image (REFERENCE.md, "Vision
encoders" and "Vision-language adapter").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchEmbed",
    "check_image",
    "resample_pos_embed",
    "resample_pos_embed_tokens",
    "resample_feature_map",
    "take_indices",
]


def check_image(x: torch.Tensor, in_chans: int, patch_size: int) -> None:
    """Raise a ValueError naming the expected value for a batch the encoder cannot take."""
    if x.ndim != 4:
        raise ValueError(f"expected an image batch of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels (B, {in_chans}, H, W), got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})"
        )
    height, width = x.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the patch size {patch_size}; "
            f"expected height and width to be multiples of {patch_size} "
            f"(e.g. {height // patch_size * patch_size}x{width // patch_size * patch_size})"
        )


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, returned as a grid ``(B, Gh, Gw, C)`` (channels last).

    Args:
        patch_size: Side of a square patch in pixels.
        in_chans: Image channels.
        embed_dim: Output width.
        bias: Whether the projection has a bias (CLIP's ``conv1`` has none).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, Gh, Gw, C)
        check_image(x, self.in_chans, self.patch_size)
        return self.proj(x).permute(0, 2, 3, 1)


def resample_pos_embed(
    pos_embed: torch.Tensor,  # (1, Gh, Gw, C)
    grid: tuple[int, int],
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:  # (1, grid[0], grid[1], C)
    """Interpolate a grid of position embeddings to a new grid (no-op when the grid matches).

    Bicubic with antialiasing, computed in float32, like timm's ``resample_abs_pos_embed``, so
    weights trained at one resolution give the same outputs as timm's at another.
    """
    if tuple(pos_embed.shape[1:3]) == tuple(grid):
        return pos_embed
    dtype = pos_embed.dtype
    resized = F.interpolate(
        pos_embed.float().permute(0, 3, 1, 2), size=tuple(grid), mode=mode, antialias=antialias
    )
    return resized.permute(0, 2, 3, 1).to(dtype)


def resample_pos_embed_tokens(
    pos_embed: torch.Tensor,  # (1, P + Gh * Gw, C)
    grid: tuple[int, int],
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:  # (1, P + grid[0] * grid[1], C)
    """Resample a flat ``(1, prefix + Gh*Gw, C)`` position embedding (timm/CLIP layout).

    The first ``num_prefix_tokens`` rows (class token) are kept; the rest form a square grid unless
    ``old_grid`` says otherwise.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_grid is None:
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            raise ValueError(
                f"position embedding has {patches.shape[1]} grid rows, not a square; pass old_grid"
            )
        old_grid = (side, side)
    grid_embed = patches.reshape(1, old_grid[0], old_grid[1], -1)
    resized = resample_pos_embed(grid_embed, grid).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([prefix, resized], dim=1)


def resample_feature_map(feature: torch.Tensor, scale: float) -> torch.Tensor:  # (B, C, H, W)
    """Rescale a feature map by a power of two, ViTDet's simple-feature-pyramid way, minus its
    learned convolutions: bilinear upsampling for ``scale > 1``, max-pooling for ``scale < 1``."""
    if scale == 1:
        return feature
    if scale <= 0 or math.log2(scale) != round(math.log2(scale)):
        raise ValueError(f"feature scale must be a power of two (e.g. 4, 2, 1, 0.5), got {scale}")
    if scale > 1:
        return F.interpolate(feature, scale_factor=scale, mode="bilinear", align_corners=False)
    stride = int(round(1 / scale))
    return F.max_pool2d(feature, kernel_size=stride, stride=stride, ceil_mode=True)


def take_indices(depth: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """Block indices to return, timm's convention: None = all, int n = the last n, else the list
    (negative values count from the end; duplicates dropped)."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"expected 1..{depth} last blocks, got {indices}")
        return list(range(depth - indices, depth))
    taken = [i + depth if i < 0 else i for i in indices]
    bad = [i for i in indices if not -depth <= i < depth]
    if bad:
        raise ValueError(f"block indices {bad} out of range for depth {depth} (expected -{depth}..{depth - 1})")
    return sorted(set(taken))
