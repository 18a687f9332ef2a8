"""Generation with a KV cache: the one decode loop of every mmafm decoder, text or multimodal.

:func:`decode` prefills a prompt given as token ids or as input embeddings (a multimodal model
passes the embeddings with its image tokens spliced in), then decodes one token per step through
a :class:`~mmafm.inference.plan.DecodePlan` built for the call. Around it:

- :func:`generate`: token-id prompts of any lengths, left-padded into one batch
  (:func:`left_pad`); positions count real tokens only and padding keys are masked, so each row
  generates what it would alone;
- :func:`sample_next_token`: greedy (``temperature=0``), temperature, top-k and top-p (nucleus),
  combinable, seeded through a ``torch.Generator``;
- stop semantics: a row ends at its first stop token, which is not part of its output, or after
  ``max_new_tokens``; the loop ends when every row has;
- a :class:`Constraint` hook (guided generation, :mod:`mmafm.inference.guided`): before each
  choice it masks the logits of every row, after it is told each row's token and may end the row;
- :func:`decode_steps`, the loop itself as an iterator (one :class:`Step` per decode step, for
  streaming); :func:`decode` collects it;
- :func:`generate_text` on strings, :func:`decode_tokens_per_second` to time decoding.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Iterable, Iterator, NamedTuple, Protocol, Sequence

import torch
from torch import nn

from mmafm.inference.kernels import kernel_linears
from mmafm.inference.plan import build_plan, module_logits
from mmafm.layers.kv_cache import KVCache

__all__ = [
    "Decoded",
    "Step",
    "Constraint",
    "decode",
    "decode_steps",
    "sampling_probs",
    "prefill",
    "generate",
    "generate_text",
    "decode_tokens_per_second",
    "sample_next_token",
    "left_pad",
]


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into ``(input_ids (B, T), attention_mask (B, T))``; 0 marks padding."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, longest - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long, device=device)
            mask[row, longest - len(prompt) :] = 1
    return ids, mask


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def sampling_probs(
    logits: torch.Tensor,  # (..., V)
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:  # (..., V) float32
    """The distribution :func:`sample_next_token` samples from (``temperature > 0``): softmax of the
    temperature-scaled logits restricted to the ``top_k`` most likely tokens and to the smallest set
    whose probability reaches ``top_p`` (the most likely token is always kept). Speculative decoding
    compares the draft's and the target's distributions through it."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        raise ValueError("sampling_probs needs temperature > 0 (greedy decoding takes the argmax)")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p  # the first token has mass_before 0: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample_next_token(
    logits: torch.Tensor,  # (B, V)
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B,) long
    """Pick one token per row: argmax when ``temperature == 0``, else sample from the
    temperature-scaled distribution restricted to the ``top_k`` most likely tokens and to the
    smallest set whose probability reaches ``top_p`` (the most likely token is always kept)."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return logits.float().argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(
    model: nn.Module,
    cache: KVCache,
    input_ids: torch.Tensor | None = None,  # (B, T)
    *,
    inputs_embeds: torch.Tensor | None = None,  # (B, T, dim)
    attention_mask: torch.Tensor | None = None,  # (B, T), 0 = (left) padding
) -> torch.Tensor:  # (B, V) float32
    """Run the prompt into ``cache`` and return the logits of its last position: the model's
    modules, with every ``F.linear`` through the kernels' dispatch (oneDNN for prefill-sized
    inputs, see :func:`~mmafm.inference.kernels.kernel_linears`)."""
    with kernel_linears():
        return module_logits(model, input_ids, cache, attention_mask, inputs_embeds)


# Prompts of at most this many tokens (all rows together: token ids, no padding) go through the
# decode plan's native chunk (one C call) instead of the modules, when the plan runs the whole model
# natively. Measured at 1 thread on 2026-11-30 (process CPU ms, modules against the chunk): a
# deep-narrow 13M model (dim 256, 16 layers) 27.4 / 14.7 at 16 tokens, 35.4 / 26.8 at 32, 46.2 /
# 48.8 at 64; a random 25M one (dim 512, 8 layers) 34.3 / 21.9 at 16, 43.0 / 41.8 at 32, 54.3 / 74.8
# at 64; the 0.59M tiny model 4.2 / 1.8 at 16, 4.8 / 2.8 at 32, 7.0 / 9.8 at 128: the modules pay a
# fixed cost per torch op, the chunk computes at GEMV speed, so it wins on short prompts only
NATIVE_PROMPT_TOKENS = 32
# The same for a plan over packed weights (mmafm.compress; PackedDecodeStep.chunk, 8 tokens per
# native call), whose module path dequantizes every matrix on every call. Measured at 1 thread on
# 2026-12-01, SmolLM2-135M, process CPU s, modules / chunk: 8-bit int8-activation 0.50 / 0.16 at 36
# tokens, 0.71 / 0.58 at 128, 1.04 / 1.21 at 256; 4-bit float path 0.50 / 0.24 at 36, 0.72 / 1.00 at 128
PACKED_NATIVE_PROMPT_TOKENS = 64


def prefill_and_plan(
    model: nn.Module,
    cache: KVCache,
    input_ids: torch.Tensor | None = None,  # (B, T)
    *,
    inputs_embeds: torch.Tensor | None = None,  # (B, T, dim)
    attention_mask: torch.Tensor | None = None,  # (B, T), 0 = (left) padding
) -> tuple[torch.Tensor, Any]:  # (B, V) float32 logits of the last position, the DecodePlan
    """:func:`prefill`, then the decode plan (:func:`~mmafm.inference.plan.build_plan`) for the
    steps after it; a prompt of at most :data:`NATIVE_PROMPT_TOKENS` token ids without padding
    (:data:`PACKED_NATIVE_PROMPT_TOKENS` for a packed model) is read by the plan's native chunk
    instead, when the plan runs the whole model natively and no layer keeps a sliding-window ring
    (the same K/V and logits to float32 rounding)."""
    if (input_ids is not None and inputs_embeds is None and attention_mask is None and not cache.windows
            and 0 < input_ids.numel() <= max(NATIVE_PROMPT_TOKENS, PACKED_NATIVE_PROMPT_TOKENS)):
        plan = build_plan(model, cache)  # no padding: the prompt changes nothing the plan decides on
        limit = PACKED_NATIVE_PROMPT_TOKENS if plan.packed else NATIVE_PROMPT_TOKENS
        if plan.whole_step and input_ids.numel() <= limit:  # the chunk kernel takes linear caches only
            return plan.chunk(input_ids)[:, -1], plan  # (B, V)
        return prefill(model, cache, input_ids), plan
    logits = prefill(model, cache, input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    return logits, build_plan(model, cache)


class Decoded(NamedTuple):
    """What :func:`decode` returns."""

    tokens: list[list[int]]  # per row, the generated tokens; a stop token ends a row and is not included
    logits: torch.Tensor | None  # (B, steps, V) float32: what each step's token was chosen from, if asked


class Step(NamedTuple):
    """One step of :func:`decode_steps`."""

    tokens: list[int | None]  # per row, the token appended this step; None: the row has ended (or ends now)
    logits: torch.Tensor  # (B, V) float32: what the tokens were chosen from (after the constraint's mask)


class Constraint(Protocol):
    """A restriction of each row's next token, consulted by the decode loop (guided generation).

    The loop calls :meth:`mask_logits` on every step's logits before choosing, then :meth:`accept`
    once per still-running row with the token it chose (stop tokens excluded). A constraint keeps
    one state per row; rows are those of the prompt batch.
    """

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B, V)
        """The logits with every token the row's state forbids set to ``-inf``."""
        ...

    def accept(self, row: int, token: int) -> bool:
        """Advance row ``row`` by ``token``; True when the row is complete and must end."""
        ...


def _check_decode_args(prompt: torch.Tensor, context: int, max_new_tokens: int, temperature: float,
                       top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p)  # also when greedy: a bad setting is a mistake
    length = prompt.shape[1]
    if length > context:
        raise ValueError(f"prompt of {length} tokens is longer than the model's context (max_seq_len={context})")
    if length + max_new_tokens > context:
        raise ValueError(
            f"prompt of {length} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
            f"(max_seq_len={context}); lower max_new_tokens to <= {context - length}"
        )


@torch.no_grad()
def decode(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: int | Iterable[int] = (),
    generator: torch.Generator | None = None,
    cache_dtype: torch.dtype | str | None = None,
    quantized_cache: bool = False,
    keep_logits: bool = False,
    constraint: Constraint | None = None,
) -> Decoded:
    """The decode loop: prefill the prompt, then choose and feed one token per row and step.

    Args:
        model: a decoder with ``config`` (``vocab_size``, ``max_seq_len``), ``new_cache`` and
            ``forward(ids or inputs_embeds=, cache=, attention_mask=)``.
        input_ids: (B, T) prompt token ids, left-padded where ``attention_mask`` says so.
        inputs_embeds: (B, T, dim) prompt embeddings instead of ``input_ids``.
        attention_mask: (B, T), 1 = real token, 0 = left padding; None = all real.
        max_new_tokens: most tokens generated per row.
        temperature, top_k, top_p: sampling controls, see :func:`sample_next_token`.
        stop_tokens: a row ends at the first of these (which is not returned).
        generator: randomness for sampling.
        cache_dtype: KV-cache dtype (default: the model's).
        quantized_cache: int8 KV cache.
        keep_logits: also return each step's logits.
        constraint: masks each step's logits and may end a row (see :class:`Constraint`).

    Returns:
        The tokens of each row, and with ``keep_logits`` the logits (B, steps run, V).
    """
    prompt = input_ids if input_ids is not None else inputs_embeds
    outputs: list[list[int]] = [[] for _ in range(0 if prompt is None else prompt.shape[0])]
    kept: list[torch.Tensor] = []
    for step in decode_steps(
        model, input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_tokens=stop_tokens, generator=generator, cache_dtype=cache_dtype,
        quantized_cache=quantized_cache, constraint=constraint,
    ):
        if keep_logits:
            kept.append(step.logits)
        for row, token in enumerate(step.tokens):
            if token is not None:
                outputs[row].append(token)
    return Decoded(outputs, torch.stack(kept, dim=1) if keep_logits and kept else None)


def decode_steps(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: int | Iterable[int] = (),
    generator: torch.Generator | None = None,
    cache_dtype: torch.dtype | str | None = None,
    quantized_cache: bool = False,
    constraint: Constraint | None = None,
) -> Iterator[Step]:
    """:func:`decode` as an iterator: one :class:`Step` per decode step, as soon as it is chosen
    (the arguments are :func:`decode`'s). The arguments are checked when it is called; the model
    runs as the iterator is consumed (and is left in its original train/eval mode when it ends or
    is closed)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, dim)")
    prompt = input_ids if input_ids is not None else inputs_embeds
    _check_decode_args(prompt, model.config.max_seq_len, max_new_tokens, temperature, top_k, top_p)
    if attention_mask is not None and bool(attention_mask.bool().all()):
        attention_mask = None  # no padding: no mask arithmetic
    stop = {stop_tokens} if isinstance(stop_tokens, int) else set(stop_tokens)
    return _decode_loop(model, input_ids, inputs_embeds, attention_mask, max_new_tokens, temperature, top_k,
                        top_p, stop, generator, cache_dtype, quantized_cache, constraint)


def _decode_loop(model, input_ids, inputs_embeds, attention_mask, max_new_tokens, temperature, top_k, top_p,
                 stop, generator, cache_dtype, quantized_cache, constraint) -> Iterator[Step]:
    """The loop of :func:`decode_steps` (arguments already checked)."""
    if max_new_tokens == 0:
        return
    prompt = input_ids if input_ids is not None else inputs_embeds
    batch, length = prompt.shape[:2]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = model.new_cache(batch, length + max_new_tokens, dtype=cache_dtype, quantized=quantized_cache)
            # the plan once per call: from the modules as they are now
            logits, plan = prefill_and_plan(model, cache, input_ids, inputs_embeds=inputs_embeds,
                                            attention_mask=attention_mask)
        finished = [False] * batch
        greedy = temperature == 0.0
        for step in range(max_new_tokens):
            if constraint is not None:
                logits = constraint.mask_logits(logits)  # (B, V)
            if greedy:  # argmax needs no float copy, scaling or filtering
                next_tokens = logits.argmax(dim=-1)  # (B,)
            else:
                next_tokens = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            chosen: list[int | None] = []
            for row, token in enumerate(next_tokens.tolist()):
                if finished[row] or token in stop:
                    finished[row] = True
                    chosen.append(None)
                    continue
                chosen.append(token)
                if constraint is not None and constraint.accept(row, token):
                    finished[row] = True
            yield Step(chosen, logits)
            if all(finished) or step == max_new_tokens - 1:
                break
            with torch.no_grad():
                logits = plan.step(next_tokens)  # (B, V)
    finally:
        model.train(was_training)


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim != 2:
            raise ValueError(f"a prompt tensor must be (batch, seq_len), got shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {row} is empty; every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {row} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    return prompts


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: int | Iterable[int] = (),
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    cache_dtype: torch.dtype | str | None = None,
    quantized_cache: bool = False,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens (:func:`decode` on token ids).

    Args:
        model: a decoder with ``new_cache`` and ``forward(ids, cache=, attention_mask=)``.
        prompts: token-id lists (any lengths) or a (B, T) tensor of equal-length prompts.
        max_new_tokens: most tokens generated per prompt.
        temperature, top_k, top_p: sampling controls, see :func:`sample_next_token`.
        stop_tokens: a row ends at the first of these (which is not returned).
        pad_token_id: id used for left padding (masked out, so any valid id works).
        generator, seed: randomness for sampling (``seed`` builds a generator).
        cache_dtype: KV-cache dtype (default: the model's).
        quantized_cache: int8 KV cache.

    Returns:
        The generated tokens of each prompt (prompt excluded).
    """
    prompts = _check_prompts(prompts, model.config.vocab_size)
    device = next(model.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids, mask = left_pad(prompts, pad_token_id, device)
    return decode(
        model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, stop_tokens=stop_tokens, generator=generator, cache_dtype=cache_dtype,
        quantized_cache=quantized_cache,
    ).tokens


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    bos: bool = False,
) -> list[dict]:
    """:func:`generate` on text: encode ``prompts`` with ``tokenizer`` (a leading BOS with ``bos``),
    stop at its EOS, pad with its pad id, decode. Returns ``{"prompt", "completion", "tokens"}``
    per prompt (``tokens``: how many were generated)."""
    ids = [tokenizer.encode(prompt, bos=bos) for prompt in prompts]
    completions = generate(
        model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_tokens=[tokenizer.eos_id], pad_token_id=tokenizer.pad_id, seed=seed,
    )
    return [
        {"prompt": prompt, "completion": tokenizer.decode(tokens), "tokens": len(tokens)}
        for prompt, tokens in zip(prompts, completions)
    ]


def decode_tokens_per_second(
    model: nn.Module, prompt_len: int = 64, new_tokens: int = 32, batch_size: int = 1, repeats: int = 3,
    seed: int = 0,
) -> float:
    """Greedy decode speed of ``model`` in tokens per second per row: the median time of
    :func:`generate` for ``new_tokens + 1`` tokens minus that for 1 token (so the prefill is not
    counted), over ``repeats`` runs after one warm-up, on random prompts of ``prompt_len`` tokens."""
    if prompt_len < 1 or new_tokens < 1 or repeats < 1:
        raise ValueError(f"prompt_len, new_tokens and repeats must be >= 1, got {prompt_len}, {new_tokens}, {repeats}")
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=generator)

    def timed(count: int) -> float:
        start = time.perf_counter()
        generate(model, prompts, max_new_tokens=count)
        return time.perf_counter() - start

    timed(new_tokens + 1)  # warm-up: kernels compiled and loaded, caches allocated once
    short = statistics.median(timed(1) for _ in range(repeats))
    long = statistics.median(timed(new_tokens + 1) for _ in range(repeats))
    return new_tokens / max(long - short, 1e-9)
