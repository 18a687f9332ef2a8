"""SwiGLU feed-forward (Shazeer, 2020): ``w_down(silu(w_gate x) * w_up x)``, bias-free.

The FFN of every AFM text model (2024 report, section 2; 2025 report). Parameter names
``w_gate`` / ``w_up`` / ``w_down`` map one to one onto HF Llama's ``gate_proj`` / ``up_proj`` /
``down_proj``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLU"]


class SwiGLU(nn.Module):
    """Gated feed-forward ``dim -> hidden_dim -> dim``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.w_up = nn.Linear(dim, hidden_dim, bias=False)
        self.w_down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
