"""Speculative decoding: a small draft model proposes, the target verifies several tokens at once.

The 2025 report's framework decodes with a draft model; this is the standard algorithm
(Leviathan et al. 2023, Chen et al. 2023), for one prompt (:func:`speculative_generate`) or a
batch (:func:`speculative_generate_batch`):

1. the draft catches up on the tokens committed since its last step (one
   :meth:`~mmafm.inference.plan.DecodePlan.chunk` call) and proposes up to ``k`` tokens, one
   decode step each (its own KV cache and :class:`~mmafm.inference.plan.DecodePlan`, so its
   steps run in the native kernels);
2. the target runs the last committed token and the ``k`` proposals in **one** forward over its
   KV cache (:meth:`DecodePlan.chunk`: for a dense model one native call that reads the weights
   once for all ``k + 1`` tokens, each token's logits bit-identical to a plain decode step),
   giving its distribution at each of the ``k + 1`` positions;
3. proposals are accepted left to right: greedy, while the proposal is the target's argmax;
   sampling, with probability ``min(1, p(d) / q(d))`` (``p`` the target's, ``q`` the draft's
   distribution, both after the same temperature / top-k / top-p through
   :func:`~mmafm.inference.generate.sampling_probs`). The first rejected proposal is replaced by a
   token from ``norm(max(p - q, 0))`` (greedy: the argmax); when all ``k`` pass, a bonus token
   comes from the target's last position. So greedy output equals plain greedy decoding, and
   sampled output follows the target's distribution exactly;
4. both KV caches **roll back** the rejected columns by length (:func:`rollback_cache`: no copy;
   the next forward overwrites them). In a batch, rows accept different numbers of tokens: the
   caches keep the longest row's columns and mark the other rows' rejected columns as padding
   (:func:`keep_columns`; attention skips them, RoPE positions count real tokens only), and when
   a cache fills up its rows are packed to the right (:func:`compact_cache`, the only copy).

With guided generation (grammar matchers from :mod:`mmafm.inference.guided`, one per row) the
draft proposes under a *fork* of each matcher, so the masks of the draft and of the target's
positions come from the states the proposals lead to; the real matcher advances only by the
tokens once accepted.

Rollback needs caches that keep every position (no sliding-window rings), which every dense
model has; a ring cache is refused with an error. One greedy row without a grammar runs the same
steps in a leaner loop (``_Speculation._run_greedy_row``: Python lists, no padding bookkeeping;
tested equal to the batched loop, statistics included), and a small draft (or a packed one,
:mod:`mmafm.compress`) reads a short prompt in native chunks.

A *self-draft* (:func:`self_draft`: the target's own weights palettized to 8 bits, int8
activations, a quarter of the bytes) has the target's cache layout, so with ``share_kv=True`` it
takes the target's K/V instead of computing its own where the target has them: the prompt's
(:func:`copy_prompt_kv`) and, after a round whose proposals were all accepted, the last
proposal's (:func:`append_column`), which the draft proposed but never fed. SmolLM2-135M runs
1.57x faster this way at 32 new tokens (docs/guided_generation.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from mmafm.inference.generate import (PACKED_NATIVE_PROMPT_TOKENS, _check_sampling, left_pad, prefill,
                                      prefill_and_plan, sampling_probs)
from mmafm.inference.plan import build_plan
from mmafm.layers.kv_cache import KVCache

__all__ = ["SpeculativeResult", "rollback_cache", "copy_prompt_kv", "append_column", "keep_columns", "compact_cache",
           "speculative_generate", "speculative_generate_batch", "accept_proposals", "truncated_draft",
           "acceptance_by_k", "speculative_speedup", "expected_tokens_per_round", "self_draft"]


# prompt tokens x draft parameters up to which the draft reads its prompt in one native chunk
# rather than the module path (oneDNN GEMMs): measured at 1 thread, the chunk took 1.8 / 3.1 ms
# against 4.8 / 5.0 ms for 16 / 40 tokens of a 0.59M model, but 56 against 41 ms for 40 tokens of a
# 25M one (the chunk reads the weights once, then is compute-bound at GEMV speed)
_NATIVE_PROMPT_WORK = 5e7


@dataclass
class SpeculativeResult:
    """What :func:`speculative_generate` returns (one per row from :func:`speculative_generate_batch`).

    Attributes:
        tokens: the generated tokens (a stop token ends them and is not included).
        rounds: draft-and-verify rounds run (target forwards after the prefill) while the row ran.
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
    if length == cache.length:
        return
    dropped = cache.valid.narrow(1, length, cache.length - length)  # (B, n)
    if cache.has_padding:
        cache.next_position -= dropped.sum(dim=1)  # real tokens dropped per row
    else:
        cache.next_position -= cache.length - length
    dropped.fill_(False)
    cache.length = length


def _copy_columns(source: KVCache, dest: KVCache, theirs_at: int | slice, ours_at: int | slice) -> None:
    """Every stored layer's keys and values (and int8 scales) of ``source``'s columns
    ``theirs_at`` into ``dest``'s columns ``ours_at`` (caches of one layout)."""
    for theirs, ours in zip(source.layers, dest.layers):
        if theirs is None:
            continue
        for name in ("keys", "values", "key_scales", "value_scales"):
            if hasattr(theirs, name):
                getattr(ours, name)[:, :, ours_at].copy_(getattr(theirs, name)[:, :, theirs_at])


def copy_prompt_kv(source: KVCache, dest: KVCache) -> None:
    """Give the empty cache ``dest`` the columns ``source`` holds: keys, values, validity
    (padding) and positions, as if ``dest``'s model had read the same prompt. For a self-draft
    (the target's weights compressed, the same attention layout) whose prompt then costs nothing:
    its K/V are the target's exact ones rather than its own approximation of them (QSpec, Zhao et
    al. 2024, shares the cache between its low- and high-precision passes the same way). Raises
    ValueError for caches of different layouts, a non-empty ``dest``, rings or no room."""
    def layout(cache: KVCache) -> list:
        return [None if layer is None else (tuple(layer.keys.shape[:2]) + tuple(layer.keys.shape[3:]),
                                            layer.keys.dtype, layer.quantized) for layer in cache.layers]

    if source.windows or dest.windows:
        raise ValueError("copy_prompt_kv: sliding-window (ring) caches are not copied column by column")
    if layout(source) != layout(dest) or source.batch_size != dest.batch_size:
        raise ValueError("copy_prompt_kv: the draft's cache layout (layers, rows, KV heads, head_dim, dtype) differs "
                         "from the target's; share_kv needs a self-draft (the target's weights compressed)")
    if dest.length:
        raise ValueError(f"copy_prompt_kv: the destination cache already holds {dest.length} columns")
    length = source.length
    if length > dest.max_len:
        raise ValueError(f"copy_prompt_kv: {length} columns do not fit a cache of max_len={dest.max_len}")
    _copy_columns(source, dest, slice(0, length), slice(0, length))
    dest.valid[:, :length] = source.valid[:, :length]
    dest.next_position.copy_(source.next_position)
    dest.has_padding, dest.length = source.has_padding, length


def append_column(source: KVCache, dest: KVCache, column: int, rows: Sequence[bool]) -> None:
    """Append one column to ``dest``: ``source``'s keys and values of ``column`` for the rows
    where ``rows`` is True (a real token at the next position), padding for the others (masked,
    its position not counted). ``share_kv``'s copy of a verified proposal into a self-draft's
    cache; the caches' layouts are the same (:func:`copy_prompt_kv` checked it)."""
    at = dest.length
    if at + 1 > dest.max_len:
        raise RuntimeError(f"speculative decoding: the draft's KV cache of {dest.max_len} columns is full")
    _copy_columns(source, dest, column, at)
    taken = torch.tensor(list(rows), dtype=torch.bool, device=dest.device)
    dest.valid[:, at] = taken
    dest.next_position += taken.long()
    dest.has_padding = dest.has_padding or not bool(taken.all())
    dest.length = at + 1


def keep_columns(cache: KVCache, start: int, kept: Sequence[int]) -> None:
    """After a forward that appended columns from ``start`` on: keep ``kept[r]`` of them for row
    ``r``. The cache keeps ``max(kept)`` columns (the rest roll back); a row that keeps fewer has
    its other kept columns marked as padding (attention skips them, its positions do not count
    them), so every row continues as if only its kept columns had been fed."""
    longest = max(kept)
    rollback_cache(cache, start + longest)
    for row, count in enumerate(kept):
        if count < longest:
            cache.valid[row, start + count : start + longest] = False
            cache.next_position[row] -= longest - count
            cache.has_padding = True


def compact_cache(cache: KVCache) -> None:
    """Pack each row's real columns to the right end of the first ``max`` real-column count
    columns, in order (left padding, as a left-padded prompt has): frees the columns of the
    padding :func:`keep_columns` left. Copies every stored key and value (in place: decode plans
    keep pointing at the same storage)."""
    if cache.windows:
        raise ValueError("cannot compact a sliding-window (ring) KV cache")
    length = cache.length
    valid = cache.valid[:, :length]  # (B, L)
    counts = valid.sum(dim=1)  # (B,)
    longest = int(counts.max())
    index = torch.zeros(cache.batch_size, longest, dtype=torch.long, device=cache.device)  # (B, longest)
    packed = torch.zeros(cache.batch_size, longest, dtype=torch.bool, device=cache.device)
    for row in range(cache.batch_size):
        columns = valid[row].nonzero().flatten()
        index[row, longest - columns.numel() :] = columns
        packed[row, longest - columns.numel() :] = True
    for store in cache.layers:
        if store is None:
            continue
        for buffer in store._tensors():  # (B, Hkv, slots, D) keys, values (and int8 scales)
            gather = index[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[3])
            buffer.narrow(2, 0, longest).copy_(buffer.narrow(2, 0, length).gather(2, gather))
    cache.valid[:, :length] = False
    cache.valid[:, :longest] = packed
    cache.length = longest
    cache.has_padding = True


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
        best = target_logits[: len(proposals) + 1].argmax(dim=-1).tolist()  # one call, not one per row
        for index, proposal in enumerate(proposals):
            if best[index] != proposal:
                return index, best[index]
        return len(proposals), best[len(proposals)]
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
    share_kv: bool = False,
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
        share_kv: the draft takes the target's K/V where the target has them and the draft
            does not (QSpec, Zhao et al. 2024, shares the cache between its low- and
            high-precision passes): it starts from a copy of the target's K/V of the prompt
            (:func:`copy_prompt_kv`) instead of reading the prompt, and after a round whose
            proposals were all accepted, the last proposal's K/V (which the draft proposed but
            never fed) come from the verification, so the draft's catch-up is one step, not a
            chunk of two. For a self-draft (:func:`self_draft`: the target's own weights
            compressed, the target's cache layout); outputs stay the target's, only acceptance can
            change. Needs caches of the same layout (else ValueError).

    Returns:
        The tokens and the acceptance statistics.
    """
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("speculative_generate needs a non-empty prompt")
    return speculative_generate_batch(
        target, draft, [prompt], max_new_tokens, k=k, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_tokens=stop_tokens, seed=seed, generator=generator, matchers=None if matcher is None else [matcher],
        table_size=table_size, share_kv=share_kv,
    )[0]


@torch.no_grad()
def speculative_generate_batch(
    target: nn.Module,
    draft: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    k: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: int | Iterable[int] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
    matchers: Sequence[Any] | None = None,
    table_size: int | None = None,
    pad_token_id: int = 0,
    share_kv: bool = False,
) -> list[SpeculativeResult]:
    """:func:`speculative_generate` over a batch of prompts (any lengths, left-padded): one draft
    step and one target forward per round serve every row; each row accepts its own number of
    proposals (per-row cache lengths, the module docstring, step 4), and greedy output equals
    plain greedy decoding row by row. ``matchers``: one grammar matcher (or None) per row;
    ``share_kv`` as in :func:`speculative_generate`. Returns one :class:`SpeculativeResult`
    per prompt."""
    _check_sampling(temperature, top_k, top_p)
    if k < 1:
        raise ValueError(f"k (proposals per round) must be >= 1, got {k}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab = target.config.vocab_size
    if draft.config.vocab_size != vocab:
        raise ValueError(f"draft vocab_size {draft.config.vocab_size} != target vocab_size {vocab}")
    prompts = [[int(t) for t in prompt] for prompt in prompts]
    if not prompts or any(not prompt for prompt in prompts):
        raise ValueError("speculative decoding needs non-empty prompts (at least one)")
    for row, prompt in enumerate(prompts):
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt {row} has token ids outside the vocabulary [0, {vocab})")
    batch = len(prompts)
    matchers = list(matchers) if matchers is not None else [None] * batch
    if len(matchers) != batch:
        raise ValueError(f"{len(matchers)} matchers for {batch} prompts")
    context = min(target.config.max_seq_len, draft.config.max_seq_len)
    longest = max(len(prompt) for prompt in prompts)
    if longest + max_new_tokens > context:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the context "
                         f"of {context} tokens")
    stop = {stop_tokens} if isinstance(stop_tokens, int) else set(stop_tokens)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    results = [SpeculativeResult([]) for _ in prompts]
    if max_new_tokens == 0:
        return results
    modes = [(m, m.training) for m in (target, draft) if m.training]  # eval() walks every module: only if needed
    for model, _ in modes:
        model.eval()
    try:
        _Speculation(target, draft, prompts, max_new_tokens, k, temperature, top_k, top_p, stop, generator,
                     matchers, table_size or vocab, pad_token_id, context, results, share_kv).run()
    finally:
        for model, mode in modes:
            model.train(mode)
    return results


class _Speculation:
    """The rounds of :func:`speculative_generate_batch` (arguments checked)."""

    def __init__(self, target, draft, prompts, max_new_tokens, k, temperature, top_k, top_p, stop, generator,
                 matchers, table_size, pad_token_id, context, results, share_kv=False):
        self.target, self.draft, self.k, self.max_new = target, draft, k, max_new_tokens
        self.share_kv = share_kv
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.greedy = temperature == 0.0
        self.stop, self.matchers, self.results = stop, matchers, results
        self.vocab, self.table_size = target.config.vocab_size, table_size
        self.bitmask = torch.full((1, (table_size + 31) // 32), -1, dtype=torch.int32) \
            if any(m is not None for m in matchers) else None
        batch = len(prompts)
        ids, mask = left_pad(prompts, pad_token_id)
        # one row: nothing is ever padding, the caches need the prompt, the tokens and one round;
        # several rows keep rejected columns as padding until compact_cache packs them
        room = (max_new_tokens + k + 1) if batch == 1 else (max_new_tokens + 1) * (k + 1)
        self.target_cache = target.new_cache(batch, min(ids.shape[1] + room, target.config.max_seq_len))
        self.draft_cache = draft.new_cache(batch, min(ids.shape[1] + room, draft.config.max_seq_len))
        attention_mask = None if bool(mask.bool().all()) else mask
        for cache in (self.target_cache, self.draft_cache):
            rollback_cache(cache, cache.length)  # refuses ring caches before any work
        self.first_logits, self.target_plan = prefill_and_plan(target, self.target_cache, ids,
                                                               attention_mask=attention_mask)  # (B, V)
        draft_work = ids.numel() * sum(p.numel() for p in draft.parameters())
        self.draft_plan = build_plan(draft, self.draft_cache)  # rebuilt below once the cache has columns
        if share_kv:  # a self-draft: the target's K/V of the prompt, copied
            copy_prompt_kv(self.target_cache, self.draft_cache)
        elif attention_mask is None and batch == 1 and (
                draft_work <= _NATIVE_PROMPT_WORK
                or (self.draft_plan.packed and ids.numel() <= PACKED_NATIVE_PROMPT_TOKENS)):
            # the draft's prompt in one native chunk (its logits are not used; only its K/V, which
            # equal step-by-step decoding's): cheaper than the module path for a small draft, and
            # for a packed one, whose module path dequantizes every matrix
            self.draft_plan.chunk(ids)
        else:
            prefill(draft, self.draft_cache, ids, attention_mask=attention_mask)
        if attention_mask is not None:  # the cache's padding matters to the plan
            self.draft_plan = build_plan(draft, self.draft_cache)
        self.active = [True] * batch
        self.context = context

    # ------------------------------------------------------------------ helpers
    def _allowed(self, matcher: Any) -> torch.Tensor | None:
        return None if matcher is None else _allowed(matcher, self.bitmask, self.vocab, self.table_size)

    def _choose(self, logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:  # (B, V)
        if self.greedy:
            return logits.argmax(dim=-1).tolist(), None
        probs = sampling_probs(logits, self.temperature, self.top_k, self.top_p)  # (B, V)
        return torch.multinomial(probs, 1, generator=self.generator).flatten().tolist(), probs

    def _commit(self, row: int, token: int) -> bool:
        """Append ``token`` to row ``row``; True when the row has ended (stop, limit, grammar)."""
        result, matcher = self.results[row], self.matchers[row]
        if token in self.stop or len(result.tokens) >= self.max_new:
            return True
        result.tokens.append(token)
        if matcher is not None and (_advance(matcher, token) or matcher.is_stopped()):
            return True
        return len(result.tokens) >= self.max_new

    def _room(self, cache: KVCache, need: int) -> None:
        """Make ``need`` free columns in ``cache`` (packing padded rows when full)."""
        if cache.length + need > cache.max_len and cache.has_padding:
            compact_cache(cache)
        if cache.length + need > cache.max_len:
            raise RuntimeError(f"speculative decoding: a KV cache of {cache.max_len} columns is full")

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        if len(self.results) == 1 and self.greedy and self.bitmask is None:
            return self._run_greedy_row()
        batch = len(self.results)
        logits = self.first_logits
        masked = [ _masked(logits[row], self._allowed(self.matchers[row])) for row in range(batch)] \
            if self.bitmask is not None else None
        first, _ = self._choose(torch.stack(masked) if masked is not None else logits)
        for row, token in enumerate(first):
            self.active[row] = not self._commit(row, token)
        pending = first  # per row: committed, not yet in the target's cache
        catch_up = [[token] for token in first]  # per row: committed, not yet in the draft's cache
        while any(self.active):
            remaining = max(self.max_new - len(r.tokens) for r, a in zip(self.results, self.active) if a)
            self._room(self.target_cache, 1 + min(self.k, remaining))
            room = min(self.k, remaining, self.target_cache.max_len - self.target_cache.length - 1)
            proposals, draft_probs, counts, masks = self._draft(catch_up, room)
            # the target verifies [pending, proposals] of every row in one forward
            start = self.target_cache.length
            tokens = torch.tensor([[p] + props for p, props in zip(pending, proposals)])  # (B, 1 + m)
            logits = self.target_plan.chunk(tokens)  # (B, 1 + m, V)
            kept, catch_up, drafted = [], [], max(room - 1, 0)
            for row in range(batch):
                if not self.active[row]:  # an ended row rides along; its columns do not matter
                    kept.append(1)
                    catch_up.append([pending[row]])
                    continue
                count = counts[row]
                row_logits = logits[row, : count + 1]
                if masks[row] is not None:
                    row_logits = torch.stack([_masked(line, mask) for line, mask in zip(row_logits, masks[row])])
                row_probs = None if draft_probs is None else [probs[row] for probs in draft_probs[:count]]
                accepted, correction = accept_proposals(row_logits, proposals[row][:count], row_probs,
                                                        self.temperature, self.top_k, self.top_p, self.generator)
                kept.append(1 + accepted)  # pending + the accepted proposals
                draft_kept = min(accepted, drafted)  # the draft has fed proposals[:drafted]
                catch_up.append(proposals[row][draft_kept:accepted] + [correction])
                pending[row] = correction
                result = self.results[row]
                result.rounds += 1
                result.proposed += count
                result.accepted += accepted
                result.per_round.append(accepted)
                for token in proposals[row][:accepted] + [correction]:
                    if self._commit(row, token):
                        self.active[row] = False
                        break
            keep_columns(self.target_cache, start, kept)
            keep_columns(self.draft_cache, self._draft_start, [self._draft_fed + min(n - 1, drafted) for n in kept])
            if self.share_kv and any(n - 1 > drafted for n in kept):  # the verified last proposals' K/V
                last = [n - 1 > drafted for n in kept]
                self._room(self.draft_cache, 1)
                append_column(self.target_cache, self.draft_cache, start + 1 + drafted, last)
                catch_up = [tokens[1:] if take else tokens for tokens, take in zip(catch_up, last)]

    def _run_greedy_row(self) -> None:
        """The rounds for one row, greedy, without a grammar: the same steps as :meth:`run` with
        the per-round bookkeeping cut to what one row needs (Python lists instead of per-row
        tensors, no padding or packing: the caches were sized for the prompt, the tokens and one
        round). On a model whose decode step is a fraction of a millisecond this bookkeeping is
        what a round costs beyond its kernel calls, so it bounds the speed-up."""
        result, stop, max_new, k, share_kv = self.results[0], self.stop, self.max_new, self.k, self.share_kv
        tokens, per_round = result.tokens, result.per_round
        target_cache, draft_cache = self.target_cache, self.draft_cache
        target_chunk, draft_step, draft_chunk = self.target_plan.chunk, self.draft_plan.step, self.draft_plan.chunk
        first = int(self.first_logits[0].argmax())
        if first in stop:
            return
        tokens.append(first)
        pending, catch_up = first, [first]  # committed: not yet in the target's / the draft's cache
        while len(tokens) < max_new:
            room = min(k, max_new - len(tokens), target_cache.max_len - target_cache.length - 1)
            draft_start = draft_cache.length
            if len(catch_up) == 1:
                logits = draft_step(torch.tensor(catch_up))  # (1, V)
            else:
                logits = draft_chunk(torch.tensor([catch_up]))[:, -1]  # (1, V)
            proposals: list[int] = []
            for index in range(room):
                token = int(logits.argmax())
                proposals.append(token)
                if token in stop:  # the proposals end at a stop token
                    break
                if index < room - 1:
                    logits = draft_step(torch.tensor([token]))
            drafted = len(proposals) - 1  # proposals the draft has fed (not its last one)
            start = target_cache.length
            best = target_chunk(torch.tensor([[pending] + proposals]))[0].argmax(dim=-1).tolist()  # (1 + m,)
            accepted = 0
            while accepted < len(proposals) and best[accepted] == proposals[accepted]:
                accepted += 1
            correction = best[accepted]
            result.rounds += 1
            result.proposed += len(proposals)
            result.accepted += accepted
            per_round.append(accepted)
            rollback_cache(target_cache, start + 1 + accepted)
            rollback_cache(draft_cache, draft_start + len(catch_up) + min(accepted, drafted))
            catch_up = proposals[min(accepted, drafted) : accepted] + [correction]
            if share_kv and accepted > drafted:  # the last proposal's K/V from the verification
                append_column(target_cache, draft_cache, start + 1 + drafted, [True])
                catch_up = catch_up[1:]
            pending = correction
            for token in proposals[:accepted] + [correction]:
                if token in stop or len(tokens) >= max_new:
                    return
                tokens.append(token)

    def _draft(self, catch_up: list[list[int]], room: int):
        """Catch the draft up (one chunk, left-padded per row) and propose ``room`` tokens per row.
        Returns the proposals (B lists of room), the draft's distributions (room x (B, V), sampling),
        each row's proposal count before a stop / complete grammar, and each row's target masks."""
        batch = len(catch_up)
        cache = self.draft_cache
        width = max(len(tokens) for tokens in catch_up)
        self._room(cache, width + max(room - 1, 0))
        self._draft_start, self._draft_fed = cache.length, width
        ids = torch.tensor([[0] * (width - len(t)) + t for t in catch_up])  # (B, width)
        if any(len(t) < width for t in catch_up):
            mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in catch_up])
            logits = self.draft_plan.chunk(ids, mask)[:, -1]  # (B, V)
        elif width == 1:
            logits = self.draft_plan.step(ids[:, 0])
        else:
            logits = self.draft_plan.chunk(ids)[:, -1]
        forks = [None if m is None or not active else m.fork() for m, active in zip(self.matchers, self.active)]
        masks: list[list | None] = [None if f is None else [] for f in forks]
        proposals: list[list[int]] = [[] for _ in range(batch)]
        counts = [room] * batch
        draft_probs: list[torch.Tensor] | None = None if self.greedy else []
        for index in range(room):
            if self.bitmask is not None:
                rows = []
                for row in range(batch):
                    allowed = self._allowed(forks[row]) if forks[row] is not None and counts[row] > index else None
                    if masks[row] is not None and counts[row] > index:
                        masks[row].append(allowed)
                    rows.append(_masked(logits[row], allowed))
                logits = torch.stack(rows)
            chosen, probs = self._choose(logits)
            if draft_probs is not None:
                draft_probs.append(probs)
            for row, token in enumerate(chosen):
                proposals[row].append(token)
                if counts[row] > index and (token in self.stop or (forks[row] is not None and (
                        _advance(forks[row], token) or forks[row].is_stopped()))):
                    counts[row] = index + 1  # the row's proposals end here
            if index < room - 1:
                logits = self.draft_plan.step(torch.tensor(chosen))
        for row in range(batch):  # the mask after the row's last proposal (its bonus position)
            if masks[row] is not None:
                last = proposals[row][counts[row] - 1] if counts[row] else None
                fork = forks[row]
                masks[row] = masks[row][: counts[row]] + [
                    self._allowed(fork) if not fork.is_stopped() and last not in self.stop else None]
        return proposals, draft_probs, counts, masks


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


def self_draft(target: nn.Module, bits: int = 8, *, act_dtype: str = "int8", cache: str | None = None,
               progress: bool = False) -> nn.Module:
    """A self-draft: ``target``'s own weights palettized to ``bits`` (every linear and the token
    embedding, a LUT per 16 rows: :func:`mmafm.compress.compress_model`) decoding with
    ``act_dtype`` activations (:func:`mmafm.compress.set_act_dtype`; ``"int8"``: ``csrc/q8.c``).
    At 8 bits it reads a quarter of a float32 target's bytes and agrees with it on most greedy
    tokens (SmolLM2-135M: 0.97 teacher-forced on the float path; docs/guided_generation.md), and
    its cache has the target's layout, so :func:`speculative_generate` can start it from the
    target's K/V of the prompt (``share_kv=True``). ``cache``: a checkpoint path (without
    suffix) to load the draft from, or to save it to the first time (compressing SmolLM2 takes
    minutes). The target is not changed."""
    import copy
    import json
    from pathlib import Path

    from mmafm.checkpoint import load_model
    from mmafm.compress import compress_model, save_compressed, set_act_dtype

    if bits not in (2, 4, 8):
        raise ValueError(f"self_draft: bits must be 2, 4 or 8, got {bits}")
    path = None if cache is None else Path(cache)
    if path is not None and path.with_suffix(".json").is_file():
        saved = json.loads(path.with_suffix(".json").read_text()).get("self_draft_bits")
        if saved != bits:
            raise ValueError(f"self_draft: {path} holds a {saved}-bit draft (or no self_draft record), not {bits}-bit; "
                             "pass another cache path")
        draft = load_model(path).eval()
    else:
        draft = copy.deepcopy(target).eval()
        compress_model(draft, bits=bits, embedding_bits=8 if bits == 8 else 4, progress=progress)
        if path is not None:
            save_compressed(path, draft, {"self_draft_bits": bits})
    set_act_dtype(draft, act_dtype)
    return draft


def expected_tokens_per_round(acceptance: float, k: int) -> float:
    """Tokens one round yields when each proposal is accepted independently with probability
    ``acceptance``: ``(1 - a^(k + 1)) / (1 - a)`` (Leviathan et al. 2023, eq. 1)."""
    if not 0.0 <= acceptance <= 1.0 or k < 1:
        raise ValueError(f"need 0 <= acceptance <= 1 and k >= 1, got {acceptance}, {k}")
    return float(k + 1) if acceptance == 1.0 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


def acceptance_by_k(target: nn.Module, draft: nn.Module, prompts: Sequence[Sequence[int]], steps: int,
                    ks: Sequence[int], stop_tokens: int | Iterable[int] = ()) -> dict[int, float]:
    """Greedy acceptance rate (accepted / proposed over all ``prompts``) of ``draft`` for each
    ``k``; checks every output against plain greedy decoding of the target (RuntimeError if one
    differs)."""
    from mmafm.inference.generate import generate

    plain = [generate(target, [prompt], steps, stop_tokens=stop_tokens)[0] for prompt in prompts]
    rates = {}
    for k in ks:
        accepted = proposed = 0
        for prompt, want in zip(prompts, plain):
            result = speculative_generate(target, draft, prompt, steps, k=k, stop_tokens=stop_tokens)
            if result.tokens != want:
                raise RuntimeError(f"speculative greedy differs from plain greedy (k={k}, prompt {prompt[:8]}...)")
            accepted, proposed = accepted + result.accepted, proposed + result.proposed
        rates[int(k)] = accepted / max(proposed, 1)
    return rates


def speculative_speedup(target: nn.Module, draft: nn.Module, prompts: Sequence[Sequence[int]], steps: int, k: int,
                        repeats: int = 3, share_kv: bool = False) -> dict[str, float]:
    """Speed of greedy speculative decoding against plain greedy decoding of ``target``, measured
    interleaved (per prompt: plain, then speculative; one warm-up round first), ``repeats`` rounds
    over all ``prompts``; the speed-up is the median over rounds of (plain seconds / speculative
    seconds), by wall clock and by this process's CPU time (on a shared machine the CPU time is
    what the load disturbs less when one thread runs). Prefill is included in both. Outputs are
    checked equal (RuntimeError otherwise). ``share_kv``: as in :func:`speculative_generate`."""
    import statistics
    import time

    from mmafm.inference.generate import generate

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    wall: dict[str, list[float]] = {"plain": [], "speculative": []}
    cpu: dict[str, list[float]] = {"plain": [], "speculative": []}
    accepted = proposed = 0
    for repeat in range(repeats + 1):
        totals = {name: [0.0, 0.0] for name in wall}
        for prompt in prompts:
            w0, c0 = time.perf_counter(), time.process_time()
            plain = generate(target, [prompt], steps)[0]
            w1, c1 = time.perf_counter(), time.process_time()
            result = speculative_generate(target, draft, prompt, steps, k=k, share_kv=share_kv)
            w2, c2 = time.perf_counter(), time.process_time()
            if result.tokens != plain:
                raise RuntimeError(f"speculative greedy differs from plain greedy (k={k})")
            totals["plain"][0] += w1 - w0
            totals["plain"][1] += c1 - c0
            totals["speculative"][0] += w2 - w1
            totals["speculative"][1] += c2 - c1
            if repeat:
                accepted, proposed = accepted + result.accepted, proposed + result.proposed
        if repeat:  # round 0 warms up (kernels built, caches allocated)
            for name, (seconds, cpu_seconds) in totals.items():
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
    tokens = steps * len(prompts)
    return {
        "k": k, "steps": steps, "prompts": len(prompts), "repeats": repeats, "share_kv": share_kv,
        "acceptance": accepted / max(proposed, 1),
        "speedup": statistics.median(p / s for p, s in zip(wall["plain"], wall["speculative"])),
        "speedup_cpu": statistics.median(p / max(s, 1e-9) for p, s in zip(cpu["plain"], cpu["speculative"])),
        "plain_tok_s": tokens / statistics.median(wall["plain"]),
        "speculative_tok_s": tokens / statistics.median(wall["speculative"]),
    }
