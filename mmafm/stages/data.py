"""Stage 00_data: build the image-text shards, the tokenizer and the token shards.

Sources (see ``data_cards/``): procedurally generated shape scenes and drawn garment
silhouettes of the ten Fashion-MNIST concepts (both built in), emoji, OpenClipArt
and Tux Paint stamps (Debian packages from ``make data``) as image-caption pairs; Wikipedia
summaries, WordNet glosses, fortunes, the Jargon File and the pairs' own captions as text;
Fashion-MNIST checked and held out for zero-shot evaluation. The tokenizer is SentencePiece BPE
as the reports specify (digits split, byte fallback, no normalization; :mod:`mmafm.tokenizer`),
trained on the train split of the text only.

Outputs (manifest keys): ``pairs_dir`` (WebDataset tars ``pairs-{train,val}-NNNNNN.tar``),
``tokenizer`` (``tokenizer.model``), ``tokens_dir`` (``train.bin``, ``val.bin``, ``meta.json``),
``fashion_mnist`` (its folder, or "" when disabled), ``data_dir`` (the stage folder, which also
holds ``data_card_stats.json``: per source kept / skipped / corrupt counts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from mmafm.config import to_dict
from mmafm.data import Pair, SourceStats
from mmafm.data import fashion_mnist as fmnist
from mmafm.data import garments
from mmafm.data.shards import PairShardWriter, split_of, write_token_shards
from mmafm.data.sources import IMAGE_SOURCES
from mmafm.data.synthetic import LICENSE as SYNTHETIC_LICENSE
from mmafm.data.synthetic import generate_pairs
from mmafm.data.text_sources import TEXT_SOURCES
from mmafm.io import atomic_write_json
from mmafm.stages import register_stage
from mmafm.stages.base import StageConfig, StageDir
from mmafm.tokenizer import Tokenizer, train_tokenizer

__all__ = ["DataStageConfig", "run", "parse_sources", "plot_samples", "plot_token_lengths", "counts_table"]

STAGE = "00_data"
IMAGE_SOURCE_NAMES = ("synthetic", "garments") + tuple(IMAGE_SOURCES)
TEXT_SOURCE_NAMES = ("captions",) + tuple(TEXT_SOURCES)
SAMPLES_PER_SOURCE = 8  # shown in the sample grid
HISTOGRAM_DOCS = 2000  # documents per text source re-encoded for the length histogram
WRITE_SHUFFLE = 2000  # pairs buffered (PNG-encoded) to mix sources within shards


def _interleave(streams: list[Iterator[Pair]]) -> Iterator[Pair]:
    """Round-robin over the sources until each is exhausted."""
    active = list(streams)
    while active:
        for stream in list(active):
            try:
                yield next(stream)
            except StopIteration:
                active.remove(stream)


def parse_sources(value: str, allowed: tuple[str, ...], field_name: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each checked against ``allowed``."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"{field_name}: unknown source(s) {unknown}; expected a comma-separated subset of {list(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{field_name}: a source is listed twice in {value!r}")
    return names


@dataclass
class DataStageConfig(StageConfig):
    """Tiny defaults: synthetic + 300 of each real image source, 2,000 of each text source."""

    # Comma-separated image-caption sources, from: synthetic, garments, emoji, openclipart, tuxpaint.
    image_sources: str = "synthetic,garments,emoji,openclipart,tuxpaint"
    synthetic_pairs: int = field(default=2000, metadata={"min": 0})  # generated shape scenes
    garment_pairs: int = field(default=2000, metadata={"min": 0})  # drawn garment silhouettes (mmafm.data.garments) [open]
    real_cap: int = field(default=300, metadata={"min": 0})  # max pairs per real image source; 0 = all
    image_size: int = field(default=64, metadata={"min": 8, "max": 1024})  # stored square side, pixels
    # Comma-separated text sources, from: captions (the pairs' captions), wikipedia, wordnet,
    # fortunes, jargon.
    text_sources: str = "captions,wikipedia,wordnet,fortunes,jargon"
    text_cap: int = field(default=2000, metadata={"min": 0})  # max documents per text source; 0 = all
    fashion_mnist: bool = True  # check Fashion-MNIST (held out for zero-shot eval) and name it in the manifest
    # SentencePiece vocabulary; the reports use 49,152 / 100,000 / 153,600 (mmafm.tokenizer.VOCAB_PRESETS).
    vocab_size: int = field(default=2048, metadata={"min": 300})
    tokenizer_max_sentences: int = field(default=200_000, metadata={"min": 1})  # lines sampled for BPE training
    val_fraction: float = field(default=0.05, metadata={"min": 0.0, "max": 0.5})  # hash-split share of val
    shard_size: int = field(default=1000, metadata={"min": 1})  # pairs per tar shard

    def __post_init__(self) -> None:
        if not parse_sources(self.image_sources, IMAGE_SOURCE_NAMES, "image_sources"):
            raise ValueError(f"image_sources: at least one of {list(IMAGE_SOURCE_NAMES)} is needed")
        if not parse_sources(self.text_sources, TEXT_SOURCE_NAMES, "text_sources"):
            raise ValueError(f"text_sources: at least one of {list(TEXT_SOURCE_NAMES)} is needed")


def _image_pairs(name: str, cfg: DataStageConfig, stats: SourceStats) -> Iterator[Pair]:
    if name == "synthetic":
        for pair in generate_pairs(cfg.synthetic_pairs, cfg.seed, cfg.image_size):
            stats.kept += 1
            yield pair
        if stats.kept == 0:
            raise ValueError("image source 'synthetic' is listed but synthetic_pairs = 0")
        return
    if name == "garments":
        for pair in garments.generate_pairs(cfg.garment_pairs, cfg.seed, cfg.image_size):
            stats.kept += 1
            yield pair
        if stats.kept == 0:
            raise ValueError("image source 'garments' is listed but garment_pairs = 0")
        return
    yield from IMAGE_SOURCES[name].pairs(cfg.image_size, cfg.real_cap, cfg.seed, stats)


def _source_stats(name: str) -> SourceStats:
    if name == "synthetic":
        return SourceStats("synthetic", "built in (mmafm.data.synthetic)", SYNTHETIC_LICENSE)
    if name == "garments":
        return SourceStats("garments", garments.PACKAGE, garments.LICENSE)
    if name == "captions":
        return SourceStats("captions", "the image sources above", "as each image source")
    if name in IMAGE_SOURCES:
        return SourceStats(name, IMAGE_SOURCES[name].package, IMAGE_SOURCES[name].license)
    return SourceStats(name, TEXT_SOURCES[name].package, TEXT_SOURCES[name].license)


def plot_samples(samples: dict[str, list[Pair]]):
    """A grid: one row per source, its first pairs with wrapped captions."""
    import matplotlib.pyplot as plt
    import textwrap

    rows = max(1, len(samples))
    cols = max([len(pairs) for pairs in samples.values()] + [1])
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.5 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for row, (source, pairs) in enumerate(samples.items()):
        for col, pair in enumerate(pairs):
            axis = axes[row, col]
            axis.imshow(pair.image)
            axis.set_title("\n".join(textwrap.wrap(pair.caption, 24)[:3]), fontsize=6)
        axes[row, 0].text(-0.1, 0.5, source, transform=axes[row, 0].transAxes, rotation=90,
                          ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def plot_token_lengths(lengths: dict[str, list[int]]):
    """Histogram of document lengths in tokens, one series per text source (log x)."""
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 3.5))
    longest = max([max(v) for v in lengths.values() if v] + [2])
    bins = np.logspace(0, np.log10(longest + 1), 40)
    for source, values in lengths.items():
        if values:
            axis.hist(values, bins=bins, histtype="step", label=f"{source} (median {int(np.median(values))})")
    axis.set_xscale("log")
    axis.set_xlabel("tokens per document")
    axis.set_ylabel("documents")
    axis.legend(fontsize=7)
    fig.tight_layout()
    return fig


def counts_table(stats: dict) -> str:
    """Markdown table of ``data_card_stats.json``: kept / train / val / skipped / corrupt."""
    lines = ["| source | kind | package | licence | kept | train | val | skipped | corrupt |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for kind in ("image", "text"):
        for entry in stats[f"{kind}_sources"].values():
            lines.append(
                f"| {entry['source']} | {kind} | {entry['package']} | {entry['license']} | {entry['kept']} | "
                f"{entry.get('train', '')} | {entry.get('val', '')} | {sum(entry['skipped'].values())} | {entry['corrupt']} |"
            )
    held = stats.get("fashion_mnist")
    if held:
        lines.append(f"| fashion_mnist | held out | {held['package']} | {held['license']} | "
                     f"{held['train'] + held['test']} | {held['train']} | {held['test']} (test) | 0 | 0 |")
    return "\n".join(lines)


def run(cfg: DataStageConfig) -> dict[str, str]:
    """Build every artefact of the data stage under ``cfg.out_dir``; returns the manifest outputs."""
    if not cfg.out_dir:
        raise ValueError("out_dir is empty: set where the data stage writes (the runner sets runs/<run-id>/00_data)")
    start = time.time()
    stage = StageDir(cfg.out_dir, STAGE)
    root = stage.root
    pairs_dir, tokens_dir, tokenizer_dir = root / "pairs", root / "tokens", root / "tokenizer"

    # 1. image-caption pairs -> WebDataset shards
    captions: list[tuple[str, str]] = []
    names = parse_sources(cfg.image_sources, IMAGE_SOURCE_NAMES, "image_sources")
    source_stats = {name: _source_stats(name) for name in names}
    splits = {name: {"train": 0, "val": 0} for name in names}
    samples: dict[str, list[Pair]] = {name: [] for name in names}
    streams = [_image_pairs(name, cfg, source_stats[name]) for name in names]
    with PairShardWriter(pairs_dir, cfg.val_fraction, cfg.shard_size, shuffle_buffer=WRITE_SHUFFLE, seed=cfg.seed) as writer:
        for pair in tqdm(_interleave(streams), desc="image-text pairs", mininterval=5):
            splits[pair.source][writer.write(pair)] += 1
            captions.append((pair.key, pair.caption))
            if len(samples[pair.source]) < SAMPLES_PER_SOURCE:
                samples[pair.source].append(pair)
    image_stats = {name: source_stats[name].as_dict() | splits[name] for name in names}
    pair_counts = dict(writer.counts)

    # 2. Fashion-MNIST: checked and named, never mixed into training data
    held_out: dict | None = None
    if cfg.fashion_mnist:
        train_images, _, _ = fmnist.load("train")
        test_images, test_labels, class_names = fmnist.load("test")
        held_out = {
            "package": fmnist.PACKAGE, "license": fmnist.LICENSE, "path": str(fmnist.DATA_DIR),
            "train": int(len(train_images)), "test": int(len(test_images)), "classes": class_names,
            "test_per_class": np.bincount(test_labels, minlength=len(class_names)).tolist(),
        }

    # 3. text documents
    text_stats: dict[str, dict] = {}
    documents: list[tuple[str, str]] = []
    doc_source: list[str] = []
    for name in parse_sources(cfg.text_sources, TEXT_SOURCE_NAMES, "text_sources"):
        stats = _source_stats(name)
        if name == "captions":
            items = captions
            stats.kept = len(items)
        else:
            items = list(tqdm(TEXT_SOURCES[name].documents(cfg.text_cap, cfg.seed, stats), desc=f"text {name}", mininterval=5))
        splits = {"train": 0, "val": 0}
        for doc_id, text in items:
            key = f"{name}/{doc_id}" if name != "captions" else doc_id  # captions split with their pair
            splits[split_of(key, cfg.val_fraction)] += 1
            documents.append((key, text))
            doc_source.append(name)
        text_stats[name] = stats.as_dict() | splits

    # 4. tokenizer, trained on the train split only
    train_texts = [text for key, text in documents if split_of(key, cfg.val_fraction) == "train"]
    tokenizer = train_tokenizer(
        train_texts, tokenizer_dir / "tokenizer", vocab_size=cfg.vocab_size,
        max_sentences=cfg.tokenizer_max_sentences, seed=cfg.seed,
    )

    # 5. token shards
    token_meta = write_token_shards(tqdm(documents, desc="tokenize", mininterval=5), tokenizer, tokens_dir, cfg.val_fraction)

    # 6. stats, figures, manifest
    stats_record = {
        "image_sources": image_stats,
        "text_sources": text_stats,
        "fashion_mnist": held_out,
        "pairs": pair_counts,
        "tokens": token_meta,
        "tokenizer": tokenizer.describe(),
        "seconds": round(time.time() - start, 1),
        "config": to_dict(cfg),
    }
    atomic_write_json(root / "data_card_stats.json", stats_record)
    lengths = _token_lengths(tokenizer, documents, doc_source)
    import matplotlib.pyplot as plt

    for name, fig in (("samples", plot_samples(samples)), ("token_lengths", plot_token_lengths(lengths))):
        stage.save_figure(fig, name)
        plt.close(fig)
    summary = {
        "pairs_train": pair_counts["train"], "pairs_val": pair_counts["val"],
        "tokens_train": token_meta["count"]["train"], "tokens_val": token_meta["count"]["val"],
        "vocab_size": tokenizer.vocab_size, "seconds": stats_record["seconds"],
    }
    stage.log({"step": 0} | summary)
    outputs = {
        "pairs_dir": str(pairs_dir),
        "tokenizer": str(tokenizer_dir / "tokenizer.model"),
        "tokens_dir": str(tokens_dir),
        "fashion_mnist": str(fmnist.DATA_DIR) if cfg.fashion_mnist else "",
        "data_dir": str(root),
    }
    stage.write_manifest(outputs, cfg, summary)
    return outputs


def _token_lengths(tokenizer: Tokenizer, documents: list[tuple[str, str]], doc_source: list[str]) -> dict[str, list[int]]:
    """Token counts of up to HISTOGRAM_DOCS documents per source (for the histogram)."""
    by_source: dict[str, list[str]] = {}
    for (_, text), source in zip(documents, doc_source):
        texts = by_source.setdefault(source, [])
        if len(texts) < HISTOGRAM_DOCS:
            texts.append(text)
    return {source: [len(ids) for ids in tokenizer.encode_batch(texts)] for source, texts in by_source.items()}


register_stage(STAGE, DataStageConfig, run)
