"""Vocabulary extension for continued pretraining (2025 report: 100k -> 150k pieces).

The 2025 on-device model grows its tokenizer during continued pretraining so that the new data
(more languages there; math and code here) costs fewer tokens, without starting the model over.
Two pure steps, each usable alone:

1. :func:`extend_tokenizer` trains a BPE tokenizer on the new texts with the base's options
   (:func:`mmafm.tokenizer.train_tokenizer`) and appends its merged pieces that the base lacks, in
   the new model's merge order, until the vocabulary has ``vocab_size`` pieces. Every base piece
   keeps its id (so token shards, checkpoints and the chat/image ids stay valid); the appended
   pieces get scores below every base piece, so SentencePiece applies the base's merges first
   and a new merge only where the base had none. [open] The report does not say how its pieces
   were chosen; "append the new corpus' most frequent merges" is the usual recipe.
2. :func:`extend_vocabulary` grows a text model's embedding (and untied head) to the new size:
   base rows are copied, and each new row is the mean of the base rows of the base tokenizer's
   pieces for the new piece's text. [open] The report does not say how new rows start; the mean
   of the sub-piece embeddings is the common choice (e.g. Gee et al. 2022, "Fast Vocabulary
   Transfer"), and it makes the extended model's next-token distribution start close to the
   base's.

:func:`tokens_per_byte` measures what the extension is for: tokens per UTF-8 byte of a text set
under each tokenizer.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_model
from torch import nn

from mmafm.io import atomic_path
from mmafm.tokenizer import Tokenizer, train_tokenizer

__all__ = ["extend_tokenizer", "extend_vocabulary", "piece_decomposition", "tokens_per_byte"]

_NORMAL = sp_model.ModelProto.SentencePiece.NORMAL
_SPACE = "\u2581"  # SentencePiece's whitespace mark


def _proto(tokenizer: Tokenizer) -> sp_model.ModelProto:
    proto = sp_model.ModelProto()
    proto.ParseFromString(tokenizer.sp.serialized_model_proto())
    return proto


def extend_tokenizer(
    base: Tokenizer,
    texts: Iterable[str],
    vocab_size: int,
    out_prefix: str | Path,
    seed: int = 0,
    num_threads: int = 2,
) -> Tokenizer:
    """``base`` grown to ``vocab_size`` pieces with merges learnt on ``texts``.

    Writes ``<out_prefix>.model`` (temp file, then rename) and returns it loaded.

    Raises:
        ValueError: ``vocab_size`` is not larger than the base's, or the texts do not hold enough
            new merges to reach it (the message says how many they gave).
    """
    if vocab_size <= base.vocab_size:
        raise ValueError(f"extend_tokenizer: vocab_size={vocab_size} must exceed the base's {base.vocab_size}")
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ValueError("extend_tokenizer: no text to learn new pieces from (all texts empty)")
    proto = _proto(base)
    known = {piece.piece for piece in proto.pieces}
    lowest = min((piece.score for piece in proto.pieces if piece.type == _NORMAL), default=0.0)
    needed = vocab_size - base.vocab_size
    candidates: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        # A tokenizer of the target size on the new texts; a larger one if too few pieces are new.
        for attempt_size in (vocab_size, 2 * vocab_size):
            fresh = train_tokenizer(texts, Path(tmp) / f"fresh{attempt_size}", vocab_size=attempt_size,
                                    seed=seed, num_threads=num_threads)
            fresh_pieces = sorted((p for p in _proto(fresh).pieces if p.type == _NORMAL), key=lambda p: -p.score)
            candidates = [p.piece for p in fresh_pieces if p.piece not in known]
            if len(candidates) >= needed:
                break
    if len(candidates) < needed:
        raise ValueError(f"extend_tokenizer: the texts give {len(candidates)} new pieces, {needed} are needed "
                         f"to grow {base.vocab_size} -> {vocab_size}; pass more text or a smaller vocab_size")
    for rank, piece in enumerate(candidates[:needed]):
        proto.pieces.append(sp_model.ModelProto.SentencePiece(piece=piece, score=lowest - 1.0 - rank, type=_NORMAL))
    proto.trainer_spec.vocab_size = vocab_size
    path = Path(out_prefix).with_suffix(".model")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp_path:
        tmp_path.write_bytes(proto.SerializeToString())
    extended = Tokenizer.load(path)
    if extended.vocab_size != vocab_size:  # SentencePiece dropped a piece it cannot hold
        raise ValueError(f"extend_tokenizer: {path} loads with {extended.vocab_size} pieces, not {vocab_size}")
    return extended


def piece_decomposition(base: Tokenizer, piece: str) -> list[int]:
    """The base tokenizer's ids for the text of ``piece`` (no dummy-prefix space added)."""
    return _decompositions(base, [piece])[0]


def _decompositions(base: Tokenizer, pieces: Sequence[str]) -> list[list[int]]:
    """:func:`piece_decomposition` of each piece (``[unk]`` for an empty one), one processor for all."""
    proto = _proto(base)
    proto.normalizer_spec.add_dummy_prefix = False
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.SerializeToString())
    return [processor.encode(piece.replace(_SPACE, " ")) or [base.unk_id] for piece in pieces]


def _grown(weight: torch.Tensor, parts: list[list[int]]) -> torch.Tensor:  # (V, D) -> (V + len(parts), D)
    new_rows = torch.stack([weight[ids].mean(dim=0) for ids in parts]) if parts else weight[:0]
    return torch.cat([weight, new_rows.to(weight.dtype)], dim=0)


@torch.no_grad()
def extend_vocabulary(model: nn.Module, base: Tokenizer, extended: Tokenizer) -> nn.Module:
    """Grow ``model`` (a :class:`mmafm.models.text.DecoderLM`) from ``base``'s vocabulary to ``extended``'s.

    In place; returns ``model``. Base ids keep their rows bit for bit; each new row is the mean of
    the base rows of :func:`piece_decomposition` of its piece (the same for an untied head).

    Raises:
        ValueError: the model's vocabulary is not the base tokenizer's, or ``extended`` does not
            start with every base piece at its id.
    """
    old = int(model.config.vocab_size)
    if old != base.vocab_size:
        raise ValueError(f"extend_vocabulary: the model has {old} tokens, the base tokenizer {base.vocab_size}")
    mismatched = [i for i in range(old) if base.sp.id_to_piece(i) != extended.sp.id_to_piece(i)]
    if mismatched or extended.vocab_size < old:
        raise ValueError(f"extend_vocabulary: {extended.path} is not an extension of {base.path} "
                         f"(first differing id: {mismatched[0] if mismatched else old})")
    new_pieces = [extended.sp.id_to_piece(i) for i in range(old, extended.vocab_size)]
    parts = _decompositions(base, new_pieces)
    embed = nn.Embedding(extended.vocab_size, model.config.dim, device=model.embed.weight.device,
                         dtype=model.embed.weight.dtype)
    embed.weight.copy_(_grown(model.embed.weight, parts))
    model.embed = embed
    if not model.config.tie_embeddings:
        head = nn.Linear(model.config.dim, extended.vocab_size, bias=False, device=model.lm_head.weight.device,
                         dtype=model.lm_head.weight.dtype)
        head.weight.copy_(_grown(model.lm_head.weight, parts))
        model.lm_head = head
    model.config = replace(model.config, vocab_size=extended.vocab_size)
    return model


def tokens_per_byte(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """Tokens per UTF-8 byte over ``texts`` (lower: the vocabulary fits the text better)."""
    total_bytes = sum(len(text.encode("utf-8")) for text in texts)
    if total_bytes == 0:
        raise ValueError("tokens_per_byte: the texts are empty")
    return sum(len(ids) for ids in tokenizer.encode_batch(list(texts))) / total_bytes
