"""Interleaved image-text documents (mmafm.data.interleaved): built deterministically from a
captioned pool, each caption next to its own image, read back from real pair shards, encoded with
one placeholder per image.

References: the documents are parsed back by hand (split at the placeholders) and checked against
the pool they were drawn from; the tokenizer's own encoding of the text; hand-counted totals.
"""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from mmafm.data import Pair
from mmafm.data.interleaved import (
    AFTER_TEMPLATES,
    BEFORE_TEMPLATES,
    NUMBER_WORDS,
    SOURCE_NAMES,
    InterleavedDocument,
    build_documents,
    caption_phrase,
    document_counts,
    encode_document,
    load_sourced_pairs,
)
from mmafm.tokenizer import IMAGE_TOKEN

CAPTIONS = [f"a {size} {colour} {shape} on the left." for size in ("small", "large")
            for colour in ("red", "blue", "green") for shape in ("circle", "square", "star")]  # 18
SOURCES = ["synthetic"] * 12 + ["emoji"] * 5 + ["tuxpaint"]  # tuxpaint holds one pair only


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mmafm.tokenizer import train_tokenizer

    texts = [f"{template} {caption}" for caption in CAPTIONS for template in ("Next,", "Here is", "This one shows")]
    return train_tokenizer(texts * 4, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=300)


def test_caption_phrase():
    assert caption_phrase("A Magellanic penguin.") == "a Magellanic penguin"
    assert caption_phrase("The letter E") == "the letter E"
    assert caption_phrase("Map of Finland: map, finland") == "Map of Finland: map, finland"
    assert caption_phrase("  emoji of fox: face.  ") == "emoji of fox: face"


def test_documents_are_deterministic_and_independent_of_the_count():
    docs = build_documents(CAPTIONS, SOURCES, count=30, seed=3)
    assert docs == build_documents(CAPTIONS, SOURCES, count=30, seed=3)
    assert docs != build_documents(CAPTIONS, SOURCES, count=30, seed=4)
    assert build_documents(CAPTIONS, SOURCES, count=7, seed=3) == docs[:7]  # document i depends on (seed, i) only
    assert build_documents(CAPTIONS, SOURCES, count=0, seed=3) == []


def _check_document(doc: InterleavedDocument, min_images: int, max_images: int) -> None:
    """Parse a document back by hand and check it against the pool it came from."""
    k = len(doc.images)
    assert min_images <= k <= max_images and len(set(doc.images)) == k
    assert all(SOURCES[j] == doc.source for j in doc.images)
    assert doc.text.count(IMAGE_TOKEN) == k and len(doc.placement) == k
    pieces = doc.text.split(IMAGE_TOKEN)  # the text around the images: k + 1 pieces
    opening = f"{NUMBER_WORDS[k].capitalize()} pictures from {SOURCE_NAMES[doc.source]}."
    assert doc.text.startswith(opening)
    assert all(piece.strip() for piece in pieces[1:-1]), "two images side by side"
    # captions after their images first, then before: never "before" followed by "after"
    assert list(doc.placement) == sorted(doc.placement, key=["after", "before"].index)
    for index, (j, placed) in enumerate(zip(doc.images, doc.placement)):
        phrase = caption_phrase(CAPTIONS[j])
        if placed == "before":  # the caption ends the text just before the image
            text = pieces[index].rstrip()
            assert text.endswith((f"{phrase}:", f"{phrase}.")), (text, phrase)
            assert any(text.endswith(t.format(caption=phrase, image="").rstrip()) for t in BEFORE_TEMPLATES)
        else:  # the caption opens the text just after the image
            text = pieces[index + 1].lstrip()
            starts = [t.format(caption=phrase, Caption=phrase[:1].upper() + phrase[1:], image="").strip()
                      for t in AFTER_TEMPLATES]
            assert any(text.startswith(s) for s in starts), (text, phrase)


def test_every_caption_sits_next_to_its_image():
    docs = build_documents(CAPTIONS, SOURCES, count=200, seed=0, min_images=2, max_images=4)
    for doc in docs:
        _check_document(doc, 2, 4)
    # the one-pair source never makes a document; both others do; every image count occurs
    assert {doc.source for doc in docs} == {"synthetic", "emoji"}
    assert {len(doc.images) for doc in docs} == {2, 3, 4}
    # placement: the switch point is uniform in [0, k], so half the captions come after their image
    placements = [p for doc in docs for p in doc.placement]
    assert 0.35 < placements.count("after") / len(placements) < 0.65


def test_images_capped_by_the_source():
    docs = build_documents(CAPTIONS, SOURCES, count=50, seed=1, min_images=5, max_images=9)
    assert {doc.source for doc in docs} == {"synthetic", "emoji"}
    assert max(len(d.images) for d in docs if d.source == "emoji") == 5  # the source holds 5
    for doc in docs:
        assert len(doc.images) <= (12 if doc.source == "synthetic" else 5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="18 captions but 3 sources"):
        build_documents(CAPTIONS, SOURCES[:3], count=1, seed=0)
    with pytest.raises(ValueError, match="min_images <= max_images"):
        build_documents(CAPTIONS, SOURCES, count=1, seed=0, min_images=3, max_images=2)
    with pytest.raises(ValueError, match=r"no source holds min_images=13 pairs .*'synthetic': 12"):
        build_documents(CAPTIONS, SOURCES, count=1, seed=0, min_images=13, max_images=14)


def test_encode_keeps_one_placeholder_per_image(tokenizer):
    doc = build_documents(CAPTIONS, SOURCES, count=1, seed=5, min_images=3, max_images=3)[0]
    ids, images = encode_document(doc, tokenizer, max_tokens=10_000)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert ids[1:-1] == tokenizer.encode(doc.text) and images == doc.images
    assert sum(t == tokenizer.image_id for t in ids) == 3
    # a cut after the second placeholder keeps two images
    second = [i for i, t in enumerate(ids) if t == tokenizer.image_id][1]
    cut, kept = encode_document(doc, tokenizer, max_tokens=second + 1)
    assert len(cut) == second + 1 and kept == doc.images[:2]
    bad = InterleavedDocument("no placeholder here", (0,), "synthetic", ("after",))
    with pytest.raises(ValueError, match="one piece"):
        encode_document(bad, tokenizer, 100)


def test_counts():
    docs = [InterleavedDocument(f"{IMAGE_TOKEN} a. {IMAGE_TOKEN} b.", (0, 1), "emoji", ("after", "after")),
            InterleavedDocument(f"x {IMAGE_TOKEN} {IMAGE_TOKEN} y {IMAGE_TOKEN}", (2, 3, 4), "synthetic", ("after",) * 3)]
    counts = document_counts(docs)
    assert counts["documents"] == 2 and counts["images"] == 5
    assert counts["images_per_document"] == {"2": 1, "3": 1}
    assert counts["documents_per_source"] == {"emoji": 1, "synthetic": 1}
    assert counts["mean_characters"] == pytest.approx((len(docs[0].text) + len(docs[1].text)) / 2, abs=0.05)


def test_load_sourced_pairs_reads_the_source_of_each_shard_sample(tmp_path):
    from mmafm.data.shards import PairShardWriter
    from mmafm.data.synthetic import generate_pairs

    generated = list(generate_pairs(12, seed=0, image_size=16))
    with PairShardWriter(tmp_path, val_fraction=0.0, shard_size=5) as writer:
        for index, pair in enumerate(generated):
            source = "emoji" if index % 3 == 0 else pair.source
            writer.write(Pair(pair.key, pair.image, pair.caption, source, pair.license, pair.id))
    pairs, skipped = load_sourced_pairs(tmp_path, "train")
    assert skipped == {"empty caption or no image": 0, "undecodable image": 0}
    want = {p.caption: ("emoji" if i % 3 == 0 else p.source) for i, p in enumerate(generated)}
    assert {p.caption: p.source for p in pairs} == want and len(pairs) == 12
    assert pairs[0].image.mode == "RGB" and pairs[0].image.size == (16, 16)
    assert len(load_sourced_pairs(tmp_path, "train", limit=4)[0]) == 4

    # a sample with an undecodable image is skipped and counted
    shard = tmp_path / "pairs-train-000009.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("bad.png", b"not a png"), ("bad.txt", b"a caption"), ("bad.json", json.dumps({"source": "x"}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pairs, skipped = load_sourced_pairs(tmp_path, "train")
    assert len(pairs) == 12 and skipped["undecodable image"] == 1
