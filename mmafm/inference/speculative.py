"""Speculative decoding: a small draft model proposes, the target verifies several tokens at once.

The 2025 report's framework decodes with a draft model; this is the standard algorithm
(Leviathan et al. 2023, Chen et al. 2023), batch size 1:

1. the draft proposes up to ``k`` tokens, one decode step each (its own KV cache and
   :class:`~mmafm.inference.plan.DecodePlan`, so its steps run in the native kernels);
2. the target runs the last committed token and the ``k`` proposals in **one** forward over its
   KV cache, giving its distribution at each of the ``k + 1`` positions;
3. proposals are accepted left to right: greedy, while the proposal is the target's argmax;
   sampling, with probability ``min(1, p(d) / q(d))`` (``p`` the target's, ``q`` the draft's
   distribution, both after the same temperature / top-k / top-p through
   :func:`~mmafm.inference.generate.sampling_probs`). The first rejected proposal is replaced by a
   token from ``norm(max(p - q, 0))`` (greedy: the argmax); when all ``k`` pass, a bonus token
   comes from the target's last position. So greedy output equals plain greedy decoding, and
   sampled output follows the target's distribution exactly;
4. both KV caches **roll back** the rejected columns (:func:`rollback_cache`).

With guided generation (a grammar matcher from :mod:`mmafm.inference.guided`) the draft proposes
under a *fork* of the matcher, so the masks of the draft and of the target's positions come from
the states the proposals lead to; the real matcher advances only by the tokens once accepted.

Rollback needs caches that keep every position (no sliding-window rings), which every dense
model has; a ring cache is refused with an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from mmafm.inference.generate import _check_sampling, prefill, sampling_probs
from mmafm.inference.kernels import kernel_linears
from mmafm.inference.plan import build_plan
from mmafm.layers.kv_cache import KVCache

__all__ = ["SpeculativeResult", "rollback_cache", "speculative_generate", "accept_proposals", "truncated_draft"]


@dataclass
class SpeculativeResult:
    """What :func:`speculative_generate` returns.

    Attributes:
        tokens: the generated tokens (a stop token ends them and is not included).
        rounds: draft-and-verify rounds run (target forwards after the prefill).
        proposed: draft tokens proposed in all.
        accepted: draft tokens the target accepted.
    """

    tokens: list[int]
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    per_round: list[int] = field(default_factory=list)  # accepted proposals per round

    @property
    def acceptance(self) -> float:
        """Accepted / proposed draft tokens."""
        return self.accepted / max(self.proposed, 1)


def rollback_cache(cache: KVCache, length: int) -> None:
    """Forget the columns of ``cache`` from ``length`` on (the rejected proposals): positions and
    validity go back; the stored keys/values beyond are overwritten by the next step."""
    if cache.windows:
        raise ValueError("speculative decoding cannot roll back a sliding-window (ring) KV cache: "
                         f"its slots for windows {cache.windows} are overwritten in place")
    if not 0 <= length <= cache.length:
        raise ValueError(f"cannot roll back a cache of {cache.length} columns to {length}")
    removed = cache.valid[:, length : cache.length].sum(dim=1)  # (B,) real tokens dropped
    cache.valid[:, length : cache.length] = False
    cache.next_position -= removed
    cache.length = length


def _target_logits(model: nn.Module, cache: KVCache, tokens: list[int]) -> torch.Tensor:  # (T, V) float32
    """The target's logits at each of ``tokens`` (appended to its cache): one forward."""
    ids = torch.tensor([tokens], dtype=torch.long, device=cache.device)
    with kernel_linears():
        return model(ids, cache=cache)[0].float()


def _masked(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:  # (V,)
    """``logits`` with the tokens ``allowed`` forbids at ``-inf`` (numpy on CPU: see
    :meth:`mmafm.inference.guided.GrammarConstraint.mask_logits` for why)."""
    if allowed is None:
        return logits
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        values = logits.numpy().copy()
        values[~allowed.numpy()] = -float("inf")
        return torch.from_numpy(values)
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def accept_proposals(
    target_logits: torch.Tensor,  # (m + 1, V): the target at the positions of the m proposals and after
    proposals: Sequence[int],
    draft_probs: Sequence[torch.Tensor] | None,  # m x (V,) the draft's distributions (sampling)
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """The acceptance rule: ``(accepted count n, next token)``; the next token replaces the first
    rejected proposal, or is the bonus token after all ``m`` (the module docstring, step 3)."""
    if temperature == 0.0:
        for index, proposal in enumerate(proposals):
            best = int(target_logits[index].argmax())
            if best != proposal:
                return index, best
        return len(proposals), int(target_logits[len(proposals)].argmax())
    for index, proposal in enumerate(proposals):
        p = sampling_probs(target_logits[index], temperature, top_k, top_p)  # (V,)
        q = draft_probs[index]
        ratio = float(p[proposal]) / max(float(q[proposal]), 1e-30)
        if ratio >= 1.0 or float(torch.rand((), generator=generator)) < ratio:
            continue
        residual = (p - q).clamp(min=0)
        residual = residual / residual.sum() if float(residual.sum()) > 0 else p
        return index, int(torch.multinomial(residual, 1, generator=generator))
    p = sampling_probs(target_logits[len(proposals)], temperature, top_k, top_p)
    return len(proposals), int(torch.multinomial(p, 1, generator=generator))


def _allowed(matcher: Any, bitmask: torch.Tensor, vocab: int, table_size: int) -> torch.Tensor:  # (V,) bool
    from mmafm.inference.guided import unpack_bitmask

    import numpy as np

    matcher.fill(bitmask, 0)
    allowed = np.zeros(vocab, dtype=bool)
    allowed[:table_size] = unpack_bitmask(bitmask, table_size)[0].numpy()
    return torch.from_numpy(allowed)


@torch.no_grad()
def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    k: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: int | Iterable[int] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
    matcher: Any = None,
    table_size: int | None = None,
) -> SpeculativeResult:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens of ``target``, drafted by ``draft``.

    Args:
        target, draft: text decoders over the same vocabulary (``draft`` smaller), each with
            ``new_cache`` and ``forward(ids, cache=)``.
        prompt: the prompt's token ids (one row).
        max_new_tokens: most tokens generated.
        k: proposals per round.
        temperature, top_k, top_p: sampling (greedy by default), as in
            :func:`~mmafm.inference.generate.sample_next_token`.
        stop_tokens: the output ends at the first of these (not included).
        seed, generator: randomness for sampling and acceptance.
        matcher: a grammar matcher (:meth:`mmafm.inference.guided.Engine.matcher`) constraining
            the output; it ends the output when its grammar is complete.
        table_size: the tokenizer's vocabulary (the matcher's bitmask width), with ``matcher``.

    Returns:
        The tokens and the acceptance statistics.
    """
    _check_sampling(temperature, top_k, top_p)
    if k < 1:
        raise ValueError(f"k (proposals per round) must be >= 1, got {k}")
    vocab = target.config.vocab_size
    if draft.config.vocab_size != vocab:
        raise ValueError(f"draft vocab_size {draft.config.vocab_size} != target vocab_size {vocab}")
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("speculative_generate needs a non-empty prompt")
    context = min(target.config.max_seq_len, draft.config.max_seq_len)
    if len(prompt) + max_new_tokens > context:
        raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds the context "
                         f"of {context} tokens")
    stop = {stop_tokens} if isinstance(stop_tokens, int) else set(stop_tokens)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    greedy = temperature == 0.0
    result = SpeculativeResult([])
    if max_new_tokens == 0:
        return result
    bitmask = None
    if matcher is not None:
        table_size = table_size or vocab
        bitmask = torch.full((1, (table_size + 31) // 32), -1, dtype=torch.int32)

    def allowed_of(state: Any) -> torch.Tensor | None:
        return None if state is None else _allowed(state, bitmask, vocab, table_size)

    def choose(logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:  # (V,) -> token, its distribution
        if greedy:
            return int(logits.argmax()), None
        probs = sampling_probs(logits, temperature, top_k, top_p)
        return int(torch.multinomial(probs, 1, generator=generator)), probs

    modes = [(m, m.training) for m in (target, draft)]
    for model, _ in modes:
        model.eval()
    try:
        length = len(prompt) + max_new_tokens + k + 1
        target_cache = target.new_cache(1, min(length, target.config.max_seq_len))
        draft_cache = draft.new_cache(1, min(length, draft.config.max_seq_len))
        ids = torch.tensor([prompt], dtype=torch.long, device=target_cache.device)
        first_logits = prefill(target, target_cache, ids)[0]  # (V,)
        prefill(draft, draft_cache, ids)
        for cache in (target_cache, draft_cache):
            rollback_cache(cache, cache.length)  # refuses ring caches before any work
        draft_plan = build_plan(draft, draft_cache)
        first, _ = choose(_masked(first_logits, allowed_of(matcher)))
        if first in stop:
            return result
        result.tokens.append(first)
        if matcher is not None and (_advance(matcher, first) or matcher.is_stopped()):
            return result
        pending, draft_todo = first, [first]  # pending: committed, not yet in the target's cache
        while len(result.tokens) < max_new_tokens:
            room = min(k, max_new_tokens - len(result.tokens), context - target_cache.length - 1)
            # 1. draft up to `room` proposals under a fork of the grammar
            for token in draft_todo[:-1]:
                draft_plan.step(torch.tensor([token]))
            draft_logits = draft_plan.step(torch.tensor([draft_todo[-1]]))[0]  # (V,)
            draft_todo = []
            fork = matcher.fork() if matcher is not None else None
            proposals: list[int] = []
            draft_probs: list[torch.Tensor] = []
            masks: list[torch.Tensor | None] = []
            while len(proposals) < room:
                allowed = allowed_of(fork)
                masks.append(allowed)
                proposal, probs = choose(_masked(draft_logits, allowed))
                proposals.append(proposal)
                draft_probs.append(probs)
                if proposal in stop or (fork is not None and (_advance(fork, proposal) or fork.is_stopped())):
                    break
                if len(proposals) < room:
                    draft_logits = draft_plan.step(torch.tensor([proposal]))[0]
            masks.append(allowed_of(fork) if fork is not None and not fork.is_stopped() and proposals[-1] not in stop
                         else None)
            # 2. the target verifies [pending, proposals] in one forward
            start = target_cache.length
            logits = _target_logits(target, target_cache, [pending] + proposals)  # (m + 1, V)
            if matcher is not None:
                logits = torch.stack([_masked(row, mask) for row, mask in zip(logits, masks)])
            # 3. accept
            accepted, correction = accept_proposals(logits, proposals, draft_probs, temperature, top_k, top_p,
                                                    generator)
            result.rounds += 1
            result.proposed += len(proposals)
            result.accepted += accepted
            result.per_round.append(accepted)
            new_tokens = proposals[:accepted] + [correction]
            # 4. roll back the rejected columns: target keeps pending + accepted proposals
            rollback_cache(target_cache, start + 1 + accepted)
            draft_kept = min(accepted, len(proposals) - 1)  # the last proposal was never fed to the draft
            rollback_cache(draft_cache, draft_cache.length - (len(proposals) - 1 - draft_kept))
            draft_todo = proposals[draft_kept:accepted] + [correction]
            done = False
            for token in new_tokens:
                if token in stop or len(result.tokens) >= max_new_tokens:
                    done = True
                    break
                result.tokens.append(token)
                if matcher is not None and (_advance(matcher, token) or matcher.is_stopped()):
                    done = True
                    break
            if done:
                break
            pending = correction
    finally:
        for model, mode in modes:
            model.train(mode)
    return result


def _advance(matcher: Any, token: int) -> bool:
    """Feed ``token`` to ``matcher``; an error if the grammar refuses it (it had allowed it)."""
    if not matcher.accept(token):
        raise RuntimeError(f"the grammar refused token {token} it had allowed")
    return False


def truncated_draft(model: nn.Module, layers: int) -> nn.Module:
    """A draft made of ``model``'s embedding, its first ``layers`` decoder layers, its final norm and
    head (early exit, "self-speculative" drafting): no training, the same vocabulary, and the draft
    shares nothing with the target at run time (weights are copied)."""
    import dataclasses

    config = model.config
    if not 1 <= layers < config.n_layers:
        raise ValueError(f"a truncated draft needs 1 <= layers < {config.n_layers}, got {layers}")
    draft = type(model)(dataclasses.replace(config, n_layers=layers))
    state = {name: tensor for name, tensor in model.state_dict().items()
             if not name.startswith("layers.") or int(name.split(".")[1]) < layers}
    draft.load_state_dict(state)
    return draft.to(next(model.parameters()).dtype).eval()
