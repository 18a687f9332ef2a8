"""RLHF as the 2024 report's MDLOO, and its two ablations, on the shared trainer.

MDLOO (appendix E.2 [paper]; WAVE2.md "Post-training"), in the bandit setting (a whole response
is one action):

1. per iteration, ``n`` responses per prompt from the policy at the iteration's start ``pi_k``
   (the inference wing's batched sampling);
2. reward ``R = r(x, y) - beta * (log pi_k(y) - log pi_SFT(y))``, the reward model's (or the
   oracle's) score minus a KL penalty to the SFT reference (TRL RLOO's sequence-level first-order
   estimate, in the reward, not differentiated);
3. leave-one-out advantages ``A_i = R_i - mean_{j != i} R_j`` (:func:`loo_advantages`);
4. ``inner_steps`` optimizer steps on the same responses, each minimising
   ``-mean(exp(log pi(y) - log pi_k(y)) A) + eta * KL(pi || pi_k)``: the importance-weighted
   advantage with no ratio clipping, and a mirror-descent penalty to the iteration's start
   (Tomar et al., MDPO), the KL summed over the response's tokens with the full next-token
   distributions (so its gradient is exactly 0 at ``pi = pi_k``, and the first inner step is a
   REINFORCE-LOO step, tested).

``algorithm`` ablates step 4 (:data:`ALGORITHMS`): ``ppo_clip`` (TRL ``RLOOTrainer``'s loss:
``-mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A))`` with the sequence ratio ``rho``, several
inner steps) and ``reinforce_loo`` (``-mean(A log pi(y))``, one step per batch of responses).

Prompt selection (2025 report [paper]): :func:`select_by_reward_variance` keeps the share of
prompts whose reward varies most across the policy's generations (verl's dynamic sampling drops
the zero-variance ones: the online cousin).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "ALGORITHMS",
    "loo_advantages",
    "policy_loss",
    "response_logprobs",
    "sample_responses",
    "select_by_reward_variance",
    "RolloutSource",
    "PolicyTask",
]

ALGORITHMS = ("mdloo", "ppo_clip", "reinforce_loo")


def loo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages of ``rewards`` (prompts, n): ``r_i - (sum_j r_j - r_i) / (n - 1)``."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, n) with n >= 2 samples per prompt, got {tuple(rewards.shape)}")
    n = rewards.shape[1]
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (n - 1)


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, target_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-sequence log-prob of the response (N,), next-token log-probs (N, T - 1, V))``.

    Args:
        input_ids: (N, T) prompt + response, right-padded.
        target_mask: (N, T - 1) True where position ``t`` predicts a response token ``t + 1``.
    """
    log_probs = model(input_ids)[:, :-1].float().log_softmax(dim=-1)  # (N, T-1, V)
    token = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    return (token * target_mask).sum(dim=-1), log_probs


def policy_loss(algorithm: str, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                log_probs: torch.Tensor | None = None, old_log_probs: torch.Tensor | None = None,
                target_mask: torch.Tensor | None = None, kl_coef: float = 0.0, clip: float = 0.2
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss of ``algorithm`` (:data:`ALGORITHMS`) on responses sampled from ``pi_k``.

    Args:
        logp, old_logp: (N,) response log-probs under the current policy and ``pi_k``.
        advantages: (N,) leave-one-out advantages.
        log_probs, old_log_probs: (N, T - 1, V) next-token log-probs, current and ``pi_k`` (mdloo's
            KL to ``pi_k``; needed when ``kl_coef > 0``).
        target_mask: (N, T - 1) the response positions.
        kl_coef: mdloo's ``eta``; clip: ppo_clip's ``eps``.

    Returns:
        ``(loss, metrics)`` (metrics: ``ratio``, and ``kl_to_start`` for mdloo).
    """
    ratio = torch.exp(logp - old_logp)
    metrics: dict[str, torch.Tensor] = {"ratio": ratio.detach().mean()}
    if algorithm == "reinforce_loo":
        return -(advantages * logp).mean(), metrics
    if algorithm == "ppo_clip":
        clipped = ratio.clamp(1 - clip, 1 + clip)
        return -torch.minimum(ratio * advantages, clipped * advantages).mean(), metrics
    if algorithm != "mdloo":
        raise ValueError(f"algorithm {algorithm!r} is not one of {ALGORITHMS}")
    loss = -(ratio * advantages).mean()
    if kl_coef > 0:
        if log_probs is None or old_log_probs is None or target_mask is None:
            raise ValueError("mdloo with kl_coef > 0 needs log_probs, old_log_probs and target_mask")
        kl_token = (log_probs.exp() * (log_probs - old_log_probs)).sum(dim=-1)  # (N, T-1) KL(pi || pi_k) per state
        kl = (kl_token * target_mask).sum(dim=-1).mean()
        metrics["kl_to_start"] = kl.detach()
        loss = loss + kl_coef * kl
    return loss, metrics


@torch.no_grad()
def sample_responses(model: nn.Module, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, end_id: int,
                     stop_ids: Sequence[int], pad_id: int, temperature: float = 1.0,
                     generator: torch.Generator | None = None) -> list[list[int]]:
    """``n`` sampled responses per prompt (prompt-major: prompt 0's n, then prompt 1's, ...) by the
    inference wing's batched decode loop; a response that stopped ends with ``end_id``."""
    from mmafm.inference import generate

    repeated = [list(p) for p in prompts for _ in range(n)]
    room = model.config.max_seq_len - max(len(p) for p in repeated)
    tokens = generate(model, repeated, max(1, min(max_new_tokens, room)), temperature=temperature,
                      stop_tokens=list(stop_ids), pad_token_id=pad_id, generator=generator)
    return [t + [end_id] if len(t) < max_new_tokens else t for t in tokens]


def select_by_reward_variance(rewards: torch.Tensor, keep_share: float) -> list[int]:
    """Indices of the ``ceil(keep_share * prompts)`` prompts whose rewards (prompts, m) vary most
    across their ``m`` generations, most varied first (ties: lower index first)."""
    if not 0.0 < keep_share <= 1.0:
        raise ValueError(f"keep_share must be in (0, 1], got {keep_share}")
    keep = max(1, math.ceil(keep_share * rewards.shape[0] - 1e-9))
    variance = rewards.float().var(dim=1, unbiased=False)
    order = sorted(range(rewards.shape[0]), key=lambda i: (-float(variance[i]), i))
    return order[:keep]


def _sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], n: int, pad_id: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids (N, T), target_mask (N, T - 1))`` of prompt + response rows, right-padded."""
    rows = [(list(prompts[i // n]), list(r)) for i, r in enumerate(responses)]
    length = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length - 1), dtype=torch.bool)
    for row, (prompt, response) in enumerate(rows):
        ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
        mask[row, len(prompt) - 1 : len(prompt) + len(response) - 1] = True
    return ids, mask


@dataclass
class RolloutSource:
    """The trainer's data for RL: each iteration samples ``n`` responses for the next
    ``prompts_per_iteration`` prompts from the current policy, scores them, and yields the same
    batch ``inner_steps`` times (one optimizer step each). Iterates forever; the stage's
    ``max_steps`` ends it. Per-iteration facts go to :attr:`history`.

    Args:
        policy: the model being trained (the very module the trainer updates).
        reference: the frozen SFT model (KL penalty in the reward).
        prompts: per prompt ``(prompt ids, context)``; ``context`` is passed to ``reward_fn``.
        reward_fn: ``(contexts, response texts) -> rewards (N,)``.
        score_fn: optional ``(contexts, texts) -> (N,)``, logged only (the oracle's score).
        decode: token ids -> text.
    """

    policy: nn.Module
    reference: nn.Module
    prompts: list[tuple[list[int], Any]]
    reward_fn: Callable[[list, list[str]], torch.Tensor]
    decode: Callable[[Sequence[int]], str]
    end_id: int
    stop_ids: Sequence[int]
    pad_id: int
    n: int = 4
    prompts_per_iteration: int = 8
    inner_steps: int = 4
    beta: float = 0.05
    max_new_tokens: int = 32
    temperature: float = 1.0
    keep_vocab_log_probs: bool = True
    score_fn: Callable[[list, list[str]], torch.Tensor] | None = None
    seed: int = 0
    history: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    # where the iteration is (the trainer's checkpoints hold it: state_dict / load_state_dict)
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)
    _order: list[int] = field(default_factory=list, init=False, repr=False)
    _cursor: int = field(default=0, init=False, repr=False)  # prompts taken so far
    _yielded: int = field(default=0, init=False, repr=False)  # yields of the current batch
    _before: list[int] | None = field(default=None, init=False, repr=False)  # generator state before it
    _batch: dict | None = field(default=None, init=False, repr=False)

    def _chosen(self, start: int) -> list[tuple[list[int], Any]]:
        return [self.prompts[self._order[(start + i) % len(self._order)]] for i in range(self.prompts_per_iteration)]

    def __iter__(self) -> Iterator[dict]:
        if self._generator is None:  # a fresh start (load_state_dict sets these on a resumed run)
            self._generator = torch.Generator().manual_seed(self.seed)
            self._order = torch.randperm(len(self.prompts), generator=self._generator).tolist()
            self._cursor, self._yielded = 0, self.inner_steps
        while True:
            if self._yielded >= self.inner_steps:  # the next rollout batch
                self._before = self._generator.get_state().tolist()
                self._batch = self.rollout(self._chosen(self._cursor), self._generator)
                self._cursor += self.prompts_per_iteration
                self._yielded = 0
            elif self._batch is None:  # resumed inside an iteration: its batch again, from today's policy
                self._generator.set_state(torch.tensor(self._before, dtype=torch.uint8))
                self.history = self.history[:-1]  # that iteration's facts are recorded again
                self._batch = self.rollout(self._chosen(self._cursor - self.prompts_per_iteration), self._generator)
            while self._yielded < self.inner_steps:
                self._yielded += 1
                yield self._batch

    def state_dict(self) -> dict:
        """Where the iteration is, JSON-able: the prompt order and cursor, the sampling
        generator's state now and before the current batch, how many times that batch was
        yielded, and the history. Not the batch: a run resumed inside an iteration samples that
        iteration's batch again (same prompts and random numbers, the restored policy); one
        resumed at an iteration boundary continues exactly as the uninterrupted run."""
        if self._generator is None:
            return {}
        return {"order": self._order, "cursor": self._cursor, "yielded": self._yielded,
                "generator": self._generator.get_state().tolist(), "before": self._before,
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (an empty one: from the start) on the next ``iter``."""
        if not state:
            return
        if len(state["order"]) != len(self.prompts):
            raise ValueError(f"RolloutSource state for {len(state['order'])} prompts, this source has "
                             f"{len(self.prompts)} (did the prompts change since the checkpoint?)")
        self._generator = torch.Generator()
        self._generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self._order, self._cursor, self._yielded = list(state["order"]), int(state["cursor"]), int(state["yielded"])
        self._before, self._batch, self.history = state["before"], None, list(state["history"])

    @torch.no_grad()
    def rollout(self, chosen: list[tuple[list[int], Any]], generator: torch.Generator) -> dict:
        prompts, contexts = [p for p, _ in chosen], [c for _, c in chosen]
        started = time.perf_counter()
        responses = sample_responses(self.policy, prompts, self.n, self.max_new_tokens, self.end_id, self.stop_ids,
                                     self.pad_id, self.temperature, generator)
        seconds = time.perf_counter() - started
        texts = [self.decode([t for t in r if t != self.end_id]) for r in responses]
        expanded = [c for c in contexts for _ in range(self.n)]
        device = next(self.policy.parameters()).device  # the trainer may have moved the policy to a GPU
        ids, mask = (t.to(device) for t in _sequences(prompts, responses, self.n, self.pad_id))
        self.reference.to(device)
        was_training = self.policy.training
        self.policy.eval()
        old_logp, old_log_probs = response_logprobs(self.policy, ids, mask)
        self.policy.train(was_training)
        ref_logp, _ = response_logprobs(self.reference, ids, mask)
        kl_ref = old_logp - ref_logp  # (N,) first-order sequence KL estimate (TRL RLOO's)
        reward = torch.as_tensor(self.reward_fn(expanded, texts), dtype=torch.float32).to(device)
        shaped = reward - self.beta * kl_ref
        advantages = loo_advantages(shaped.view(len(prompts), self.n)).flatten()
        facts = {"iteration": len(self.history) + 1, "reward": reward.mean().item(), "kl_ref": kl_ref.mean().item(),
                 "shaped_reward": shaped.mean().item(), "response_tokens": float(mask.sum()) / len(responses),
                 "samples_per_s": len(responses) / max(seconds, 1e-9)}
        if self.score_fn is not None:
            facts["oracle_score"] = float(torch.as_tensor(self.score_fn(expanded, texts), dtype=torch.float32).mean())
        self.history.append(facts)
        self.samples = [{"response": t, "reward": float(r)} for t, r in zip(texts[: self.n], reward[: self.n])]
        return {"input_ids": ids, "target_mask": mask, "old_logp": old_logp, "advantages": advantages,
                "old_log_probs": old_log_probs if self.keep_vocab_log_probs else torch.zeros(0),
                "reward": reward.mean(), "kl_ref": kl_ref.mean()}


class PolicyTask:
    """The policy-gradient step of ``algorithm`` for the shared trainer (batches from
    :class:`RolloutSource`)."""

    def __init__(self, model: nn.Module, algorithm: str, kl_coef: float = 0.1, clip: float = 0.2):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm {algorithm!r} is not one of {ALGORITHMS}")
        self.model, self.algorithm, self.kl_coef, self.clip = model, algorithm, kl_coef, clip

    def training_forward(self, batch: dict) -> tuple[dict, dict]:
        mask = batch["target_mask"]
        logp, log_probs = response_logprobs(self.model, batch["input_ids"], mask)
        old = batch["old_log_probs"] if batch["old_log_probs"].numel() else None
        loss, metrics = policy_loss(self.algorithm, logp, batch["old_logp"], batch["advantages"], log_probs, old, mask,
                                    self.kl_coef if self.algorithm == "mdloo" else 0.0, self.clip)
        metrics.update({"reward": batch["reward"], "kl_ref": batch["kl_ref"]})
        return {"policy": loss}, metrics

    def count_items(self, batch: dict) -> int:
        return int(batch["input_ids"].shape[0])  # responses
