"""The two-layer GELU MLP of the vision transformers (ViT, ViTDet): ``fc2(gelu(fc1(x)))``.

Names (``fc1``, ``fc2``) follow timm's ``Mlp`` so timm and open_clip weights map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> linear, as in ViT, CLIP and SAM.

    Args:
        dim: Input and output width.
        hidden_dim: Hidden width (6144 for ViT-g/14, 4 x width for ViTDet).
        bias: Whether both linears carry a bias.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim)
        return self.fc2(F.gelu(self.fc1(x)))
