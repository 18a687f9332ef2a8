"""Interleaved image-text documents built from the data stage's image-caption pairs.

The 2025 report's multimodal adaptation continues pretraining on a mixture of text-only data,
image-text pairs and *interleaved* image-text documents (web pages with several images inside the
text). We have no web crawl, so a document here is made from the bundled sources: several images
of one source (the data stage's pairs: shape scenes, garment drawings, emoji, OpenClipArt, Tux
Paint stamps; ``data_cards/``) placed inside a short text, each image's caption written as the
text around it, sometimes just before the image ("Next, a red star: <image>"), sometimes just
after it ("<image> This one shows a red star."). A model trained on such documents must keep
several images in context and tie each caption to the image next to it
(``data_cards/interleaved.md``).

A document is text with one ``<image>`` placeholder (:data:`mmafm.tokenizer.IMAGE_TOKEN`) per
image, and the indices of its images in the pair pool in placeholder (reading) order; the
:class:`~mmafm.models.multimodal.MultimodalModel` expands each placeholder into the image's
tokens. Building is deterministic: document ``i`` of a seed is drawn from
``random.Random("mmafm-interleaved-<seed>-<i>")``, so it is the same whatever the count drawn.

>>> pool, skipped = load_sourced_pairs("runs/tiny/00_data/pairs", "train")
>>> docs = build_documents([p.caption for p in pool], [p.source for p in pool], count=100, seed=0)
>>> docs[0].text   # 'Two pictures from the clothing drawings. <image> A photo of a pink shirt. ...'
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from mmafm.data.shards import decode_pair_sample, expand_shards, iter_tar_samples
from mmafm.tokenizer import IMAGE_TOKEN

__all__ = [
    "SourcedPair",
    "InterleavedDocument",
    "BEFORE_TEMPLATES",
    "AFTER_TEMPLATES",
    "SOURCE_NAMES",
    "load_sourced_pairs",
    "caption_phrase",
    "build_documents",
    "encode_document",
    "document_counts",
]

log = logging.getLogger(__name__)

# the caption written just before its image: the text announces what comes
BEFORE_TEMPLATES = ("Next, {caption}: {image}", "Here is {caption}. {image}", "Below: {caption}. {image}")
# the caption written just after its image: the text describes what was shown
AFTER_TEMPLATES = ("{image} This one shows {caption}.", "{image} Above: {caption}.", "{image} {Caption}.")
# how a document's opening line names its source (a source not listed is named as it is)
SOURCE_NAMES = {
    "synthetic": "the shapes",
    "garments": "the clothing drawings",
    "emoji": "the emoji",
    "openclipart": "the clip art",
    "tuxpaint": "the Tux Paint stamps",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class SourcedPair:
    """One image-caption pair of a shard, with the source the data stage recorded for it."""

    image: Image.Image  # RGB
    caption: str
    source: str


@dataclass(frozen=True)
class InterleavedDocument:
    """Text with one ``<image>`` per image, and which images go there."""

    text: str  # holds exactly len(images) IMAGE_TOKEN placeholders
    images: tuple[int, ...]  # indices into the pair pool, in placeholder (reading) order
    source: str  # the source every image of the document comes from
    placement: tuple[str, ...]  # per image, "before" / "after": where its caption sits


def load_sourced_pairs(pairs_dir: str | Path, split: str, limit: int = 0) -> tuple[list[SourcedPair], dict[str, int]]:
    """Every ``(image, caption, source)`` of a split of the data stage's pair shards, in shard order.

    The source comes from each sample's ``.json`` record (``{"source": ...}``, written by
    :class:`mmafm.data.shards.PairShardWriter`); a sample without one is ``"unknown"``.

    Args:
        pairs_dir: The data stage's ``pairs_dir`` (``pairs-<split>-*.tar``).
        split: ``"train"`` or ``"val"``.
        limit: Stop after this many pairs (0 = all).

    Returns:
        ``(pairs, skipped)``: the pairs, and how many samples were skipped, by reason (an empty
        caption or an undecodable image is skipped; a damaged shard raises
        :class:`~mmafm.data.shards.ShardReadError` naming the file).
    """
    pairs: list[SourcedPair] = []
    skipped = {"empty caption or no image": 0, "undecodable image": 0}
    for shard in expand_shards(pairs_dir, split):
        for sample in iter_tar_samples(shard):
            decoded = decode_pair_sample(sample)
            if isinstance(decoded, str):
                skipped[decoded] += 1
                if decoded == "undecodable image":
                    log.warning("skipping sample %s of %s: undecodable image", sample["__key__"], shard)
                continue
            image, caption = decoded
            try:
                source = str(json.loads(sample.get("json", b"{}")).get("source", "unknown"))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                source = "unknown"
            pairs.append(SourcedPair(image, caption, source))
            if limit and len(pairs) >= limit:
                return pairs, skipped
    return pairs, skipped


def caption_phrase(caption: str) -> str:
    """A caption as a phrase inside a sentence: no trailing period, a leading capitalised article
    ("A", "An", "The") lower-cased, everything else as written."""
    phrase = caption.strip().rstrip(".").strip()
    first, _, rest = phrase.partition(" ")
    if first in ("A", "An", "The") and rest:
        phrase = f"{first.lower()} {rest}"
    return phrase


def _image_sentence(caption: str, placement: str, rng: random.Random) -> str:
    """One image's placeholder with its caption just ``"before"`` or just ``"after"`` it."""
    phrase = caption_phrase(caption)
    templates = BEFORE_TEMPLATES if placement == "before" else AFTER_TEMPLATES
    template = templates[rng.randrange(len(templates))]
    return template.format(caption=phrase, Caption=phrase[:1].upper() + phrase[1:], image=IMAGE_TOKEN)


def build_documents(
    captions: Sequence[str],
    sources: Sequence[str],
    count: int,
    seed: int,
    min_images: int = 2,
    max_images: int = 4,
) -> list[InterleavedDocument]:
    """``count`` interleaved documents over a pool of captioned images.

    Document ``i``: a source drawn uniformly among those holding at least ``min_images`` pairs;
    ``k`` images of it (``k`` uniform in ``[min_images, max_images]``, capped by what the source
    holds), distinct, drawn without replacement; an opening line naming the source and the number
    of pictures; then per image its placeholder with its caption (:func:`caption_phrase`) in one
    of the :data:`AFTER_TEMPLATES` (images before a switch point drawn uniformly in ``[0, k]``)
    or the :data:`BEFORE_TEMPLATES` (the rest), so no two images stand side by side.

    Args:
        captions: The pool's captions (``captions[j]`` describes image ``j``).
        sources: The pool's sources, one per caption.
        count: Documents to build.
        seed: Draws everything; the same seed gives the same documents.
        min_images: Fewest images in a document (>= 1).
        max_images: Most images in a document (>= ``min_images``).

    Raises:
        ValueError: mismatched lengths, bad image counts, or no source with ``min_images`` pairs.
    """
    if len(captions) != len(sources):
        raise ValueError(f"build_documents: {len(captions)} captions but {len(sources)} sources; one source per caption")
    if not 1 <= min_images <= max_images:
        raise ValueError(f"build_documents: need 1 <= min_images <= max_images, got {min_images} and {max_images}")
    if count < 0:
        raise ValueError(f"build_documents: count must be >= 0, got {count}")
    by_source: dict[str, list[int]] = {}
    for index, source in enumerate(sources):
        by_source.setdefault(source, []).append(index)
    usable = sorted(name for name, items in by_source.items() if len(items) >= min_images)
    if not usable:
        sizes = {name: len(items) for name, items in sorted(by_source.items())}
        raise ValueError(
            f"build_documents: no source holds min_images={min_images} pairs (pairs per source: {sizes}); "
            "lower min_images or give more pairs"
        )
    documents = []
    for index in range(count):
        rng = random.Random(f"mmafm-interleaved-{seed}-{index}")
        source = usable[rng.randrange(len(usable))]
        pool = by_source[source]
        k = min(rng.randint(min_images, max_images), len(pool))
        chosen = tuple(rng.sample(pool, k))
        name = SOURCE_NAMES.get(source, f"the {source} collection")
        opening = f"{NUMBER_WORDS[k].capitalize() if k < len(NUMBER_WORDS) else k} pictures from {name}."
        # captions after their image up to a switch point, before it from there on: two images
        # never stand side by side, so each caption has one image next to it
        switch = rng.randint(0, k)
        placement = tuple("after" if position < switch else "before" for position in range(k))
        sentences = [_image_sentence(captions[j], place, rng) for j, place in zip(chosen, placement)]
        documents.append(InterleavedDocument(" ".join([opening, *sentences]), chosen, source, placement))
    return documents


def encode_document(document: InterleavedDocument, tokenizer: Any, max_tokens: int) -> tuple[list[int], tuple[int, ...]]:
    """``(ids, images)``: ``<s> text </s>`` as token ids, cut to ``max_tokens``, and the images
    whose placeholders survive the cut (those after it are dropped with their placeholder).

    Raises:
        ValueError: the tokenizer does not turn ``<image>`` into one placeholder per image.
    """
    body = tokenizer.encode(document.text)
    if sum(token == tokenizer.image_id for token in body) != len(document.images):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'path', '')} does not encode {IMAGE_TOKEN!r} as one piece "
            f"(id {tokenizer.image_id}) per image of the document: {document.text[:80]!r}..."
        )
    ids = ([tokenizer.bos_id] + body + [tokenizer.eos_id])[:max_tokens]
    kept = sum(token == tokenizer.image_id for token in ids)
    return ids, document.images[:kept]


def document_counts(documents: Sequence[InterleavedDocument]) -> dict[str, Any]:
    """Counts for the data card: documents, images, images per document, documents per source."""
    images = [len(d.images) for d in documents]
    per_source: dict[str, int] = {}
    for document in documents:
        per_source[document.source] = per_source.get(document.source, 0) + 1
    return {
        "documents": len(documents),
        "images": sum(images),
        "images_per_document": {str(k): images.count(k) for k in sorted(set(images))},
        "documents_per_source": dict(sorted(per_source.items())),
        "mean_characters": round(sum(len(d.text) for d in documents) / max(len(documents), 1), 1),
    }
