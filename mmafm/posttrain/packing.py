"""Packing for SFT: several tokenized conversations in one row, attention reset at every boundary.

A step takes ``batch_size`` conversations (the same examples as an unpacked step), puts them into
rows of at most ``row_len`` tokens (first-fit decreasing, :func:`pack_rows`) and pads the rows to
the longest one. Every token carries the index of its conversation in the row
(``document_ids``); the text model then masks attention block-diagonally and restarts RoPE
positions per conversation (:func:`mmafm.models.text.document_mask`), so each conversation computes
exactly what it computes alone, and the targets are each conversation's own (the assistant spans,
:func:`mmafm.data.chat.encode_chat`), concatenated: the loss (a mean over target tokens) of a
packed step equals the padded step's. What packing saves is the padding: the tiny task families
range from ~20 to ~150 tokens, so a padded batch computes mostly padding.

Multimodal rows (:class:`SftBatch` with ``images``) pack the same way: ``encode_chat(...,
image_tokens=N)`` already writes each ``<image>`` as its ``N`` slots, filled in reading order.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

__all__ = ["SftBatch", "pack_rows", "packed_order", "collate_packed", "collate_padded", "SftBatches"]

IGNORE = -100  # target the loss skips (mmafm.data.chat.IGNORE)

Example = tuple[list[int], list[int]]  # (input_ids, targets) of one conversation


class SftBatch(NamedTuple):
    """One SFT micro-batch (what :class:`SftBatches` yields and the SFT task consumes)."""

    input_ids: torch.Tensor  # (R, T) right-padded rows
    targets: torch.Tensor  # (R, T) next-token targets, -100 outside assistant spans and padding
    document_ids: torch.Tensor | None  # (R, T) conversation index inside the row (padding: its own); None = unpacked
    images: torch.Tensor | None = None  # (N, C, S, S) one per image placeholder run, in reading order


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of total length <= ``row_len`` (first-fit
    decreasing; ties keep the input order). Raises ``ValueError`` for an item longer than a row."""
    too_long = [n for n in lengths if n > row_len]
    if too_long:
        raise ValueError(f"pack_rows: an item of {max(too_long)} tokens does not fit a row of row_len={row_len}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(row_len - lengths[index])
    return [sorted(row) for row in rows]


def collate_padded(examples: Sequence[Example], pad_id: int) -> SftBatch:
    """One conversation per row, right-padded (the unpacked reference)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, tgt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(tgt)] = torch.tensor(tgt)
    return SftBatch(input_ids, targets, None)


def collate_packed(examples: Sequence[Example], pad_id: int, row_len: int) -> SftBatch:
    """The conversations packed into rows of <= ``row_len`` tokens (:func:`pack_rows`), each row
    the concatenation of its conversations in their order, then padding (a document of its own)."""
    rows = pack_rows([len(ids) for ids, _ in examples], row_len)
    width = max(sum(len(examples[i][0]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    document_ids = torch.empty((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for doc, index in enumerate(row):
            ids, tgt = examples[index]
            input_ids[r, start : start + len(ids)] = torch.tensor(ids)
            targets[r, start : start + len(tgt)] = torch.tensor(tgt)
            document_ids[r, start : start + len(ids)] = doc
            start += len(ids)
        document_ids[r, start:] = len(row)  # padding: its own document
    return SftBatch(input_ids, targets, document_ids)


def packed_order(examples: Sequence[Example], row_len: int) -> list[int]:
    """The example indices in the order :func:`collate_packed` lays them out (row by row)."""
    return [i for row in pack_rows([len(ids) for ids, _ in examples], row_len) for i in row]


class SftBatches:
    """Shuffled SFT steps of ``batch_size`` conversations, one epoch per iteration, packed into rows
    of ``row_len`` tokens (``row_len = 0``: one padded row per conversation). The order comes from
    torch's global RNG, which the trainer seeds per epoch.

    Args:
        examples: ``(input_ids, targets)`` per conversation.
        batch_size: conversations per step.
        pad_id: the tokenizer's padding id.
        row_len: packed row length in tokens; 0 = no packing.
        images: per example, its images ``(n_i, C, S, S)`` (or None: text only); they travel with
            the rows in reading order.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, row_len: int = 0,
                 images: Sequence[torch.Tensor | None] | None = None):
        if not examples:
            raise ValueError("no training conversations (all longer than max_tokens?)")
        if images is not None and len(images) != len(examples):
            raise ValueError(f"{len(images)} image sets for {len(examples)} conversations")
        self.examples, self.batch_size, self.pad_id, self.row_len = list(examples), batch_size, pad_id, row_len
        self.images = images

    def __len__(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def collate(self, indices: Sequence[int]) -> SftBatch:
        """The batch of the examples at ``indices`` (packed or padded)."""
        chosen = [self.examples[i] for i in indices]
        if self.row_len:
            batch = collate_packed(chosen, self.pad_id, self.row_len)
            order = [indices[i] for i in packed_order(chosen, self.row_len)]
        else:
            batch, order = collate_padded(chosen, self.pad_id), list(indices)
        if self.images is not None:
            parts = [self.images[i] for i in order if self.images[i] is not None]
            batch = batch._replace(images=torch.cat(parts) if parts else None)
        return batch

    def padding_share(self, steps: int = 8) -> float:
        """Share of the computed tokens that are padding over ``steps`` steps of a fresh epoch
        (torch's RNG is restored afterwards, so the training order is untouched)."""
        state = torch.get_rng_state()
        try:
            order = torch.randperm(len(self.examples)).tolist()
        finally:
            torch.set_rng_state(state)
        computed = real = 0
        for start in range(0, min(len(order), steps * self.batch_size), self.batch_size):
            chunk = order[start : start + self.batch_size]
            computed += self.collate(chunk).input_ids.numel()
            real += sum(len(self.examples[i][0]) for i in chunk)
        return 1.0 - real / max(computed, 1)

    def __iter__(self):
        order = torch.randperm(len(self.examples)).tolist()
        for start in range(0, len(order), self.batch_size):
            yield self.collate(order[start : start + self.batch_size])
