"""The one attention kernel every tower calls: ``torch.nn.functional.scaled_dot_product_attention``.

Vision blocks (global, windowed, register-window) and text blocks (GQA, sliding window, KV-shared)
differ only in which queries see which keys; they all end here, so PyTorch picks the fastest
kernel (flash / memory-efficient / math) for the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attend"]


def attend(
    q: torch.Tensor,  # (B, H, Tq, D)
    k: torch.Tensor,  # (B, Hkv, Tk, D)
    v: torch.Tensor,  # (B, Hkv, Tk, D)
    mask: torch.Tensor | None = None,  # bool (.., Tq, Tk), True = may attend; or additive float
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:  # (B, H, Tq, D)
    """Scaled dot-product attention with grouped-query support (``H`` a multiple of ``Hkv``)."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale,
        dropout_p=dropout_p, enable_gqa=num_heads != num_kv_heads,
    )
