"""Evaluation of a captioning vision-language model on held-out image-caption pairs.

The vision-language stage (2025 report, stage 2: encoder + adapter + decoder trained jointly with
a captioning loss) is judged on pairs it never trained on:

- **caption perplexity**: ``exp`` of the mean negative log-likelihood per caption token given the
  image (EOS included; the prompt ``<s> <image>`` and the image positions are not scored);
- **pick the right caption**: for each image, the true caption and ``num_candidates - 1`` other
  held-out captions (with different text) are scored by their mean log-likelihood per token given
  the image; accuracy of ranking the true one first, against chance ``1 / num_candidates``. The
  same candidates scored under a *different* held-out image give what the text prior alone
  reaches (it should sit near chance);
- **generated captions**: greedy decoding (KV cache) from the prompt ``<s> <image>``.

A caption row is laid out ``<s> <image> caption </s>`` (:func:`caption_ids`); the model expands
``<image>`` into its image tokens and labels those positions ``IGNORE_INDEX``. The stage's training
batches use the same layout and :func:`collate_captions`, so training and scoring cannot drift.

Every function takes a model shaped like :class:`mmafm.models.multimodal.MultimodalModel`:
``model(ids, images, mode=, labels=)`` returning ``logits`` and the expanded ``labels``, and
``config.pad_token_id``; and a tokenizer with ``encode``, ``decode``, ``bos_id``, ``image_id`` and
``eos_id`` (:class:`mmafm.tokenizer.Tokenizer`).
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmafm.eval.perplexity import perplexity
from mmafm.models.multimodal import IGNORE_INDEX

__all__ = [
    "caption_ids",
    "collate_captions",
    "caption_log_likelihoods",
    "caption_perplexity",
    "caption_candidates",
    "evaluate_captions",
    "generate_captions",
]


def caption_ids(tokenizer: Any, caption: str, max_caption_tokens: int) -> torch.Tensor:  # (T,)
    """``<s> <image> caption </s>``, the caption cut to ``max_caption_tokens`` (EOS included)."""
    body = tokenizer.encode(caption)[: max_caption_tokens - 1] + [tokenizer.eos_id]
    return torch.tensor([tokenizer.bos_id, tokenizer.image_id] + body, dtype=torch.long)


def collate_captions(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images (B, 3, S, S), ids (B, T), labels (B, T))``: right-padded ids, padding unlabelled."""
    images = torch.stack([image for image, _ in samples])
    width = max(ids.numel() for _, ids in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (_, tokens) in enumerate(samples):
        ids[row, : tokens.numel()] = tokens
        labels[row, : tokens.numel()] = tokens
    return images, ids, labels


@torch.no_grad()
def caption_log_likelihoods(
    model: nn.Module,
    images: torch.Tensor,  # (N, 3, S, S)
    ids: Sequence[torch.Tensor],  # N rows of `<s> <image> caption </s>`
    mode: str,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:  # (N,), (N,)
    """Summed log-likelihood of each row's caption tokens given its image, and their number.

    Rows are scored in right-padded batches; padding and image positions carry no target, so a
    row's score equals scoring it alone. The model's train/eval mode is restored afterwards.

    Args:
        model: The vision-language model.
        images: One image per row, normalized as in training.
        ids: Token rows laid out by :func:`caption_ids`.
        mode: The resolution mode the images are encoded in.
        batch_size: Rows per forward pass.

    Returns:
        ``(sums, counts)``: ``sums[i]`` the summed ``log p`` (nats) of row ``i``'s caption tokens,
        EOS included; ``counts[i]`` how many tokens that is.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = model.config.pad_token_id
    sums, counts = [], []
    for start in range(0, len(ids), batch_size):
        chunk = [(images[i], ids[i]) for i in range(start, min(start + batch_size, len(ids)))]
        batch_images, batch_ids, labels = collate_captions(chunk, pad)
        out = model(batch_ids.to(device), batch_images.to(device), mode=mode, labels=labels.to(device))
        targets = torch.full_like(out.labels, IGNORE_INDEX)  # (B, L), L = expanded length
        targets[:, :-1] = out.labels[:, 1:]  # next token; image slots and padding are IGNORE_INDEX
        log_probs = F.log_softmax(out.logits.float(), dim=-1)  # (B, L, V)
        keep = targets != IGNORE_INDEX
        token_lp = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * keep  # (B, L)
        sums.append(token_lp.sum(1).cpu())
        counts.append(keep.sum(1).cpu())
    model.train(was_training)
    return torch.cat(sums), torch.cat(counts)


def caption_perplexity(sums: torch.Tensor, counts: torch.Tensor) -> float:
    """Perplexity per caption token over all rows of :func:`caption_log_likelihoods`."""
    return perplexity(-float(sums.sum() / counts.sum()))


def caption_candidates(captions: Sequence[str], num_candidates: int, seed: int) -> list[list[int]]:
    """For each caption, its own index first, then ``num_candidates - 1`` indices of other
    captions with different text (seeded, so every evaluation of a run asks the same questions).

    Raises:
        ValueError: Fewer than ``num_candidates`` distinct caption texts.
    """
    rng = random.Random(f"vl-candidates-{seed}")
    distinct = len(set(captions))
    if distinct < num_candidates:
        raise ValueError(
            f"'pick the right caption' needs {num_candidates} different held-out captions, found "
            f"{distinct}; raise eval_pairs or lower num_candidates"
        )
    lists = []
    for index, caption in enumerate(captions):
        others: list[int] = []
        chosen_texts = {caption}
        while len(others) < num_candidates - 1:
            j = rng.randrange(len(captions))
            if captions[j] not in chosen_texts:
                others.append(j)
                chosen_texts.add(captions[j])
        lists.append([index] + others)
    return lists


@torch.no_grad()
def evaluate_captions(
    model: nn.Module,
    tokenizer: Any,
    images: torch.Tensor,  # (N, 3, S, S)
    captions: Sequence[str],
    mode: str,
    num_candidates: int = 4,
    max_caption_tokens: int = 40,
    seed: int = 0,
) -> dict[str, float]:
    """Caption perplexity and "pick the right caption" accuracy on held-out pairs.

    Args:
        model: The vision-language model.
        tokenizer: Encodes the captions (:func:`caption_ids`).
        images: The held-out images, ``images[i]`` captioned by ``captions[i]``.
        captions: The held-out captions (at least ``num_candidates`` distinct texts).
        mode: The resolution mode the images are encoded in.
        num_candidates: Captions offered per image, the true one included.
        max_caption_tokens: Caption tokens kept (EOS included), as in training.
        seed: Draws the wrong candidates and the wrong image.

    Returns:
        ``caption_ppl``; ``choice_accuracy`` (true caption ranked first under its own image),
        ``choice_accuracy_wrong_image`` (the same candidates under another held-out image),
        ``choice_chance`` = ``1 / num_candidates``; ``eval_pairs`` = N.
    """
    ids = [caption_ids(tokenizer, c, max_caption_tokens) for c in captions]
    sums, counts = caption_log_likelihoods(model, images, ids, mode)
    ppl = caption_perplexity(sums, counts)

    candidates = caption_candidates(captions, num_candidates, seed)
    num = len(captions)
    shift = random.Random(f"vl-wrong-image-{seed}").randrange(1, num)  # image (i + shift) % N: never i
    rows_images, rows_ids = [], []
    for use_wrong_image in (False, True):
        for index, cands in enumerate(candidates):
            image_index = (index + shift) % num if use_wrong_image else index
            for j in cands:
                rows_images.append(image_index)
                rows_ids.append(ids[j])
    cand_sums, cand_counts = caption_log_likelihoods(model, images[rows_images], rows_ids, mode)
    scores = (cand_sums / cand_counts).view(2, num, num_candidates)  # mean log-likelihood per token
    picked = scores.argmax(dim=-1)  # (2, N); the true caption is candidate 0
    return {
        "caption_ppl": ppl,
        "choice_accuracy": float((picked[0] == 0).float().mean()),
        "choice_accuracy_wrong_image": float((picked[1] == 0).float().mean()),
        "choice_chance": 1.0 / num_candidates,
        "eval_pairs": float(num),
    }


@torch.no_grad()
def generate_captions(
    model: nn.Module, tokenizer: Any, images: torch.Tensor, mode: str, max_new_tokens: int
) -> list[str]:
    """Greedy captions (KV cache) for ``images (N, 3, S, S)`` from the prompt ``<s> <image>``,
    each cut at its first EOS; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt = [[tokenizer.bos_id, tokenizer.image_id]] * images.shape[0]
    new_tokens = model.generate(
        images=images.to(device), prompt=prompt, mode=mode, max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id,
    )
    model.train(was_training)
    texts = []
    for row in new_tokens.tolist():
        row = row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
        texts.append(tokenizer.decode(row))
    return texts
