"""Shards on disk: WebDataset tars of image-text pairs, and uint32 token streams.

Image-text pairs are plain tar files in the WebDataset layout that open_clip and ``webdataset``
read: consecutive members ``<key>.png`` (RGB PNG), ``<key>.txt`` (UTF-8 caption) and
``<key>.json`` (``{"source", "license", "id"}``), named ``pairs-train-000000.tar``,
``pairs-val-000000.tar``, ... Which split a pair goes to is a hash of its key
(:func:`split_of`), so it never changes when sources are added or reordered.

Text is tokenized into ``train.bin`` / ``val.bin`` (numpy uint32, documents joined with EOS)
plus ``meta.json``; :class:`TokenShards` cuts deterministic (input, target) batches from them.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

from mmafm.data import Pair
from mmafm.data.images import to_rgb
from mmafm.io import atomic_write_json

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "split_of",
    "PairShardWriter",
    "ShardReadError",
    "iter_tar_samples",
    "expand_shards",
    "decode_image",
    "decode_pair_sample",
    "SKIP_REASONS",
    "SkipCounts",
    "ImageTextShards",
    "load_pairs",
    "image_to_tensor",
    "swap_left_right",
    "write_token_shards",
    "read_token_meta",
    "TokenShards",
]

log = logging.getLogger(__name__)

# CLIP's image normalisation (the OpenAI/open_clip constants), used by every mmafm image tower.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
SPLITS = ("train", "val")
TOKEN_DTYPE = np.uint32


def split_of(key: str, val_fraction: float) -> str:
    """"val" for a stable ``val_fraction`` of keys (by SHA-1 of the key), else "train"."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    bucket = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if bucket < val_fraction else "train"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: the same pairs give byte-identical shards
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


class PairShardWriter:
    """Write :class:`~mmafm.data.Pair` records into train/val tar shards under ``out_dir``.

    Each shard is written to a temp file and renamed when full (or on :meth:`close`), so a
    killed run never leaves a truncated ``.tar`` behind. Existing ``<prefix>-*.tar`` files in
    ``out_dir`` are removed first: a re-run replaces the set.

    With ``shuffle_buffer`` > 0, encoded samples wait in a buffer of that size and leave it in a
    seeded random order, so a shard mixes sources even when they are written one after another
    (shard-level splitting between workers then still gives each worker a mix).
    """

    def __init__(
        self,
        out_dir: str | Path,
        val_fraction: float,
        shard_size: int = 1000,
        prefix: str = "pairs",
        shuffle_buffer: int = 0,
        seed: int = 0,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1 sample, got {shard_size}")
        split_of("probe", val_fraction)  # validates the fraction up front
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for old in self.out_dir.glob(f"{prefix}-*.tar"):
            old.unlink()
        self.val_fraction, self.shard_size, self.prefix = val_fraction, shard_size, prefix
        self.counts = {split: 0 for split in SPLITS}
        self.shards: dict[str, list[Path]] = {split: [] for split in SPLITS}
        self._open: dict[str, tuple[tarfile.TarFile, Path, Path] | None] = {split: None for split in SPLITS}
        self._in_shard = {split: 0 for split in SPLITS}
        self._keys: set[str] = set()
        self.shuffle_buffer = shuffle_buffer
        self._buffer: list[tuple[str, str, bytes, bytes, bytes]] = []
        self._rng = random.Random(f"shards-{seed}")

    def write(self, pair: Pair) -> str:
        """Add one pair; returns the split it went to."""
        if not pair.caption.strip():
            raise ValueError(f"pair {pair.key} ({pair.source} {pair.id}) has an empty caption")
        if "." in pair.key or "/" in pair.key:
            raise ValueError(f"pair key {pair.key!r} must not contain '.' or '/' (WebDataset splits on them)")
        if pair.key in self._keys:
            raise ValueError(f"duplicate pair key {pair.key!r} ({pair.source} {pair.id})")
        self._keys.add(pair.key)
        split = split_of(pair.key, self.val_fraction)
        meta = {"source": pair.source, "license": pair.license, "id": pair.id}
        encoded = (
            split,
            pair.key,
            _png_bytes(to_rgb(pair.image)),
            pair.caption.encode("utf-8"),
            json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        )
        self.counts[split] += 1
        if self.shuffle_buffer <= 0:
            self._emit(*encoded)
            return split
        self._buffer.append(encoded)
        if len(self._buffer) >= self.shuffle_buffer:
            self._emit(*self._buffer.pop(self._rng.randrange(len(self._buffer))))
        return split

    def _emit(self, split: str, key: str, png: bytes, txt: bytes, meta: bytes) -> None:
        if self._open[split] is None:
            index = len(self.shards[split])
            final = self.out_dir / f"{self.prefix}-{split}-{index:06d}.tar"
            temp = final.with_name(f".{final.name}.tmp")
            self._open[split] = (tarfile.open(temp, "w", format=tarfile.USTAR_FORMAT), temp, final)
        tar = self._open[split][0]
        _add_member(tar, f"{key}.png", png)
        _add_member(tar, f"{key}.txt", txt)
        _add_member(tar, f"{key}.json", meta)
        self._in_shard[split] += 1
        if self._in_shard[split] >= self.shard_size:
            self._finish(split)

    def _finish(self, split: str) -> None:
        opened = self._open[split]
        if opened is None:
            return
        tar, temp, final = opened
        tar.close()
        os.replace(temp, final)
        self.shards[split].append(final)
        self._open[split], self._in_shard[split] = None, 0

    def close(self) -> None:
        self._rng.shuffle(self._buffer)
        for encoded in self._buffer:
            self._emit(*encoded)
        self._buffer = []
        for split in SPLITS:
            self._finish(split)

    def __enter__(self) -> "PairShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        for split in SPLITS:  # failed run: drop half-written temp shards
            opened = self._open[split]
            if opened is not None:
                opened[0].close()
                opened[1].unlink(missing_ok=True)


class ShardReadError(tarfile.ReadError):
    """A pair shard that cannot be read to its end (truncated, corrupt, unreadable); the message
    names the file. A :class:`tarfile.ReadError`, so handlers of tar errors still catch it."""


def iter_tar_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Group a WebDataset tar's consecutive members by key: ``{"__key__", "png", "txt", ...}``.

    Raises:
        ShardReadError: the tar is missing, corrupt or truncated (after yielding the samples that
            precede the damage); the message names ``path`` and how many samples were read.
    """
    sample: dict[str, Any] = {}
    complete = 0  # samples yielded
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = Path(member.name).name
                key, _, ext = name.partition(".")
                if sample and sample["__key__"] != key:
                    complete += 1
                    yield sample
                    sample = {}
                sample["__key__"] = key
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ShardReadError(
            f"pair shard {path} cannot be read past sample {complete} ({type(error).__name__}: {error}); "
            "it is truncated, corrupt or gone: re-run the 00_data stage, or delete the file"
        ) from error
    if sample:
        yield sample


def expand_shards(paths_or_glob: str | Path | Sequence[str | Path], split: str | None = None) -> list[str]:
    """Shard paths from a glob, a folder (``pairs-<split>-*.tar``), a file, or a list of those."""
    items = [paths_or_glob] if isinstance(paths_or_glob, (str, Path)) else list(paths_or_glob)
    found: list[str] = []
    for item in items:
        item = str(item)
        if os.path.isdir(item):
            pattern = os.path.join(item, f"pairs-{split}-*.tar" if split else "pairs-*.tar")
            found.extend(sorted(globlib.glob(pattern)))
        elif any(char in item for char in "*?["):
            found.extend(sorted(globlib.glob(item)))
        elif os.path.isfile(item):
            found.append(item)
    if not found:
        wanted = f" (split {split!r})" if split else ""
        raise FileNotFoundError(
            f"no image-text shards found at {paths_or_glob!r}{wanted}; expected pairs-<split>-NNNNNN.tar "
            "files written by the 00_data stage"
        )
    return found


def decode_image(data: bytes) -> Image.Image | None:
    """A sample's PNG bytes as a fully read RGB image, or None where PIL cannot decode them."""
    try:
        with Image.open(io.BytesIO(data)) as raw:
            image = to_rgb(raw)
            image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    return image


def decode_pair_sample(sample: dict[str, Any]) -> tuple[Image.Image, str] | str:
    """``(RGB image, caption)`` of a pair shard sample for evaluation (a caption that is not
    UTF-8 is read with replacement characters), or why it is skipped: ``"empty caption or no
    image"`` or ``"undecodable image"``."""
    caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
    if not caption or "png" not in sample:
        return "empty caption or no image"
    image = decode_image(sample["png"])
    return "undecodable image" if image is None else (image, caption)


def swap_left_right(caption: str) -> str:
    """Swap the words left/right: a horizontally flipped image's caption must follow it."""
    swap = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}
    return re.sub(r"\b(left|right|Left|Right|LEFT|RIGHT)\b", lambda m: swap[m.group(1)], caption)


def _random_resized_crop_box(
    rng: random.Random, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters, drawn from ``rng`` (seeded per worker)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
            return left, top, left + crop_w, top + crop_h
    return 0, 0, width, height


def _normalise(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    tensor = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (tensor - mean) / std


def image_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """Evaluation transform: RGB, resize the short side, centre crop, normalise -> (3, S, S)."""
    image = to_rgb(image)
    width, height = image.size
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return _normalise(image.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box))


def _distributed_part() -> tuple[int, int]:
    """(index, count) of this (rank, DataLoader worker) among all readers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


# Why a sample of a pair shard is dropped: the keys of ImageTextShards.skipped
SKIP_REASONS = ("missing png or txt", "caption not UTF-8", "empty caption", "undecodable image", "corrupt shard")


class SkipCounts:
    """Counts of dropped samples by reason, shared by a reader and its DataLoader workers.

    A DataLoader worker iterates its own copy of the dataset (a fork, or an unpickled copy under
    spawn), so a plain dict of counts never reaches the main process. The counts live in one
    shared-memory int64 table instead, one row per reader process (row 0: the process that built
    it; row ``1 + id``: DataLoader worker ``id``), so no two processes ever write the same cell and
    no lock is needed; :meth:`totals` sums the rows. Shared memory follows the dataset into workers
    started by fork (the default on Linux), forkserver and spawn alike, and keeps counting across
    epochs (new workers reuse their rows). Each torch.distributed rank holds its own table.

    Args:
        reasons: the reasons that can be counted (:data:`SKIP_REASONS`).
        max_workers: DataLoader workers one reader may have.
    """

    def __init__(self, reasons: Sequence[str] = SKIP_REASONS, max_workers: int = 64):
        self.reasons = tuple(reasons)
        self.max_workers = max_workers
        self.table = torch.zeros(max_workers + 1, len(self.reasons), dtype=torch.int64).share_memory_()  # (P, R)

    def add(self, reason: str) -> None:
        """Count one ``reason`` for the calling process (its own row of the table)."""
        info = get_worker_info()
        if info is not None and info.id >= self.max_workers:
            raise RuntimeError(f"skip counts are kept for up to {self.max_workers} DataLoader workers, "
                               f"got worker {info.id}; lower num_workers")
        row = 0 if info is None else 1 + info.id
        self.table[row, self.reasons.index(reason)] += 1

    def totals(self) -> dict[str, int]:
        """``{reason: count}`` over every reader process, reasons never counted left out."""
        sums = self.table.sum(dim=0).tolist()  # (R,)
        return {reason: count for reason, count in zip(self.reasons, sums) if count}


class ImageTextShards(IterableDataset):
    """Stream (image tensor (3, S, S), caption or token ids) from WebDataset pair shards.

    Shards are divided between torch.distributed ranks and DataLoader workers (whole shards when
    there are at least as many shards as readers, else every k-th sample), so no sample is read
    twice per epoch. With ``train=True`` shard order and a sample buffer are shuffled by
    ``(seed, epoch)`` and each image gets a random resized crop and a horizontal flip (the
    caption's "left"/"right" swapped to match); otherwise samples come in order, resized and
    centre-cropped. Note that with shard-level splitting ranks may see different sample counts:
    a DDP trainer should run a fixed number of steps rather than whole epochs.

    Samples that cannot be used are skipped, logged and counted in :attr:`skipped` (reasons
    :data:`SKIP_REASONS`; counts of every DataLoader worker included, see :class:`SkipCounts`): an
    undecodable image, an empty caption, a sample missing ``png`` or ``txt``, and a truncated or
    otherwise unreadable shard, which counts once as "corrupt shard" (the samples before the damage
    are used; the log names the file). A training run thus survives a damaged shard as it survives a
    damaged sample; :func:`load_pairs` (held-out sets) stops instead. An image of another mode
    (L, RGBA, P, 16-bit grey) is converted to RGB by :func:`~mmafm.data.images.to_rgb`.

    Args:
        paths_or_glob: shard files, a glob, or the ``pairs`` folder (then ``split`` picks
            ``pairs-<split>-*.tar``; default "train" if ``train`` else "val").
        image_size: output side S in pixels.
        train: augment and shuffle.
        tokenize: optional ``caption -> ids``; its output is yielded as a LongTensor (pad it to
            a fixed length yourself if you batch with the default collate).
        seed: shuffling / augmentation seed.
        shuffle_buffer: samples held for shuffling when ``train``.
        crop_scale: area fraction range of the random resized crop.
        split: which split to read when ``paths_or_glob`` is a folder.
    """

    def __init__(
        self,
        paths_or_glob: str | Path | Sequence[str | Path],
        image_size: int,
        train: bool,
        tokenize: Callable[[str], Any] | None = None,
        seed: int = 0,
        shuffle_buffer: int = 512,
        crop_scale: tuple[float, float] = (0.8, 1.0),
        split: str | None = None,
    ):
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        self.shards = expand_shards(paths_or_glob, split or ("train" if train else "val"))
        self.image_size, self.train, self.tokenize = image_size, train, tokenize
        self.seed, self.shuffle_buffer, self.crop_scale = seed, shuffle_buffer, crop_scale
        self.epoch = 0
        self.skip_counts = SkipCounts()

    @property
    def skipped(self) -> dict[str, int]:
        """``{reason: samples skipped}`` since this reader was built, over all its workers."""
        return self.skip_counts.totals()

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of the next iteration (call before each epoch for a new order)."""
        self.epoch = epoch

    def _skip(self, reason: str, where: str) -> None:
        self.skip_counts.add(reason)
        log.warning("skipping %s: %s", where, reason)

    def _samples(self, shards: list[str], part: int, parts: int, by_sample: bool) -> Iterator[dict]:
        index = 0
        for position, shard in enumerate(shards):
            try:
                for sample in iter_tar_samples(shard):
                    if by_sample and index % parts != part:
                        index += 1
                        continue
                    index += 1
                    yield sample
            except ShardReadError as error:
                # split by sample, every reader reads every shard: one of them counts the damage
                if not by_sample or position % parts == part:
                    self.skip_counts.add("corrupt shard")
                    log.warning("skipping the rest of a damaged shard: %s", error)

    def _decode(self, sample: dict, rng: random.Random) -> tuple[torch.Tensor, Any] | None:
        where = f"sample {sample.get('__key__')}"
        if "png" not in sample or "txt" not in sample:
            self._skip("missing png or txt", where)
            return None
        try:
            caption = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            self._skip("caption not UTF-8", where)
            return None
        if not caption:
            self._skip("empty caption", where)
            return None
        image = decode_image(sample["png"])
        if image is None:
            self._skip("undecodable image", where)
            return None
        if self.train:
            box = _random_resized_crop_box(rng, image.width, image.height, self.crop_scale)
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box)
            if rng.random() < 0.5:
                image, caption = ImageOps.mirror(image), swap_left_right(caption)
            tensor = _normalise(image)
        else:
            tensor = image_to_tensor(image, self.image_size)
        if self.tokenize is None:
            return tensor, caption
        ids = self.tokenize(caption)
        return tensor, ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids, dtype=torch.long)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        part, parts = _distributed_part()
        shards = list(self.shards)
        rng = random.Random(f"{self.seed}-{self.epoch}")  # same on every rank: a consistent split
        if self.train:
            rng.shuffle(shards)
        by_sample = len(shards) < parts
        if not by_sample:
            shards = shards[part::parts]
        rng = random.Random(f"{self.seed}-{self.epoch}-{part}")  # this reader's augmentation
        samples = self._samples(shards, part, parts, by_sample)
        if not self.train:
            for sample in samples:
                decoded = self._decode(sample, rng)
                if decoded is not None:
                    yield decoded
            return
        buffer: list[dict] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                decoded = self._decode(buffer.pop(rng.randrange(len(buffer))), rng)
                if decoded is not None:
                    yield decoded
        rng.shuffle(buffer)
        for sample in buffer:
            decoded = self._decode(sample, rng)
            if decoded is not None:
                yield decoded


def load_pairs(
    pairs_dir: str | Path, split: str = "val", limit: int | None = None
) -> list[tuple[Image.Image, str]]:
    """All (RGB image, caption) pairs of one split, in shard order (for evaluation and plots).

    Samples with an undecodable image or an empty caption are skipped (with a warning). A damaged
    shard is not: a held-out set that silently loses the end of a shard would change the metrics
    measured on it, so the error names the file.

    Raises:
        ShardReadError: a shard of the split is truncated or unreadable.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pairs: list[tuple[Image.Image, str]] = []
    for shard in expand_shards(pairs_dir, split):
        for sample in iter_tar_samples(shard):
            decoded = decode_pair_sample(sample)
            if isinstance(decoded, str):
                log.warning("skipping sample %s of %s: %s", sample["__key__"], shard, decoded)
                continue
            pairs.append(decoded)
            if limit is not None and len(pairs) >= limit:
                return pairs
    return pairs


# ------------------------------------------------------------------------------- token shards
def write_token_shards(
    documents: Iterable[tuple[str, str]],
    tokenizer: Any,
    out_dir: str | Path,
    val_fraction: float,
    batch_size: int = 512,
) -> dict:
    """Tokenize ``(doc_id, text)`` documents into ``train.bin`` / ``val.bin`` + ``meta.json``.

    Each document's ids are followed by EOS; a document goes to the split :func:`split_of` gives
    its id. Files are written beside their final name and renamed at the end.

    Returns:
        The metadata written to ``meta.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    temps = {split: out_dir / f".{split}.bin.tmp" for split in SPLITS}
    handles = {split: open(temps[split], "wb") for split in SPLITS}
    counts = {split: 0 for split in SPLITS}
    docs = {split: 0 for split in SPLITS}
    lengths: list[int] = []  # tokens per document

    def flush(batch: list[tuple[str, str]]) -> None:
        for (doc_id, _), ids in zip(batch, tokenizer.encode_batch([text for _, text in batch], eos=True)):
            split = split_of(doc_id, val_fraction)
            np.asarray(ids, dtype=TOKEN_DTYPE).tofile(handles[split])
            counts[split] += len(ids)
            docs[split] += 1
            lengths.append(len(ids))

    try:
        batch: list[tuple[str, str]] = []
        for doc_id, text in documents:
            if text.strip():
                batch.append((doc_id, text))
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        flush(batch)
    except BaseException:
        for split in SPLITS:
            handles[split].close()
            temps[split].unlink(missing_ok=True)
        raise
    for split in SPLITS:
        handles[split].close()
        os.replace(temps[split], out_dir / f"{split}.bin")
    if counts["train"] == 0:
        raise ValueError(f"no tokens written to {out_dir / 'train.bin'}: every document was empty")
    meta = {
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "count": counts,
        "documents": docs,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": str(tokenizer.path) if tokenizer.path else None,
        "doc_length_mean": float(np.mean(lengths)) if lengths else 0.0,
    }
    atomic_write_json(out_dir / "meta.json", meta)
    return meta


def read_token_meta(tokens_dir: str | Path) -> dict:
    path = Path(tokens_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"token shard metadata not found: {path} (run the 00_data stage)")
    return json.loads(path.read_text())


class TokenShards:
    """Deterministic (input_ids, targets) LongTensor batches (B, T) from a token ``.bin`` file.

    An iteration visits the non-overlapping windows of ``seq_len + 1`` tokens (targets are the
    inputs shifted by one) in an order fixed by ``(seed, epoch)``; the last partial batch is
    dropped. Iterating twice gives the same batches unless :meth:`set_epoch` is called, which is
    what lets a resumed run fast-forward to exactly where it stopped. Under torch.distributed
    (and ``shard_by_rank``) rank r takes batches r, r + W, ...: ``batch_size`` is per rank.

    Args:
        path: a ``.bin`` file, or the tokens folder (then ``split`` picks ``<split>.bin``).
        seq_len: tokens per row T.
        batch_size: rows per batch B.
        seed: order seed.
        split: "train" or "val" when ``path`` is a folder.
        shard_by_rank: split batches between distributed ranks.
    """

    def __init__(
        self,
        path: str | Path,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        split: str = "train",
        shard_by_rank: bool = True,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        path = Path(path)
        if path.is_dir():
            path = path / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"token shard not found: {path} (run the 00_data stage)")
        self.path, self.seq_len, self.batch_size, self.seed = path, seq_len, batch_size, seed
        self.shard_by_rank = shard_by_rank
        self.epoch = 0
        self.tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r") if path.stat().st_size else np.zeros(0, TOKEN_DTYPE)
        self.num_windows = max(0, (len(self.tokens) - 1) // seq_len)
        if self.num_windows < batch_size:
            raise ValueError(
                f"{path} holds {len(self.tokens)} tokens, fewer than one batch of "
                f"{batch_size} x {seq_len} (+1) tokens; lower batch_size/seq_len or add text"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
        count = self.num_windows // self.batch_size
        batches = order[: count * self.batch_size].reshape(count, self.batch_size)  # (N, B)
        if self.shard_by_rank and torch.distributed.is_available() and torch.distributed.is_initialized():
            batches = batches[torch.distributed.get_rank() :: torch.distributed.get_world_size()]
        return batches

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        offsets = np.arange(self.seq_len + 1)
        for windows in self._batches():
            rows = np.asarray(self.tokens[windows[:, None] * self.seq_len + offsets], dtype=np.int64)  # (B, T+1)
            rows_t = torch.from_numpy(rows)
            yield rows_t[:, :-1], rows_t[:, 1:]
