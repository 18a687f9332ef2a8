"""Held-out perplexity of a next-token model.

Perplexity is ``exp`` of the mean negative log-likelihood per predicted token (nats). The text
pretraining stage reports it on the first batches of the data stage's ``val.bin`` against the
uniform-vocabulary level (a model that knows nothing scores exactly the vocabulary size); the
vision-language stage reports it on held-out captions (:mod:`mmafm.eval.captions`). Both go
through :func:`perplexity`, so a diverged model logs a large finite number, not an overflow.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MAX_LOG_PERPLEXITY", "perplexity", "token_nll", "held_out_perplexity"]

# mean NLLs above this are reported as exp(50) ~ 5e21: far past any vocabulary, and no overflow
MAX_LOG_PERPLEXITY = 50.0


def perplexity(mean_nll: float) -> float:
    """``exp(mean_nll)``, the exponent capped at :data:`MAX_LOG_PERPLEXITY`.

    Args:
        mean_nll: Mean negative log-likelihood per token, in nats.
    """
    return math.exp(min(mean_nll, MAX_LOG_PERPLEXITY))


@torch.no_grad()
def token_nll(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | None = None,
) -> tuple[float, int]:
    """Summed next-token cross-entropy over held-out batches, and the number of tokens scored.

    Args:
        model: ``model(input_ids) -> logits (B, T, V)`` (a wrapper such as DDP or an FSDP2 module
            is called as is, so every rank takes part in its collectives).
        batches: ``(input_ids (B, T), targets (B, T))`` pairs; every target is scored.
        device: Where the batches go; default the device of the model's first parameter.

    Returns:
        ``(total_nll, count)``: the sum of ``-log p(target)`` in nats (computed in float32, no
        z-loss) and the number of targets.
    """
    if device is None:
        device = next(model.parameters()).device
    total, count = 0.0, 0
    for input_ids, targets in batches:
        logits = model(input_ids.to(device))  # (B, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum")
        total += nll.item()
        count += targets.numel()
    return total, count


def held_out_perplexity(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | None = None,
) -> dict[str, float]:
    """Held-out token-level cross-entropy and its perplexity.

    Args:
        model: ``model(input_ids) -> logits (B, T, V)``; see :func:`token_nll`.
        batches: Held-out ``(input_ids, targets)`` batches.
        device: Where the batches go; default the model's.

    Returns:
        ``{"val_loss": mean NLL per token (nats), "val_ppl": perplexity(val_loss)}``; with no
        batches the loss is 0 (perplexity 1).
    """
    total, count = token_nll(model, batches, device)
    val_loss = total / max(count, 1)
    return {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}
