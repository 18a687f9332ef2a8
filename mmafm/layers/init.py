"""Weight initialisation shared by the vision towers and the adapter."""

from __future__ import annotations

from torch import nn

__all__ = ["trunc_normal_linears_"]


def trunc_normal_linears_(module: nn.Module, std: float = 0.02) -> None:
    """timm's ViT init for every ``nn.Linear`` inside ``module``: truncated normal, zero bias."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.trunc_normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
