"""Window partitioning for windowed attention (ViTDet) and the Register-Window helpers.

ViTDet (Li et al. 2022) attends inside non-overlapping ``w x w`` windows of the patch grid, padding
the grid at the bottom/right when it is not a multiple of ``w`` (padded positions are zero tokens
that take part as keys, exactly as in ViTDet/SAM/timm, so their weights load unchanged).

Register-Window (REFERENCE.md, "Vision encoders", [paper, wording only]) adds register tokens to
every window: :func:`add_window_registers` prepends one copy per window and
:func:`merge_window_registers` folds the per-window copies back into one set per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "window_partition",
    "window_unpartition",
    "window_attention_mask",
    "add_window_registers",
    "merge_window_registers",
    "REGISTER_MERGES",
]

REGISTER_MERGES = ("mean", "max")


def window_partition(
    x: torch.Tensor,  # (B, H, W, C)
    window: int,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut a grid into ``window x window`` windows, zero-padding bottom/right as needed.

    Returns:
        The windows as token sequences ``(B * nH * nW, window * window, C)``, row-major inside a
        window and windows ordered row-major per image, and the padded grid ``(Hp, Wp)``.
    """
    batch, height, width, channels = x.shape
    pad_h = (window - height % window) % window
    pad_w = (window - width % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.view(batch, padded_h // window, window, padded_w // window, window, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)
    return windows, (padded_h, padded_w)


def window_unpartition(
    windows: torch.Tensor,  # (B * nH * nW, window * window, C)
    window: int,
    grid: tuple[int, int],
    padded_grid: tuple[int, int],
) -> torch.Tensor:  # (B, H, W, C)
    """Inverse of :func:`window_partition`: reassemble the grid and drop the padding."""
    (height, width), (padded_h, padded_w) = grid, padded_grid
    rows, cols = padded_h // window, padded_w // window
    batch = windows.shape[0] // (rows * cols)
    x = windows.view(batch, rows, cols, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, padded_h, padded_w, -1)
    if padded_h != height or padded_w != width:
        x = x[:, :height, :width]
    return x.contiguous()


def window_attention_mask(height: int, width: int, window: int) -> torch.Tensor:
    """Boolean ``(H*W, H*W)`` mask, True where two grid positions share a window.

    Global attention under this block-diagonal (after a permutation) mask equals windowed
    attention on a grid that is a multiple of ``window``; it is the reference the tests use.
    """
    rows = torch.arange(height).repeat_interleave(width) // window
    cols = torch.arange(width).repeat(height) // window
    window_id = rows * ((width + window - 1) // window) + cols  # (H*W,)
    return window_id[:, None] == window_id[None, :]


def add_window_registers(
    windows: torch.Tensor,  # (B * nW, N, C)
    registers: torch.Tensor,  # (B, R, C)
) -> torch.Tensor:  # (B * nW, R + N, C)
    """Prepend each image's registers to every one of its windows (one copy per window)."""
    batch, num_registers, channels = registers.shape
    num_windows = windows.shape[0] // batch
    copies = registers[:, None].expand(batch, num_windows, num_registers, channels)
    return torch.cat([copies.reshape(-1, num_registers, channels), windows], dim=1)


def merge_window_registers(
    register_copies: torch.Tensor,  # (B * nW, R, C)
    batch: int,
    merge: str = "mean",
) -> torch.Tensor:  # (B, R, C)
    """Fold the per-window register copies of each image back into one set.

    Args:
        register_copies: Register outputs of every window, windows of one image contiguous.
        batch: Number of images ``B``.
        merge: ``"mean"`` (the reading in REFERENCE.md) or ``"max"`` (element-wise).
    """
    copies = register_copies.view(batch, -1, *register_copies.shape[1:])  # (B, nW, R, C)
    if merge == "mean":
        return copies.mean(dim=1)
    if merge == "max":
        return copies.amax(dim=1)
    raise ValueError(f"register merge must be one of {list(REGISTER_MERGES)}, got {merge!r}")
