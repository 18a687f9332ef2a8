"""The default optimizer: AdamW with decoupled weight decay, none on norms, biases or embeddings.

The 2024 AFM report (section 3) trains with decoupled weight decay (3.16e-4 with its RMSProp-style
optimizer); mmafm's default is PyTorch's AdamW, whose decay is decoupled from the gradient
statistics (Loshchilov & Hutter) [open: the exact AFM optimizer is a later, pluggable choice].
As in nanoGPT and timm, 1-D parameters (norm scales, biases), embedding tables and every name the
model lists in ``no_weight_decay()`` (timm's convention, e.g. position embeddings, register
tokens) get no decay.

An optimizer factory is any callable ``(model, config) -> torch.optim.Optimizer``; the trainer
calls it on the unwrapped (and, with FSDP2, already sharded) model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer"]


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names (or module prefixes) the model asks to exclude from weight decay."""
    names: set[str] = set()
    if hasattr(model, "no_weight_decay"):
        names.update(model.no_weight_decay())
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def _excluded(name: str, param: torch.Tensor, no_decay: set[str]) -> bool:
    if param.ndim < 2:
        return True
    return any(name == entry or name.startswith(entry + ".") for entry in no_decay)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and an undecayed group.

    Args:
        model: the model; frozen parameters (``requires_grad=False``) are left out.
        weight_decay: the decay of the decayed group.

    Returns:
        Two optimizer param groups, each with a ``name`` ("decay" / "no_decay"); empty groups are
        dropped.
    """
    no_decay = _no_decay_names(model)
    decay_params, plain_params = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (plain_params if _excluded(name, param, no_decay) else decay_params).append(param)
    if not decay_params and not plain_params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    groups = [
        {"params": decay_params, "weight_decay": weight_decay, "name": "decay"},
        {"params": plain_params, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, config: Any) -> torch.optim.Optimizer:
    """The default optimizer factory: AdamW(lr, betas, eps) with :func:`param_groups`."""
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay),
        lr=config.lr,
        betas=tuple(config.betas),
        eps=config.eps,
    )
