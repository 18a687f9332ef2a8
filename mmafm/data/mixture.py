"""A weighted mixture of text sources, tokenized per source, for continued and long-context
pretraining.

The data stage writes one token stream of all its text sources (``tokens/train.bin``); shifting
the mixture (2024 AFM report, section 3.2: continued pretraining "upweights math and code") needs
the sources apart. This module rebuilds the data stage's own documents per source from its
manifest (same sources, ``text_cap``, seed, and train/val split by
:func:`mmafm.data.shards.split_of`, so a document held out there is held out here), adds the
generated sources of :mod:`mmafm.data.synthetic_text`, tokenizes each into a train and a val
stream (documents joined by EOS, as ``train.bin``), and draws batches by weight:

    weights = parse_mixture("wikipedia=3,arithmetic=1", data_stage_sources(data_config))
    streams, stats = source_streams(data_dir, data_config, tokenizer, list(weights))
    train = MixtureShards({s: streams[s]["train"] for s in weights}, weights, seq_len=256, batch_size=8)

A mixture weight is the share of training rows drawn from that source (each row is a window of
``seq_len + 1`` consecutive tokens of one source's stream, at a seeded random offset).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from mmafm.data import SourceStats
from mmafm.data.shards import TOKEN_DTYPE, expand_shards, iter_tar_samples, split_of
from mmafm.data.synthetic_text import GENERATED_TEXT_SOURCES
from mmafm.data.synthetic_text import LICENSE as GENERATED_LICENSE
from mmafm.data.synthetic_text import PACKAGE as GENERATED_PACKAGE

__all__ = [
    "parse_mixture",
    "format_mixture",
    "data_stage_sources",
    "source_documents",
    "source_streams",
    "MixtureShards",
    "stream_batches",
]


def parse_mixture(text: str, allowed: Sequence[str]) -> dict[str, float]:
    """``"wikipedia:3,code:1"`` (or ``"wikipedia=3,code=1"``) -> ``{"wikipedia": 0.75, "code":
    0.25}`` (weights normalised; sources of weight 0 dropped). The defaults are written with ``:``:
    papermill's reader of a notebook's parameters cell skips any line holding two ``=``.

    Raises:
        ValueError: a malformed entry, an unknown or repeated source, a negative weight, or no
            positive weight; the message lists the allowed sources.
    """
    weights: dict[str, float] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, value = entry.partition(":") if ":" in entry else entry.partition("=")
        name = name.strip()
        try:
            weight = float(value) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"mixture entry {entry!r}: expected SOURCE:WEIGHT (or SOURCE=WEIGHT) with a weight >= 0")
        if name not in allowed:
            raise ValueError(f"mixture: unknown source {name!r}; sources: {', '.join(allowed)}")
        if name in weights:
            raise ValueError(f"mixture: source {name!r} is listed twice in {text!r}")
        weights[name] = weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mixture {text!r} gives no source a positive weight; sources: {', '.join(allowed)}")
    return {name: weight / total for name, weight in weights.items() if weight > 0}


def format_mixture(weights: Mapping[str, float]) -> str:
    """``{"wikipedia": 0.75, "code": 0.25}`` -> ``"wikipedia=0.75,code=0.25"``."""
    return ",".join(f"{name}={weight:.4g}" for name, weight in weights.items())


def data_stage_sources(data_config: Mapping[str, Any]) -> list[str]:
    """The text sources a data-stage run used (its ``text_sources``) plus the generated ones."""
    names = [name.strip() for name in str(data_config["text_sources"]).split(",") if name.strip()]
    return names + [name for name in GENERATED_TEXT_SOURCES if name not in names]


def source_documents(
    name: str, data_config: Mapping[str, Any], pairs_dir: str | Path | None, generated_documents: int
) -> tuple[list[tuple[str, str]], SourceStats]:
    """``([(key, text)], stats)`` of one source, keyed as the data stage keys them for its split.

    Args:
        name: a data-stage text source (``captions``, ``wikipedia``, ...) or a generated one
            (``arithmetic``, ``code``).
        data_config: the data stage's resolved config (its manifest's ``config``): ``text_cap``
            and ``seed`` pick the same documents it tokenized.
        pairs_dir: the data stage's pair shards (read for ``captions`` only: their ``.txt``).
        generated_documents: documents of a generated source.
    """
    from mmafm.data.text_sources import TEXT_SOURCES

    seed = int(data_config.get("seed", 0))
    if name == "captions":
        if not pairs_dir:
            raise ValueError("mixture source 'captions' needs the data stage's pairs_dir")
        stats = SourceStats("captions", "the image sources above", "as each image source")
        items = []
        for shard in expand_shards(pairs_dir):
            for sample in iter_tar_samples(shard):
                caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
                if caption:
                    items.append((sample["__key__"], caption))  # the data stage keys captions by pair key
        stats.kept = len(items)
        return sorted(items), stats
    if name in GENERATED_TEXT_SOURCES:
        stats = SourceStats(name, GENERATED_PACKAGE, GENERATED_LICENSE)
        docs = GENERATED_TEXT_SOURCES[name](generated_documents, seed, stats)
    elif name in TEXT_SOURCES:
        stats = SourceStats(name, TEXT_SOURCES[name].package, TEXT_SOURCES[name].license)
        docs = TEXT_SOURCES[name].documents(int(data_config.get("text_cap", 0)), seed, stats)
    else:
        raise ValueError(f"unknown text source {name!r}")
    return [(f"{name}/{doc_id}", text) for doc_id, text in docs], stats


def source_streams(
    data_dir: str | Path,
    data_config: Mapping[str, Any],
    tokenizer: Any,
    sources: Sequence[str],
    generated_documents: int = 2000,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict]]:
    """Token streams ``{source: {"train": ids, "val": ids}}`` (uint32, each document + EOS) and
    per-source stats (kept / train / val documents and tokens, for the data cards)."""
    val_fraction = float(data_config.get("val_fraction", 0.05))
    pairs_dir = Path(data_dir) / "pairs"
    streams: dict[str, dict[str, np.ndarray]] = {}
    stats_out: dict[str, dict] = {}
    for name in sources:
        documents, stats = source_documents(name, data_config, pairs_dir, generated_documents)
        splits: dict[str, list[int]] = {"train": [], "val": []}
        counts = {"train": 0, "val": 0}
        for (key, _), ids in zip(documents, tokenizer.encode_batch([text for _, text in documents], eos=True)):
            split = split_of(key, val_fraction)
            splits[split].extend(ids)
            counts[split] += 1
        streams[name] = {split: np.asarray(ids, dtype=TOKEN_DTYPE) for split, ids in splits.items()}
        stats_out[name] = stats.as_dict() | counts | {
            "train_tokens": int(len(streams[name]["train"])), "val_tokens": int(len(streams[name]["val"]))}
    return streams, stats_out


class MixtureShards:
    """Deterministic ``(input_ids, targets)`` LongTensor batches (B, T) drawn from several token
    streams by weight: each row picks a source with probability its weight, then a window of
    ``seq_len + 1`` tokens at a uniform random offset of that source's stream.

    An epoch is ``batches_per_epoch`` batches (default: the mixed streams' tokens / tokens per
    batch); its draws are fixed by ``(seed, epoch)``, so the trainer's exact resume works, and
    :meth:`set_epoch` picks another draw. Under torch.distributed rank r takes batches r, r + W, ...

    Args:
        streams: ``{source: uint32 token ids}``; each needs more than ``seq_len`` tokens.
        weights: ``{source: weight}`` over the same sources (normalised here).
        seq_len: tokens per row T.
        batch_size: rows per batch B.
        seed: the draw's seed.
        batches_per_epoch: batches of one epoch; 0 = the default above.
    """

    def __init__(
        self,
        streams: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        batches_per_epoch: int = 0,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if set(weights) != set(streams) or not weights:
            raise ValueError(f"weights {sorted(weights)} and streams {sorted(streams)} must name the same sources")
        short = [f"{name} ({len(ids)} tokens)" for name, ids in streams.items() if len(ids) <= seq_len]
        if short:
            raise ValueError(f"mixture sources shorter than one row of seq_len={seq_len} (+1): {', '.join(short)}; "
                             "lower seq_len, drop them from the mixture or add documents")
        self.names = list(weights)
        total = sum(weights.values())
        self.probabilities = np.asarray([weights[name] / total for name in self.names])
        self.streams = [np.asarray(streams[name]) for name in self.names]
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        tokens = sum(len(ids) for ids in self.streams)
        self.batches_per_epoch = batches_per_epoch or max(1, tokens // (batch_size * (seq_len + 1)))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> range:
        indices = range(self.batches_per_epoch)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            indices = indices[torch.distributed.get_rank() :: torch.distributed.get_world_size()]
        return indices

    def __len__(self) -> int:
        return len(self._indices())

    def row_sources(self, batch_index: int) -> list[str]:
        """Which source each row of batch ``batch_index`` of the current epoch comes from."""
        rng = np.random.default_rng([self.seed, self.epoch, batch_index])
        return [self.names[i] for i in rng.choice(len(self.names), size=self.batch_size, p=self.probabilities)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        offsets = np.arange(self.seq_len + 1)
        for index in self._indices():
            rng = np.random.default_rng([self.seed, self.epoch, index])
            picks = rng.choice(len(self.names), size=self.batch_size, p=self.probabilities)
            rows = []
            for pick in picks:
                stream = self.streams[pick]
                start = rng.integers(0, len(stream) - self.seq_len)  # the window [start, start + T] fits
                rows.append(np.asarray(stream[start + offsets], dtype=np.int64))
            batch = torch.from_numpy(np.stack(rows))  # (B, T+1)
            yield batch[:, :-1], batch[:, 1:]


def stream_batches(stream: np.ndarray, seq_len: int, batch_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches of consecutive non-overlapping windows of a (val) stream, for
    held-out evaluation (fewer rows in the last batch if the stream runs out).

    Raises:
        ValueError: the stream holds no window of ``seq_len + 1`` tokens.
    """
    windows = (len(stream) - 1) // seq_len
    if windows < 1:
        raise ValueError(f"a held-out stream of {len(stream)} tokens holds no window of seq_len={seq_len} (+1)")
    offsets = np.arange(seq_len + 1)
    batches = []
    for first in range(0, min(windows, batch_size * count), batch_size):
        starts = np.arange(first, min(first + batch_size, windows)) * seq_len
        rows = torch.from_numpy(np.asarray(stream[starts[:, None] + offsets], dtype=np.int64))  # (B, T+1)
        batches.append((rows[:, :-1], rows[:, 1:]))
    return batches
