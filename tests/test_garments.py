"""Tests of the drawn garment silhouettes (mmafm.data.garments) and their data-stage wiring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmafm.data import garments
from mmafm.data.garments import CLASSES, NOUNS, describe, garment_pair, generate_pairs, render, sample_garment

# Words a caption of each class must contain (written here, independently of NOUNS).
CLASS_WORDS = {
    "tshirt": ("t-shirt", "t shirt", "tee shirt", "top"),
    "trousers": ("trousers", "pants", "jeans"),
    "pullover": ("pullover", "sweater", "jumper"),
    "dress": ("dress",),
    "coat": ("coat", "jacket"),
    "sandal": ("sandal", "open shoe"),
    "shirt": ("shirt", "blouse"),
    "sneaker": ("sneaker", "running shoe", "trainer", "sports shoe"),
    "bag": ("bag", "purse"),
    "ankle_boot": ("boot",),
}


def test_classes_follow_fashion_mnist_order():
    from mmafm.data.fashion_mnist import CLASS_NAMES

    assert len(CLASSES) == len(CLASS_NAMES) == 10
    first_words = [name.split("/")[0].lower().replace("-", "") for name in CLASS_NAMES]
    assert [c.replace("_", " ") for c in CLASSES][:2] == ["tshirt", "trousers"] and first_words[:2] == ["tshirt", "trouser"]
    assert CLASSES[9] == "ankle_boot" and first_words[9] == "ankle boot"


def test_deterministic_by_seed_and_independent_of_n():
    a = list(generate_pairs(12, seed=3, image_size=24))
    b = list(generate_pairs(12, seed=3, image_size=24))
    assert [p.caption for p in a] == [p.caption for p in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [p.key for p in a] == [p.key for p in b] and len({p.key for p in a}) == 12
    single = garment_pair(7, seed=3, image_size=24)  # sample 7 alone equals sample 7 of a run
    assert single.caption == a[7].caption and np.array_equal(np.asarray(single.image), np.asarray(a[7].image))
    other = list(generate_pairs(12, seed=4, image_size=24))
    assert sum(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, other)) == 0


def test_every_class_drawn_and_named_in_its_caption():
    pairs = list(generate_pairs(40, seed=0, image_size=32))
    for index, pair in enumerate(pairs):
        kind = CLASSES[index % 10]
        assert any(word in pair.caption for word in CLASS_WORDS[kind]), (kind, pair.caption)
        assert pair.image.size == (32, 32) and pair.image.mode == "RGB"
        assert pair.source == "garments" and pair.license == "CC0-1.0"
        pixels = np.asarray(pair.image).astype(int)
        assert np.abs(pixels - pixels[0, 0]).sum(-1).max() > 40, "the garment is visible on its background"


def test_caption_grammar():
    import random

    rng = random.Random(0)
    for kind in CLASSES:
        for _ in range(20):
            garment = sample_garment(rng, kind)
            caption = describe(garment)
            assert garment.colour in caption
            assert garment.noun.replace("pair of ", "") in caption
            assert caption.startswith(("a ", "an ")) or caption.split(" a ")[0] in ("a drawing of", "a picture of", "a photo of")
            if garment.pattern != "plain":
                assert garment.pattern_word in caption
            assert " an " + garment.colour[0] not in caption or garment.colour[0] in "aeiou"
    assert NOUNS["trousers"][0].startswith("pair of")


def _silhouette(image, size=16) -> np.ndarray:
    """Foreground mask (pixels unlike the corner colour) cropped to its box and resized: shape only."""
    from PIL import Image

    pixels = np.asarray(image).astype(float)
    mask = Image.fromarray(((np.abs(pixels - pixels[0, 0]).sum(-1) > 30) * 255).astype(np.uint8))
    box = mask.getbbox()
    assert box is not None, "empty silhouette"
    return np.asarray(mask.crop(box).resize((size, size), Image.Resampling.BOX), dtype=float).ravel() / 255.0


def test_classes_differ_in_shape_nearest_centroid():
    """A nearest-centroid classifier on colourless silhouettes separates the ten classes."""
    per_class, train = 24, 16
    feats = {kind: [] for kind in CLASSES}
    for index in range(per_class * 10):
        feats[CLASSES[index % 10]].append(_silhouette(garment_pair(index, seed=1, image_size=32).image))
    centroids = np.stack([np.mean(feats[kind][:train], axis=0) for kind in CLASSES])  # (10, 256)
    correct = total = 0
    for label, kind in enumerate(CLASSES):
        for feat in feats[kind][train:]:
            correct += int(np.argmin(((centroids - feat) ** 2).sum(-1)) == label)
            total += 1
    assert correct / total > 0.5, f"nearest-centroid accuracy {correct / total:.2f} (chance 0.10)"


def test_bad_input():
    import random

    with pytest.raises(ValueError, match="garment pairs must be >= 0"):
        list(generate_pairs(-1))
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        list(generate_pairs(2, image_size=4))
    with pytest.raises(ValueError, match="unknown garment class 'hat'"):
        sample_garment(random.Random(0), "hat")


def test_render_is_pure():
    import random

    garment = sample_garment(random.Random(5), "dress")
    assert np.array_equal(np.asarray(render(garment, 20)), np.asarray(render(garment, 20)))


def test_data_stage_garments_source(tmp_path):
    from mmafm.config import ConfigError, from_dict
    from mmafm.stages.data import DataStageConfig, run

    with pytest.raises(ConfigError, match="garment_pairs"):
        from_dict(DataStageConfig, {"garment_pairs": -1})
    cfg = DataStageConfig(
        out_dir=str(tmp_path), image_sources="garments", garment_pairs=100, image_size=16,
        text_sources="captions", fashion_mnist=False, vocab_size=300, shard_size=50, val_fraction=0.1,
    )
    run(cfg)
    entry = json.loads((tmp_path / "data_card_stats.json").read_text())["image_sources"]["garments"]
    assert entry["kept"] == 100 and entry["train"] + entry["val"] == 100
    assert entry["license"] == garments.LICENSE
    with pytest.raises(ValueError, match="garment_pairs = 0"):
        run(DataStageConfig(out_dir=str(tmp_path / "empty"), image_sources="garments", garment_pairs=0,
                            text_sources="captions", fashion_mnist=False))
