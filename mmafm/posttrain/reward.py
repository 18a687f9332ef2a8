"""The reward model of the 2024 report (appendix E.1) and its losses.

Architecture [paper]: a decoder (here the SFT model's trunk), the final embedding of the last
non-padding token, one linear head for the preference reward and four MLP classification heads
(instruction following, verbosity, truthfulness, harmlessness; 3 classes each).

Loss, for a pair with chosen reward ``r_c`` and rejected ``r_r`` labelled with level ``l``:

- ``soft`` [paper]: the soft-label Bradley-Terry loss
  ``-p_l log sigmoid(r_c - r_r) - (1 - p_l) log sigmoid(r_r - r_c)`` with a target probability
  ``p_l`` per level (:data:`LEVEL_TARGETS`), i.e. binary cross-entropy with logits of
  ``r_c - r_r`` against ``p_l`` (:func:`soft_label_loss`);
- ``margin`` (Llama 2): ``-log sigmoid(r_c - r_r - m_l)`` with a margin per level
  (:data:`LEVEL_MARGINS`);
- ``hard``: ``-log sigmoid(r_c - r_r)``, TRL ``RewardTrainer``'s loss (= ``soft`` with target 1);

plus ``grade_weight`` x the mean cross-entropy of the four heads against the oracle's
single-sided grades of both responses (the regularisers [paper]).

Calibration: :func:`expected_calibration_error` of ``sigmoid(r_a - r_b)`` against which of the
pair won, each pair counted in both orders so that a model predicting 1/2 everywhere scores
its distance from the labels' own frequencies and not from "the chosen always wins".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmafm.io import atomic_write_json

__all__ = [
    "LEVEL_TARGETS",
    "LEVEL_MARGINS",
    "LOSSES",
    "soft_label_loss",
    "margin_loss",
    "preference_loss",
    "RewardModel",
    "save_reward_model",
    "load_reward_model",
    "encode_response",
    "PairBatches",
    "RewardTask",
    "expected_calibration_error",
    "pair_rewards",
]

# target P(chosen beats rejected) per level: significantly / better / slightly / negligibly
LEVEL_TARGETS = (0.95, 0.85, 0.75, 0.65)  # [recalled: the 2024 report's values, garbled in our copy]
LEVEL_MARGINS = (1.0, 2 / 3, 1 / 3, 0.0)  # [recalled: Llama 2's "small" margins per level]
LOSSES = ("soft", "margin", "hard")


def soft_label_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """Mean soft-label Bradley-Terry loss: ``-p log s(d) - (1 - p) log s(-d)``, ``d = r_c - r_r``.

    Args:
        r_chosen, r_rejected: (N,) rewards of the chosen and rejected responses.
        target: (N,) or a scalar: the probability ``p`` that the chosen one is better.
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} differ in shape")
    difference = r_chosen - r_rejected
    target = torch.as_tensor(target, dtype=difference.dtype, device=difference.device).expand_as(difference)
    if bool(((target < 0) | (target > 1)).any()):
        raise ValueError("target probabilities must lie in [0, 1]")
    return -(target * F.logsigmoid(difference) + (1 - target) * F.logsigmoid(-difference)).mean()


def margin_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float) -> torch.Tensor:
    """Llama 2's margin loss ``-log sigmoid(r_c - r_r - m)`` (TRL's with a ``margin`` column)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def preference_loss(kind: str, r_chosen: torch.Tensor, r_rejected: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The preference loss ``kind`` (:data:`LOSSES`) of a batch labelled with ``levels`` (N,) in 0..3."""
    if kind == "soft":
        return soft_label_loss(r_chosen, r_rejected, torch.tensor(LEVEL_TARGETS, device=levels.device)[levels])
    if kind == "margin":
        return margin_loss(r_chosen, r_rejected, torch.tensor(LEVEL_MARGINS, device=levels.device)[levels])
    if kind == "hard":
        return soft_label_loss(r_chosen, r_rejected, 1.0)
    raise ValueError(f"loss {kind!r} is not one of {LOSSES}")


class RewardModel(nn.Module):
    """A decoder trunk, a linear reward head and four 3-class MLP grade heads on the final
    (normed) hidden state of each sequence's last real token.

    Args:
        trunk: a text decoder (:class:`mmafm.models.text.DecoderLM`); its LM head is unused.
        grade_hidden: width of the grade MLPs' hidden layer (default: the trunk's ``dim``).
    """

    def __init__(self, trunk: nn.Module, grade_hidden: int | None = None, axes: int = 4, classes: int = 3):
        super().__init__()
        dim = trunk.config.dim
        hidden = grade_hidden or dim
        self.trunk = trunk
        self.config = trunk.config
        self.reward_head = nn.Linear(dim, 1)
        self.grade_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, classes)) for _ in range(axes))
        nn.init.normal_(self.reward_head.weight, std=1 / math.sqrt(dim + 1))
        nn.init.zeros_(self.reward_head.bias)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rewards (B,), grade_logits (B, axes, classes))`` of right-padded ``input_ids`` (B, T)
        whose rows hold ``lengths`` (B,) real tokens (causal attention: padding on the right is
        never seen by a real token, so no mask is needed)."""
        hidden = self.trunk(input_ids, return_hidden=True)  # (B, T, dim)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1].float()  # (B, dim)
        rewards = self.reward_head(last).squeeze(-1)  # (B,)
        grades = torch.stack([head(last) for head in self.grade_heads], dim=1)  # (B, axes, classes)
        return rewards, grades


def save_reward_model(folder: str | Path, model: RewardModel, metadata: dict | None = None) -> Path:
    """``folder/trunk.safetensors`` (:func:`mmafm.save_model`), ``folder/heads.safetensors`` and
    ``folder/reward_model.json``; returns the folder."""
    from mmafm.checkpoint import save_checkpoint, save_model

    folder = Path(folder)
    trunk = save_model(folder / "trunk", model.trunk, metadata)
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("trunk.")}
    save_checkpoint(folder / "heads", heads, {"grade_hidden": model.grade_heads[0][0].out_features})
    atomic_write_json(folder / "reward_model.json", {"trunk": trunk.name, "heads": "heads.safetensors",
                                                     **(metadata or {})})
    return folder


def load_reward_model(folder: str | Path) -> RewardModel:
    """The :class:`RewardModel` :func:`save_reward_model` wrote to ``folder`` (eval mode)."""
    from mmafm.checkpoint import load_checkpoint, load_model

    folder = Path(folder)
    if not (folder / "reward_model.json").is_file():
        raise FileNotFoundError(f"{folder} holds no reward model (no reward_model.json); run 08_reward_model")
    heads, meta = load_checkpoint(folder / "heads")
    model = RewardModel(load_model(folder / "trunk", family="text"), grade_hidden=meta["grade_hidden"])
    model.load_state_dict({**{f"trunk.{k}": v for k, v in model.trunk.state_dict().items()}, **heads})
    return model.eval()


def encode_response(turns: Sequence[dict], answer: str, tokenizer: Any) -> list[int]:
    """Token ids of ``turns`` (cut before the answer) with ``answer`` as the last assistant turn:
    the chat template up to and including the answer's ``<|end|>`` (chat markers the answer
    spells are removed: they would forge turns)."""
    from mmafm.data.chat import prompt_ids, strip_markers

    head = list(turns) if turns[-1]["role"] == "assistant" else list(turns) + [{"role": "assistant", "content": ""}]
    return prompt_ids(head, tokenizer) + tokenizer.encode(strip_markers(answer)) + [tokenizer.token_id("<|end|>")]


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, T), lengths (B,))`` of right-padded rows."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.as_tensor(list(row))
    return ids, torch.tensor([len(r) for r in rows])


class PairBatches:
    """Shuffled batches of encoded preference pairs, one epoch per iteration: ``(ids (2B, T),
    lengths (2B,), levels (B,), grades (2B, 4))``, the chosen rows first."""

    def __init__(self, items: list[tuple[list[int], list[int], int, Sequence[int], Sequence[int]]], batch_size: int,
                 pad_id: int, shuffle: bool = True):
        if not items:
            raise ValueError("no preference pairs to train on")
        self.items, self.batch_size, self.pad_id, self.shuffle = items, batch_size, pad_id, shuffle

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.items)).tolist() if self.shuffle else list(range(len(self.items)))
        for start in range(0, len(order), self.batch_size):
            chunk = [self.items[i] for i in order[start : start + self.batch_size]]
            ids, lengths = _right_pad([c[0] for c in chunk] + [c[1] for c in chunk], self.pad_id)
            levels = torch.tensor([c[2] for c in chunk])
            grades = torch.tensor([list(c[3]) for c in chunk] + [list(c[4]) for c in chunk])
            yield ids, lengths, levels, grades


class RewardTask:
    """The reward model's task for the shared trainer: the preference loss ``loss`` plus
    ``grade_weight`` x the grade heads' cross-entropy."""

    def __init__(self, model: RewardModel, loss: str, grade_weight: float, val_batches: list | None = None):
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r} is not one of {LOSSES}")
        self.model, self.loss, self.grade_weight, self.val_batches = model, loss, grade_weight, val_batches or []

    def training_forward(self, batch: tuple) -> tuple[dict, dict]:
        ids, lengths, levels, grades = batch
        rewards, grade_logits = self.model(ids, lengths)  # (2B,), (2B, 4, 3)
        r_chosen, r_rejected = rewards.chunk(2)
        losses = {"preference": preference_loss(self.loss, r_chosen, r_rejected, levels)}
        if self.grade_weight > 0:
            losses["grades"] = self.grade_weight * F.cross_entropy(grade_logits.flatten(0, 1), grades.flatten())
        return losses, {"accuracy": (r_chosen > r_rejected).float().mean()}

    def count_items(self, batch: tuple) -> int:
        return int(batch[2].numel())  # pairs

    def evaluate(self) -> dict[str, float]:
        if not self.val_batches:
            return {}
        rewards, levels = pair_rewards(self.model, self.val_batches)
        return {"accuracy": float((rewards[:, 0] > rewards[:, 1]).float().mean())}


@torch.no_grad()
def pair_rewards(model: RewardModel, batches: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards (N, 2): chosen, rejected; levels (N,))`` over :class:`PairBatches` batches."""
    rows, levels = [], []
    device = next(model.parameters()).device
    for ids, lengths, level, _ in batches:
        rewards, _ = model(ids.to(device), lengths.to(device))
        rows.append(torch.stack(rewards.chunk(2), dim=1).cpu())
        levels.append(level)
    return torch.cat(rows), torch.cat(levels)


def expected_calibration_error(probabilities: torch.Tensor, outcomes: torch.Tensor, bins: int = 10) -> float:
    """ECE: sum over equal-width probability bins of (share of items) x |mean outcome - mean
    probability|.

    For pairs, pass ``sigmoid(r_chosen - r_rejected)`` with outcome 1 and its complement with
    outcome 0 (both orders), as the stage does.
    """
    probabilities, outcomes = probabilities.float().flatten(), outcomes.float().flatten()
    if probabilities.numel() == 0:
        raise ValueError("expected_calibration_error of no predictions")
    index = (probabilities * bins).long().clamp(max=bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += members.float().mean().item() * abs(outcomes[members].mean().item() - probabilities[members].mean().item())
    return error

