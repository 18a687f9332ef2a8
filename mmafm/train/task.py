"""The contract between the one trainer and a stage: the stage's *task*.

A stage differs from another by its task, its data and its config; the loop is the same. The
trainer (:class:`mmafm.train.Trainer`) relies on :class:`TrainingTask` and uses the optional
parts when a task has them. The protocols are ``runtime_checkable``, so ``isinstance(task,
TrainingTask)`` tells whether an object has the required members (not their signatures).

Stage tasks: :class:`mmafm.stages.text_pretrain.TextPretrainTask`,
:class:`mmafm.stages.clip_pretrain.ClipTask`, :class:`mmafm.stages.vl_alignment.CaptionTask`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["TrainingTask", "EvaluatingTask", "CountingTask"]


@runtime_checkable
class TrainingTask(Protocol):
    """What every task has.

    Attributes:
        model: The ``nn.Module`` being trained and checkpointed. The trainer moves it to the
            device and may replace ``task.model`` by a ``DistributedDataParallel`` wrapper (FSDP2
            shards it in place), so the task always calls ``self.model(...)`` and keeps its own
            reference to the plain module where it needs one.
    """

    model: nn.Module

    def training_forward(self, batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Forward one micro-batch (already on the device, under autocast when bf16).

        Args:
            batch: What the training data yields.

        Returns:
            ``(losses, metrics)``: ``losses`` maps names to scalar tensors, summed for the
            backward pass (at least one); ``metrics`` maps names to floats or scalar tensors to
            log. Neither may use the names the trainer logs itself (``step``, ``lr``,
            ``grad_norm``, ``tokens_or_samples_per_s``).
        """
        ...


@runtime_checkable
class EvaluatingTask(TrainingTask, Protocol):
    """A task with held-out evaluation."""

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, logged as ``eval/<name>``.

        Called on every rank (it may run collectives through ``self.model``), in eval mode under
        ``no_grad`` and the training autocast, every ``eval_every`` steps and at the end.
        """
        ...


@runtime_checkable
class CountingTask(TrainingTask, Protocol):
    """A task that says how much a batch holds, for the throughput column."""

    def count_items(self, batch: Any) -> int:
        """Tokens or samples in ``batch`` (default without it: the leading dimension of the first
        tensor, :func:`mmafm.train.count_items`)."""
        ...
