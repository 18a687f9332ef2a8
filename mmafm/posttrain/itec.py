"""iTeC, the 2024 report's iterative teaching committee: every committee member answers every
prompt, the latest reward model picks the best answer per prompt, and a model is fine-tuned on
the picks (WAVE2.md "Post-training" [paper]: the committee held the latest SFT, rejection-sampled,
DPO/IPO and RL models and the previous bests; the picks were distilled into the device model).

:func:`committee_picks` does one round's sampling and picking and counts, per member, how many
prompts its answer won (the per-member win statistics); :func:`pick_conversations` turns the
picks into chat conversations for SFT (:class:`mmafm.stages.adapter.ChatTask` trains on them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mmafm.data.chat import strip_markers
from mmafm.posttrain.rl import sample_responses

__all__ = ["Pick", "CommitteeRound", "committee_picks", "pick_conversations"]


@dataclass(frozen=True)
class Pick:
    """The reward model's choice for one prompt."""

    context: Any  # what the reward function received for this prompt: (family, turns)
    answer: str
    member: str  # the committee member that wrote it
    reward: float


@dataclass(frozen=True)
class CommitteeRound:
    """One iTeC round: the picks, and per member its wins and mean reward over its answers."""

    picks: list[Pick]
    wins: dict[str, int]  # prompts whose best answer came from this member
    mean_reward: dict[str, float]  # over all of the member's answers
    rewards: torch.Tensor  # (members, prompts, k) every answer's reward
    answers: dict[str, list[str]]  # per member, its answers prompt-major (prompt 0's k, then prompt 1's, ...)


@torch.no_grad()
def committee_picks(members: dict[str, nn.Module], prompts: Sequence[tuple[list[int], Any]], k: int,
                    reward_fn: Callable[[list, list[str]], torch.Tensor], decode: Callable[[Sequence[int]], str],
                    end_id: int, stop_ids: Sequence[int], pad_id: int, max_new_tokens: int, temperature: float = 1.0,
                    generator: torch.Generator | None = None) -> CommitteeRound:
    """``k`` sampled answers per prompt from every member (the inference wing's batched
    sampling), scored by ``reward_fn(contexts, texts)``; the best answer per prompt over all
    members and samples is its pick (ties: the earlier member, then the earlier sample)."""
    if not members:
        raise ValueError("iTeC needs at least one committee member")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    names = list(members)
    ids = [list(p) for p, _ in prompts]
    contexts = [c for _, c in prompts for _ in range(k)]
    texts: dict[str, list[str]] = {}
    rewards = torch.empty(len(names), len(prompts), k)
    for index, name in enumerate(names):
        responses = sample_responses(members[name], ids, k, max_new_tokens, end_id, stop_ids, pad_id, temperature,
                                     generator)
        texts[name] = [decode([t for t in r if t != end_id]) for r in responses]
        rewards[index] = torch.as_tensor(reward_fn(contexts, texts[name]), dtype=torch.float32).view(len(prompts), k)
    flat = rewards.permute(1, 0, 2).reshape(len(prompts), -1)  # (prompts, members * k), member-major
    best = flat.argmax(dim=1)  # first maximum: the earlier member, then the earlier sample
    picks, wins = [], {name: 0 for name in names}
    for prompt, choice in enumerate(best.tolist()):
        member, sample = divmod(choice, k)
        wins[names[member]] += 1
        picks.append(Pick(prompts[prompt][1], texts[names[member]][prompt * k + sample], names[member],
                          float(flat[prompt, choice])))
    mean_reward = {name: float(rewards[i].mean()) for i, name in enumerate(names)}
    return CommitteeRound(picks, wins, mean_reward, rewards, texts)


def pick_conversations(picks: Sequence[Pick]) -> list[list[dict]]:
    """Each pick as a conversation: its prompt turns (the context's, cut before the answer) with
    the picked answer as the last assistant turn (chat markers it spells removed; a tool call
    stays a ``[call]`` line of text)."""
    conversations = []
    for pick in picks:
        _, turns = pick.context
        head = [dict(t) for t in turns[:-1]] if turns[-1]["role"] == "assistant" else [dict(t) for t in turns]
        conversations.append(head + [{"role": "assistant", "content": strip_markers(pick.answer)}])
    return conversations
