"""A high-quality slice of the data stage's text, for the 2025 MoE teacher.

The 2025 report trains its upcycled MoE teacher "on a small amount of high-quality text"
[paper; WAVE2.md "Distillation and pruning"] without saying how quality is judged [open]. Here a
document's quality is its mean next-token negative log-likelihood under a reference model (the
dense model the teacher is upcycled from, 02_text_pretrain's), each document scored on its own
(context from its first token, so a neighbour cannot help it), and the slice is the
lowest-NLL documents up to a token budget: reference-model perplexity filtering, the established
quality filter for pretraining text (CCNet, Wenzek et al. 2019, keeps the low-perplexity "head"
under a Wikipedia-trained model; Ankner et al. 2024, "Perplexed by perplexity", prune with a
small reference model's perplexity).

Why this score [open choice, said where it is used]: it needs nothing but the data stage's tokens
and the dense model that exists anyway; it is one number per document whatever its source (the
token shards keep no source labels, so a source weighting would need the data stage rerun); and
unlike a dictionary-word ratio it sees fluency, not spelling. Its known bias: it favours
predictable text (templated captions, short formulaic entries), and a model's own perplexity
rewards what it already knows. On the tiny mixture, left alone, it keeps the templated image
captions (NLL ~0.8 nats/token, against ~4 for encyclopaedic prose); so only documents of at
least ``min_tokens`` tokens are eligible (a Gopher-style length rule, Rae et al. 2021), and the
slice becomes the most predictable long prose. What the slice holds is reported (the scores kept
and of the eligible pool), so the bias can be seen.

- :func:`document_bounds`: ``[start, end)`` of every document in a token file (EOS-terminated).
- :func:`document_nll`: each document's mean NLL under a model (documents alone, batched by length).
- :func:`select_quality_slice`: the lowest-scoring documents up to a token budget.
- :func:`write_quality_slice` / :func:`build_quality_slice`: a token folder (``train.bin`` of the
  slice, ``val.bin`` of the held-out documents the same rule admits, ``meta.json`` with the
  slice's provenance) that
  :class:`~mmafm.data.shards.TokenShards` reads like the data stage's. A derived data set: see
  ``data_cards/quality_slice.md``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

__all__ = ["document_bounds", "document_nll", "select_quality_slice", "write_quality_slice", "build_quality_slice"]


def document_bounds(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """``(D, 2)`` int64 ``[start, end)`` of each document of a flat token array in which every
    document ends with ``eos_id`` (``end`` is one past its EOS); a tail without EOS is a document too."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id) + 1  # (D,)
    if len(tokens) and (not len(ends) or ends[-1] != len(tokens)):
        ends = np.append(ends, len(tokens))
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return np.stack([starts, ends.astype(np.int64)], axis=1) if len(ends) else np.zeros((0, 2), np.int64)


@torch.no_grad()
def document_nll(
    model: nn.Module,
    tokens: np.ndarray,
    bounds: np.ndarray,  # (D, 2)
    max_len: int = 128,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean next-token NLL (nats) of each document under ``model``, the document alone (its first
    ``max_len`` tokens), and how many tokens were scored: ``(scores (D,) float64, counts (D,) int64)``.

    A document of ``n`` tokens scores its tokens ``2..min(n, max_len)`` (the first has no
    context); one with a single token scores none (``nan``). Documents run in batches of similar
    length, right-padded (a causal model never sees the padding of its scored positions).
    """
    device = next(model.parameters()).device
    model.eval()
    lengths = np.minimum(bounds[:, 1] - bounds[:, 0], max_len)  # (D,)
    scores = np.full(len(bounds), np.nan)
    counts = np.maximum(lengths - 1, 0)
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] >= 2]
    for first in tqdm(range(0, len(order), batch_size), desc="document NLL", unit="batch", mininterval=10,
                      disable=len(order) <= batch_size * 8):
        docs = order[first : first + batch_size]
        width = int(lengths[docs].max())
        ids = np.zeros((len(docs), width), dtype=np.int64)
        for row, doc in enumerate(docs):
            ids[row, : lengths[doc]] = tokens[bounds[doc, 0] : bounds[doc, 0] + lengths[doc]]
        ids_t = torch.from_numpy(ids).to(device)
        log_probs = model(ids_t[:, :-1]).float().log_softmax(-1)  # (B, L-1, V)
        nll = -log_probs.gather(-1, ids_t[:, 1:, None])[..., 0].cpu().numpy()  # (B, L-1)
        keep = np.arange(width - 1)[None, :] < (lengths[docs] - 1)[:, None]
        scores[docs] = (nll * keep).sum(1) / keep.sum(1)
    return scores, counts


def select_quality_slice(scores: np.ndarray, lengths: np.ndarray, budget_tokens: int, min_tokens: int = 16) -> np.ndarray:
    """Indices (ascending) of the lowest-scoring documents, taken in score order (ties: the
    earlier document) until their tokens reach ``budget_tokens`` (the document that crosses it is
    kept); documents shorter than ``min_tokens`` tokens or without a score are never taken.

    Raises:
        ValueError: a negative budget, or ``scores`` and ``lengths`` of different sizes.
    """
    scores, lengths = np.asarray(scores, dtype=np.float64), np.asarray(lengths, dtype=np.int64)
    if scores.shape != lengths.shape:
        raise ValueError(f"scores {scores.shape} and lengths {lengths.shape} must have one entry per document")
    if budget_tokens < 0:
        raise ValueError(f"budget_tokens must be >= 0, got {budget_tokens}")
    eligible = np.flatnonzero(np.isfinite(scores) & (lengths >= min_tokens))
    ranked = eligible[np.lexsort((eligible, scores[eligible]))]  # by score, then by index
    taken = np.cumsum(lengths[ranked])
    count = int(np.searchsorted(taken, budget_tokens, side="left")) + 1 if budget_tokens else 0
    return np.sort(ranked[: min(count, len(ranked))])


def write_quality_slice(tokens_dir: str | Path, out_dir: str | Path, bounds: np.ndarray, selected: np.ndarray,
                        provenance: dict[str, Any], val_bounds: np.ndarray | None = None,
                        val_selected: np.ndarray | None = None) -> Path:
    """Write the selected documents (in their original order) as ``<out_dir>/train.bin``, the
    ``val_selected`` documents of the source's ``val.bin`` as ``<out_dir>/val.bin`` (``None``: a
    copy of the whole source ``val.bin``), and ``meta.json`` last (the source's, with the slice's
    counts and ``quality_slice``: ``provenance``). Every file is written atomically;
    ``tokens_dir`` is only read. Returns ``out_dir``."""
    from mmafm.data.shards import TOKEN_DTYPE, read_token_meta
    from mmafm.io import atomic_path, atomic_write_json

    tokens_dir, out_dir = Path(tokens_dir), Path(out_dir)
    if out_dir.resolve() == tokens_dir.resolve():
        raise ValueError(f"the quality slice must go to its own folder, not the source {tokens_dir}")
    meta = read_token_meta(tokens_dir)
    tokens = np.memmap(tokens_dir / "train.bin", dtype=TOKEN_DTYPE, mode="r")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # no meta until the new files are whole
    with atomic_path(out_dir / "train.bin") as tmp, open(tmp, "wb") as handle:
        for start, end in bounds[selected]:
            np.asarray(tokens[start:end], dtype=TOKEN_DTYPE).tofile(handle)
    count = int(sum(end - start for start, end in bounds[selected]))
    val_count, val_docs = int(meta["count"]["val"]), meta.get("documents", {}).get("val")
    with atomic_path(out_dir / "val.bin") as tmp:
        if val_selected is None:
            shutil.copyfile(tokens_dir / "val.bin", tmp)
        else:
            val_tokens = np.memmap(tokens_dir / "val.bin", dtype=TOKEN_DTYPE, mode="r")
            with open(tmp, "wb") as handle:
                for start, end in val_bounds[val_selected]:
                    np.asarray(val_tokens[start:end], dtype=TOKEN_DTYPE).tofile(handle)
            val_count = int(sum(end - start for start, end in val_bounds[val_selected]))
            val_docs = int(len(val_selected))
    atomic_write_json(out_dir / "meta.json", {
        **meta, "count": {**meta["count"], "train": count, "val": val_count},
        "documents": {**meta.get("documents", {}), "train": int(len(selected)), "val": val_docs},
        "quality_slice": {"source": str(tokens_dir.resolve()), **provenance},
    })
    return out_dir


def build_quality_slice(model: nn.Module, tokens_dir: str | Path, out_dir: str | Path, budget_tokens: int,
                        pool_tokens: int = 0, max_len: int = 128, min_tokens: int = 64, batch_size: int = 16,
                        reference: str = "", min_val_tokens: int = 0) -> dict[str, Any]:
    """Score the documents of ``<tokens_dir>/train.bin`` (the first ``pool_tokens`` worth; 0 = all)
    of at least ``min_tokens`` tokens with ``model`` (:func:`document_nll`), keep the lowest-NLL
    ones up to ``budget_tokens`` (:func:`select_quality_slice`) and write them to ``out_dir``
    (:func:`write_quality_slice`); its ``val.bin`` holds the source's held-out documents the same
    rule admits (at least ``min_tokens`` tokens, NLL no higher than the highest kept), so a model
    trained on the slice is scored on held-out text of the same kind; when those hold fewer than
    ``min_val_tokens`` tokens, the next-lowest eligible ones are added until they do (or none is left).

    ``min_tokens`` [open: 64, about the 50 words below which Gopher's rules drop a document]: on
    the tiny mixture, the lowest-NLL short documents are the templated image captions (NLL ~0.8
    nats against ~4 for encyclopaedic prose); with the length rule the slice is long prose.

    Returns:
        ``{"tokens_dir", "documents_pool", "documents_eligible", "documents_kept", "tokens_pool",
        "tokens_kept", "nll_kept_mean", "nll_pool_mean" (over the eligible), ...}`` (also in the
        slice's ``meta.json``).
    """
    from mmafm.data.shards import TOKEN_DTYPE, read_token_meta

    if Path(out_dir).resolve() == Path(tokens_dir).resolve():
        raise ValueError(f"the quality slice must go to its own folder, not the source {tokens_dir}")
    meta = read_token_meta(tokens_dir)
    tokens = np.memmap(Path(tokens_dir) / "train.bin", dtype=TOKEN_DTYPE, mode="r")
    bounds = document_bounds(tokens, int(meta["eos_id"]))
    if pool_tokens:
        bounds = bounds[bounds[:, 1] <= max(pool_tokens, int(bounds[0, 1]))]
    lengths = bounds[:, 1] - bounds[:, 0]
    eligible = np.flatnonzero(lengths >= min_tokens)  # only these can be kept: only these are scored
    scores = np.full(len(bounds), np.nan)
    scores[eligible] = document_nll(model, tokens, bounds[eligible], max_len=max_len, batch_size=batch_size)[0]
    selected = select_quality_slice(scores, lengths, budget_tokens, min_tokens)
    if not len(selected):
        raise ValueError(f"no document of {tokens_dir} qualifies (>= {min_tokens} tokens, within the pool of "
                         f"{pool_tokens or 'all'} tokens); lower min_tokens or raise pool_tokens")
    scored = np.isfinite(scores)
    # the held-out side: the val documents the same rule admits (eligible, NLL up to the kept maximum)
    val_tokens = np.memmap(Path(tokens_dir) / "val.bin", dtype=TOKEN_DTYPE, mode="r")
    val_bounds = document_bounds(val_tokens, int(meta["eos_id"]))
    val_eligible = val_bounds[val_bounds[:, 1] - val_bounds[:, 0] >= min_tokens]
    val_scores = document_nll(model, val_tokens, val_eligible, max_len=max_len, batch_size=batch_size)[0]
    threshold = float(np.max(scores[selected]))
    val_lengths = val_eligible[:, 1] - val_eligible[:, 0]
    val_selected = np.union1d(np.flatnonzero(val_scores <= threshold),
                              select_quality_slice(val_scores, val_lengths, min_val_tokens, min_tokens))
    val_bounds = val_eligible
    info = {
        "score": "mean next-token NLL (nats) of the document alone under the reference model; lowest kept",
        "reference_model": reference, "budget_tokens": int(budget_tokens), "min_tokens": int(min_tokens),
        "max_len": int(max_len), "documents_pool": int(len(bounds)), "documents_eligible": int(len(eligible)),
        "documents_kept": int(len(selected)), "tokens_pool": int(lengths.sum()),
        "tokens_eligible": int(lengths[eligible].sum()), "tokens_kept": int(lengths[selected].sum()),
        "nll_pool_mean": float(np.mean(scores[scored])), "nll_kept_mean": float(np.mean(scores[selected])),
        "nll_kept_max": threshold, "val_documents": int(len(val_selected)),
        "val_tokens": int((val_bounds[val_selected, 1] - val_bounds[val_selected, 0]).sum()),
    }
    write_quality_slice(tokens_dir, out_dir, bounds, selected, info, val_bounds, val_selected)
    return {"tokens_dir": str(out_dir), **info}

