"""Rotary position embedding (Su et al., 2021) in the rotate-half layout of HF Llama / Qwen.

The head dimension is split into a first and a second half; pair ``(i, i + D/2)`` is rotated by
the angle ``position * base^(-2i/D)``. This is the layout of Hugging Face's Llama/Qwen3 weights
(not the interleaved ``(2i, 2i+1)`` layout of the original paper), so checkpoints convert without
permuting Q/K rows. The AFM reports use base 500k, raised to 6,315,089 for context lengthening
(2024 report, section 3); the base is the model config's ``rope_theta``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "rope_inverse_frequencies",
    "rope_cos_sin",
    "rope_table",
    "rotate_half",
    "apply_rope",
    "rope_base_for_context",
]


def rope_inverse_frequencies(head_dim: int, base: float, device=None) -> torch.Tensor:  # (D/2,)
    """``base^(-2i/D)`` for ``i < D/2``, in float32 (computed exactly like HF's Llama)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (base**exponents)


def rope_cos_sin(
    positions: torch.Tensor,  # (B, T) integer positions
    head_dim: int,
    base: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:  # 2 x (B, T, D)
    """Cosines and sines of the rotation angles for every position, duplicated over both halves."""
    inv_freq = rope_inverse_frequencies(head_dim, base, device=positions.device)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_table(
    length: int, head_dim: int, base: float, device=None
) -> tuple[torch.Tensor, torch.Tensor]:  # 2 x (length, D) float32
    """:func:`rope_cos_sin` of positions ``0 .. length-1`` in float32, precomputed once so that a
    forward pass only indexes it (``table[positions]`` equals ``rope_cos_sin(positions)`` bit for bit).
    """
    cos, sin = rope_cos_sin(torch.arange(length, device=device)[None], head_dim, base)
    return cos[0], sin[0]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last dimension."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(
    x: torch.Tensor,  # (B, H, T, D)
    cos: torch.Tensor,  # (B, T, D)
    sin: torch.Tensor,  # (B, T, D)
) -> torch.Tensor:  # (B, H, T, D)
    """Rotate queries or keys by their positions' angles."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def rope_base_for_context(base: float, trained_len: int, target_len: int) -> float:
    """The RoPE base for a context of ``target_len`` after training at ``trained_len``.

    ``base' = base ** (ln(T' / 2 pi) / ln(T / 2 pi))``, i.e. ``ln(base) / ln(T / 2 pi)`` is kept
    constant: every wavelength ``2 pi base^(2i/D)`` is raised to the same power, so the share of
    frequencies that turn less than once over the context is the same before and after. It
    reproduces the 2024 AFM report's context lengthening exactly: base 500k, 8192 -> 32768
    gives 6,315,088.8 (the report's 6,315,089); 8192 -> 65536 gives ~2.24e7 (WAVE2.md, "RoPE
    base rule", derived).

    Raises:
        ValueError: a length not above 2 pi (the logarithms must be positive) or a base <= 1.
    """
    if base <= 1.0:
        raise ValueError(f"rope_base_for_context: base must be > 1, got {base}")
    for name, value in (("trained_len", trained_len), ("target_len", target_len)):
        if value <= 2 * math.pi:
            raise ValueError(f"rope_base_for_context: {name} must be > 2*pi (~6.28), got {value}")
    return base ** (math.log(target_len / (2 * math.pi)) / math.log(trained_len / (2 * math.pi)))
