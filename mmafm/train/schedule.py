"""Learning-rate schedules: linear warm-up, then cosine decay to a fraction of the peak, or flat.

The 2024 AFM report (section 3, "Pre-training") warms up linearly for 5k steps and decays with a
cosine to 0.005 of the peak LR; supervised fine-tuning uses a constant LR. Both are multipliers of
the optimizer's peak LR wrapped in :class:`torch.optim.lr_scheduler.LambdaLR`, so any PyTorch
optimizer works with them. The AFM optimizer (:class:`mmafm.train.optim.AdaStar`) reads the
multiplier back as ``group["lr"] / group["peak_lr"]`` and scales its weight decay by it, as
axlearn's ``update_schedule`` does (``cosine_with_linear_warmup`` from 0, ``alpha`` = 1/200).

A scheduler factory is any callable ``(optimizer, config) -> LRScheduler``; the trainer calls it
once and steps it after every optimizer step. :func:`build_scheduler` is the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

__all__ = ["WarmupCosine", "WarmupConstant", "build_scheduler", "cosine_schedule", "constant_schedule"]


@dataclass
class WarmupCosine:
    """LR multiplier after ``step`` optimizer steps: linear warm-up, then cosine to ``min_lr_ratio``.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first step already
    moves, the peak is reached at step ``warmup_steps - 1``). Then with
    ``progress = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1]:
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2``.
    """

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class WarmupConstant:
    """LR multiplier: linear warm-up over ``warmup_steps`` (may be 0), then 1."""

    warmup_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return 1.0


def cosine_schedule(optimizer: Optimizer, config: Any) -> LRScheduler:
    """Warm-up + cosine over ``config.max_steps`` down to ``config.min_lr_ratio`` of the peak."""
    return LambdaLR(optimizer, WarmupCosine(config.warmup_steps, config.max_steps, config.min_lr_ratio))


def constant_schedule(optimizer: Optimizer, config: Any) -> LRScheduler:
    """Warm-up over ``config.warmup_steps``, then the peak LR until the end."""
    return LambdaLR(optimizer, WarmupConstant(config.warmup_steps))


_SCHEDULES = {"cosine": cosine_schedule, "constant": constant_schedule}


def build_scheduler(optimizer: Optimizer, config: Any) -> LRScheduler:
    """The default scheduler factory: picks the schedule named by ``config.schedule``."""
    name = getattr(config, "schedule", "cosine")
    if name not in _SCHEDULES:
        raise ValueError(f"schedule: expected one of {sorted(_SCHEDULES)}, got {name!r}")
    return _SCHEDULES[name](optimizer, config)
