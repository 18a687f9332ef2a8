"""RMSNorm (Zhang & Sennrich, 2019), used pre-attention, pre-FFN and on queries/keys (QK-norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 for stability under bf16 autocast."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same arithmetic in one call (bit-identical for float32; fewer dispatches)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
