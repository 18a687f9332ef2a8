"""Data built in and on disk, without the Debian packages: synthetic scenes, shards, splits,
token shards, the stage on synthetic data, and bad data. Real sources: test_data_real.py."""

import gzip
import hashlib
import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from mmafm.config import ConfigError, from_dict
from mmafm.data import DataPackageMissing, EmptySourceError, Pair, SourceStats, require_path
from mmafm.data import fashion_mnist, sources
from mmafm.data.images import to_rgb
from mmafm.data.shards import (
    IMAGE_MEAN,
    IMAGE_STD,
    ImageTextShards,
    PairShardWriter,
    ShardReadError,
    TokenShards,
    iter_tar_samples,
    image_to_tensor,
    load_pairs,
    read_token_meta,
    split_of,
    swap_left_right,
    write_token_shards,
)
from mmafm.data.synthetic import COLOURS, POSITIONS, SHAPES, generate_pairs, sample_scene, synthetic_pair
from mmafm.stages.base import read_manifest
from mmafm.stages.data import DataStageConfig, run
from mmafm.tokenizer import train_tokenizer


# ----------------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_by_seed():
    first = list(generate_pairs(6, seed=3, image_size=32))
    again = list(generate_pairs(6, seed=3, image_size=32))
    other = list(generate_pairs(6, seed=4, image_size=32))
    assert [p.caption for p in first] == [p.caption for p in again]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, again))
    assert [p.caption for p in first] != [p.caption for p in other]
    # sample i does not depend on how many are drawn
    assert synthetic_pair(4, 3, 32).image.tobytes() == first[4].image.tobytes()
    assert len({p.key for p in generate_pairs(500, seed=0, image_size=8)}) == 500


_CAPTION = re.compile(
    r"(a|two|three|four) (small|large) (" + "|".join(COLOURS) + r") (" + "|".join(list(SHAPES) + list(SHAPES.values()))
    + r") (" + "|".join(POSITIONS) + r")"
)


def test_synthetic_caption_grammar_matches_pixels():
    """Parse each caption back; the named colour must be drawn inside the named region."""
    size = 64
    for pair in generate_pairs(60, seed=1, image_size=size):
        groups = _CAPTION.findall(pair.caption)
        assert groups, pair.caption
        assert pair.image.mode == "RGB" and pair.image.size == (size, size)
        pixels = np.asarray(pair.image).astype(int)
        for number, _size, colour, shape, position in groups:
            assert (number == "a") == (shape in SHAPES), f"number/plural disagree: {pair.caption}"
            close = np.abs(pixels - np.array(COLOURS[colour])).sum(-1) < 30  # (H, W)
            x0, y0, x1, y1 = (round(v * size) for v in POSITIONS[position])
            assert close[y0:y1, x0:x1].sum() > 3, f"{colour} not in {position}: {pair.caption}"
            if len(groups) == 1:
                ys, xs = np.nonzero(close)
                assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1, pair.caption


def test_synthetic_two_groups_are_distinguishable():
    import random

    for index in range(200):
        scene = sample_scene(random.Random(index))
        if len(scene.groups) == 2:
            a, b = scene.groups
            assert (a.colour, a.shape) != (b.colour, b.shape)
            assert a.position != b.position


# -------------------------------------------------------------------------------------- splits
def test_hash_split_is_stable_and_proportional():
    golden = "vtttvvttttvtvvvvvtvtvtvtvvtvvttt"  # split_of(f"key-{i}", 0.5), fixed forever
    assert "".join("v" if split_of(f"key-{i}", 0.5) == "val" else "t" for i in range(32)) == golden
    val = sum(split_of(f"doc-{i}", 0.1) == "val" for i in range(20_000))
    assert abs(val / 20_000 - 0.1) < 0.01
    assert all(split_of(f"doc-{i}", 0.0) == "train" for i in range(100))
    # monotone in the fraction: a val key stays val when the fraction grows
    assert all(split_of(f"doc-{i}", 0.2) == "val" for i in range(2000) if split_of(f"doc-{i}", 0.1) == "val")
    with pytest.raises(ValueError, match="val_fraction"):
        split_of("k", 1.0)


# ------------------------------------------------------------------------------- image shards
def _pairs(n, size=24, seed=0):
    return list(generate_pairs(n, seed=seed, image_size=size))


def _unique_pairs(n, size=16):
    """Pairs with unique captions (``item i``) to check that readers see each exactly once."""
    return [Pair(f"item-{i:04d}", p.image, f"item {i}", "test", "CC0-1.0", str(i)) for i, p in enumerate(_pairs(n, size))]


def test_shards_roundtrip_and_webdataset_reads_them(tmp_path):
    pairs = _pairs(30)
    with PairShardWriter(tmp_path, val_fraction=0.3, shard_size=7) as writer:
        splits = [writer.write(p) for p in pairs]
    assert splits == [split_of(p.key, 0.3) for p in pairs]
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    n_train, n_val = splits.count("train"), splits.count("val")
    assert names == [f"pairs-train-{i:06d}.tar" for i in range(-(-n_train // 7))] + [
        f"pairs-val-{i:06d}.tar" for i in range(-(-n_val // 7))
    ]
    assert writer.counts == {"train": n_train, "val": n_val}
    by_key = {p.key: p for p in pairs}
    # an independent reader: the webdataset library (what open_clip uses)
    seen = 0
    for sample in wds.WebDataset(sorted(str(p) for p in tmp_path.glob("*.tar")), shardshuffle=False):
        pair = by_key[sample["__key__"]]
        assert sample["txt"].decode() == pair.caption
        assert json.loads(sample["json"]) == {"source": "synthetic", "license": "CC0-1.0", "id": pair.id}
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.mode == "RGB" and image.tobytes() == pair.image.tobytes()
        seen += 1
    assert seen == 30
    val = load_pairs(tmp_path, "val")
    assert sorted(c for _, c in val) == sorted(p.caption for p, s in zip(pairs, splits) if s == "val")
    assert len(load_pairs(tmp_path, "train", limit=3)) == 3


def test_shards_are_byte_identical_on_rewrite(tmp_path):
    digests = []
    for attempt in range(2):
        out = tmp_path / str(attempt)
        with PairShardWriter(out, 0.2, 10, shuffle_buffer=8, seed=1) as writer:
            for pair in _pairs(20):
                writer.write(pair)
        digests.append([hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))])
    assert digests[0] == digests[1]


def test_writer_rejects_bad_pairs_and_replaces_old_shards(tmp_path):
    (tmp_path / "pairs-train-000099.tar").write_bytes(b"stale")
    image = Image.new("RGB", (8, 8))
    with PairShardWriter(tmp_path, 0.1) as writer:
        with pytest.raises(ValueError, match="empty caption"):
            writer.write(Pair("k1", image, "  ", "s", "l", "1"))
        with pytest.raises(ValueError, match="must not contain"):
            writer.write(Pair("k.1", image, "c", "s", "l", "1"))
        writer.write(Pair("k2", image, "c", "s", "l", "2"))
        with pytest.raises(ValueError, match="duplicate"):
            writer.write(Pair("k2", image, "c", "s", "l", "2"))
    assert not (tmp_path / "pairs-train-000099.tar").exists()


def test_eval_transform_matches_torchvision(tmp_path):
    pairs = _pairs(4, size=40)
    with PairShardWriter(tmp_path, 0.0) as writer:
        for pair in pairs:
            writer.write(pair)
    reference = transforms.Compose([
        transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(32),
        transforms.ToTensor(),
        transforms.Normalize(IMAGE_MEAN, IMAGE_STD),
    ])
    dataset = ImageTextShards(tmp_path / "pairs-train-*.tar", image_size=32, train=False)
    got = list(dataset)
    assert [c for _, c in got] == [p.caption for p in pairs]
    for (tensor, _), pair in zip(got, pairs):
        assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, reference(pair.image), atol=2e-2, rtol=0)


def test_train_augmentation_flips_caption_with_image(tmp_path):
    image = Image.new("RGB", (32, 32), "white")
    image.paste((255, 0, 0), (0, 0, 16, 32))  # red on the left half
    pairs = [Pair(f"k{i}", image, f"a red square on the left {i}", "t", "l", str(i)) for i in range(40)]
    with PairShardWriter(tmp_path, 0.0) as writer:
        for pair in pairs:
            writer.write(pair)
    dataset = ImageTextShards(str(tmp_path), image_size=32, train=True, seed=0, crop_scale=(1.0, 1.0))
    flipped = 0
    for tensor, caption in dataset:
        left_red = tensor[1, :, :8].mean() < tensor[1, :, -8:].mean()  # red has no green, white has
        assert left_red == ("left" in caption), caption
        flipped += "right" in caption
    assert 5 < flipped < 35  # p = 0.5
    first = [c for _, c in dataset]
    assert [c for _, c in dataset] == first  # same epoch, same order
    dataset.set_epoch(1)
    assert [c for _, c in dataset] != first
    assert swap_left_right("Left arrow, right hand, leftover") == "Right arrow, left hand, leftover"


@pytest.mark.parametrize("shard_size", [5, 100])  # many shards: split by shard; one: by sample
def test_workers_see_every_sample_once(tmp_path, shard_size):
    pairs = _unique_pairs(20)
    with PairShardWriter(tmp_path, 0.0, shard_size) as writer:
        for pair in pairs:
            writer.write(pair)
    dataset = ImageTextShards(tmp_path, image_size=8, train=True, shuffle_buffer=4)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    captions = [caption for _, caption in loader]
    assert sorted(captions) == sorted(p.caption for p in pairs)


def test_tokenize_yields_long_tensors(tmp_path):
    with PairShardWriter(tmp_path, 0.0) as writer:
        writer.write(_unique_pairs(1)[0])
    dataset = ImageTextShards(tmp_path, 8, train=False, split="train", tokenize=lambda text: [len(w) for w in text.split()])
    (_, ids), = list(dataset)
    assert ids.dtype == torch.long and ids.tolist() == [4, 1]


def _tar_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_reader_skips_and_counts_bad_samples(tmp_path):
    shard = tmp_path / "pairs-val-000000.tar"
    with tarfile.open(shard, "w") as tar:
        _tar_member(tar, "good.png", _png(Image.new("RGB", (8, 8), "red")))
        _tar_member(tar, "good.txt", b"a red square")
        _tar_member(tar, "gray.png", _png(Image.new("L", (8, 8), 128)))  # wrong mode: converted
        _tar_member(tar, "gray.txt", b"a gray square")
        _tar_member(tar, "rgba.png", _png(Image.new("RGBA", (8, 8), (0, 0, 255, 0))))  # transparent: white
        _tar_member(tar, "rgba.txt", b"nothing")
        _tar_member(tar, "broken.png", b"\x89PNG not really")
        _tar_member(tar, "broken.txt", b"a broken image")
        _tar_member(tar, "empty.png", _png(Image.new("RGB", (8, 8))))
        _tar_member(tar, "empty.txt", b"   ")
        _tar_member(tar, "notext.png", _png(Image.new("RGB", (8, 8))))
    dataset = ImageTextShards(shard, 8, train=False)
    got = {caption: tensor for tensor, caption in dataset}
    assert set(got) == {"a red square", "a gray square", "nothing"}
    assert got["a gray square"].shape == (3, 8, 8)
    white = (1.0 - torch.tensor(IMAGE_MEAN)) / torch.tensor(IMAGE_STD)
    torch.testing.assert_close(got["nothing"][:, 0, 0], white)
    assert dataset.skipped == {"undecodable image": 1, "empty caption": 1, "missing png or txt": 1}
    assert [c for _, c in load_pairs(tmp_path, "val")] == ["a red square", "a gray square", "nothing"]


def test_reader_survives_truncated_shard(tmp_path):
    with PairShardWriter(tmp_path, 0.0, shard_size=10) as writer:
        for pair in _unique_pairs(20):
            writer.write(pair)
    second = tmp_path / "pairs-train-000001.tar"
    second.write_bytes(second.read_bytes()[:3000])  # killed mid-copy
    dataset = ImageTextShards(tmp_path, 8, train=False, split="train")
    captions = [c for _, c in dataset]
    assert captions[:10] == [f"item {i}" for i in range(10)] and len(captions) < 20
    assert sum(v for k, v in dataset.skipped.items() if k.startswith("corrupt shard")) == 1


def test_no_shards_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothing-*.tar"))):
        ImageTextShards(str(tmp_path / "nothing-*.tar"), 8, train=True)
    with pytest.raises(FileNotFoundError, match="pairs-<split>"):
        load_pairs(tmp_path, "val")


def _planted_shard(path, planted, truncate=False):
    """For each ``(index, bad)``: two good samples and the planted bad one (``bad`` a reason, or
    None); then, with ``truncate``, a last sample whose image is cut off mid-member (a copy
    killed half-way)."""
    good = _png(Image.new("RGB", (8, 8), "red"))
    with tarfile.open(path, "w") as tar:
        for index, bad in planted:
            for j in range(2):
                _tar_member(tar, f"s{index}-{j}.png", good)
                _tar_member(tar, f"s{index}-{j}.txt", f"good {index} {j}".encode())
            if bad == "undecodable image":
                _tar_member(tar, f"s{index}-bad.png", b"\x89PNG not really")
                _tar_member(tar, f"s{index}-bad.txt", b"a broken image")
            elif bad == "empty caption":
                _tar_member(tar, f"s{index}-bad.png", good)
                _tar_member(tar, f"s{index}-bad.txt", b" ")
            elif bad == "missing png or txt":
                _tar_member(tar, f"s{index}-bad.png", good)
        if truncate:
            _tar_member(tar, "tail.png", bytes(range(256)) * 20)
    if truncate:
        with tarfile.open(path) as tar:
            cut = tar.getmember("tail.png").offset_data + 100
        path.write_bytes(path.read_bytes()[:cut])


PLANTED = {"undecodable image": 1, "empty caption": 1, "missing png or txt": 1, "corrupt shard": 1}


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("layout", ["by shard", "by sample"])
def test_skip_counts_reach_the_main_process_from_workers(tmp_path, num_workers, layout):
    planted = list(enumerate(["undecodable image", "empty caption", "missing png or txt", None]))
    if layout == "by shard":  # 4 shards: workers read whole shards, bad ones in both workers' sets
        for i, bad in planted:
            _planted_shard(tmp_path / f"pairs-train-{i:06d}.tar", [(i, bad)], truncate=i == 3)
    else:  # one shard: every worker reads all of it (and the damage) and keeps every k-th sample
        _planted_shard(tmp_path / "pairs-train-000000.tar", planted, truncate=True)
    dataset = ImageTextShards(tmp_path, 8, train=False, split="train")
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    captions = sorted(caption for _, caption in loader)
    assert captions == sorted(f"good {i} {j}" for i in range(4) for j in range(2))
    assert dataset.skipped == PLANTED  # counted in the workers, read in this process
    list(DataLoader(dataset, batch_size=None, num_workers=num_workers))  # a second epoch adds to them
    assert dataset.skipped == {reason: 2 * count for reason, count in PLANTED.items()}


def test_damaged_shard_is_named(tmp_path):
    with PairShardWriter(tmp_path, 0.99, shard_size=10) as writer:
        for pair in _unique_pairs(30):
            writer.write(pair)
    shard = sorted(tmp_path.glob("pairs-val-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:3000])
    # held-out pairs: an error naming the file, not a raw tarfile.ReadError
    with pytest.raises(ShardReadError, match=re.escape(str(shard)) + r" cannot be read past sample \d") as caught:
        load_pairs(tmp_path, "val")
    assert isinstance(caught.value, tarfile.ReadError) and "00_data" in str(caught.value)
    missing = tmp_path / "pairs-val-000099.tar"
    with pytest.raises(ShardReadError, match=re.escape(str(missing))):
        next(iter_tar_samples(missing))
    # a training reader skips it, counts it once, and keeps the samples before the damage
    dataset = ImageTextShards(tmp_path, 8, train=False, split="val")
    assert writer.counts["val"] - 10 <= len(list(dataset)) < writer.counts["val"]
    assert dataset.skipped == {"corrupt shard": 1}


def _grey16(height=48, width=40):
    """16-bit values covering 0..65535 with both ends, rounding boundaries and their neighbours."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(height, width), dtype=np.int64)
    edges = np.array([0, 1, 128, 129, 256, 257, 385, 386, 32767, 32768, 65278, 65279, 65534, 65535])
    values.flat[: len(edges)] = edges
    return values.astype(np.uint16)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = _grey16()
    reference = np.round(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)  # (H, W)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    png = buffer.getvalue()
    with Image.open(io.BytesIO(png)) as loaded:
        assert loaded.mode == "I;16"
        assert np.array_equal(np.asarray(loaded), values)  # the file holds all 16 bits
        rgb = np.asarray(to_rgb(loaded))
    assert rgb.shape == values.shape + (3,) and all(np.array_equal(rgb[..., c], reference) for c in range(3))
    big_endian = Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes())
    as_int32 = Image.fromarray(values.astype(np.int32))  # older Pillow opened 16-bit PNGs as "I"
    for image in (big_endian, as_int32):
        assert np.array_equal(np.asarray(to_rgb(image))[..., 1], reference), image.mode
    # the shard reader's evaluation transform at the image's own size: the reference, normalised
    with tarfile.open(tmp_path / "pairs-val-000000.tar", "w") as tar:
        _tar_member(tar, "deep.png", png)
        _tar_member(tar, "deep.txt", b"a 16-bit grey picture")
    square = np.round(values[4:44, :].astype(np.float64) * 255.0 / 65535.0) / 255.0  # centre crop (40, 40)
    (tensor, _), = list(ImageTextShards(tmp_path, 40, train=False))
    expected = (torch.from_numpy(square).float()[None] - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None]
    torch.testing.assert_close(tensor, expected, atol=1e-5, rtol=0)


def test_image_to_tensor_converts_modes():
    for mode in ("L", "P", "RGBA", "CMYK"):
        assert image_to_tensor(Image.new(mode, (10, 6)), 4).shape == (3, 4, 4)


# ------------------------------------------------------------------------------- token shards
@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    texts = [p.caption for p in generate_pairs(400, seed=0, image_size=8)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=400)


def _documents(n):
    return [(f"doc{i}", p.caption) for i, p in enumerate(generate_pairs(n, seed=5, image_size=8))]


def test_token_shards_hold_documents_joined_with_eos(tmp_path, small_tokenizer):
    docs = _documents(300)
    meta = write_token_shards(docs, small_tokenizer, tmp_path, val_fraction=0.2)
    assert meta == read_token_meta(tmp_path)
    for split in ("train", "val"):
        expected = []
        for doc_id, text in docs:
            if split_of(doc_id, 0.2) == split:
                expected += small_tokenizer.encode(text) + [small_tokenizer.eos_id]
        stored = np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint32)
        assert stored.tolist() == expected
        assert meta["count"][split] == len(expected)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 400
    assert meta["tokenizer"] == str(small_tokenizer.path)


def test_token_batches_are_deterministic_shifted_windows(tmp_path):
    tokens = np.arange(1000, dtype=np.uint32)  # token i at position i: a row names its window
    tokens.tofile(tmp_path / "train.bin")
    data = TokenShards(tmp_path, seq_len=16, batch_size=4, seed=0)
    batches = list(data)
    assert len(batches) == len(data) == (999 // 16) // 4
    starts = []
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == targets.dtype == torch.long
        for row_in, row_t in zip(inputs, targets):
            start = int(row_in[0])
            assert start % 16 == 0
            assert row_in.tolist() == list(range(start, start + 16))
            assert row_t.tolist() == list(range(start + 1, start + 17))
            starts.append(start)
    assert len(set(starts)) == len(starts) == len(batches) * 4  # no window twice in an epoch
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, TokenShards(tmp_path, 16, 4, seed=0)))
    data.set_epoch(1)
    assert not torch.equal(next(iter(data))[0], batches[0][0])
    assert not torch.equal(next(iter(TokenShards(tmp_path, 16, 4, seed=1)))[0], batches[0][0])


def test_token_shards_errors(tmp_path, small_tokenizer):
    with pytest.raises(FileNotFoundError, match="00_data"):
        TokenShards(tmp_path, 8, 2)
    write_token_shards(_documents(3), small_tokenizer, tmp_path, val_fraction=0.0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        TokenShards(tmp_path, seq_len=512, batch_size=64)
    with pytest.raises(ValueError, match="every document was empty"):
        write_token_shards([("a", " "), ("b", "")], small_tokenizer, tmp_path / "empty", val_fraction=0.0)


# ------------------------------------------------------------------------------- sources, bad data
def test_missing_package_names_make_data(tmp_path):
    with pytest.raises(DataPackageMissing, match="make data"):
        require_path(tmp_path / "absent", "some-package")


def test_openclipart_filters_and_captions():
    def svg(title, keywords):
        items = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
        return (f"<svg><metadata><rdf:RDF><cc:Work rdf:about=''><dc:title>{title}</dc:title>"
                f"<dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>"
                f"<dc:creator><cc:Agent><dc:title>someone</dc:title></cc:Agent></dc:creator></cc:Work></rdf:RDF></metadata></svg>")

    assert sources.openclipart_caption(svg("2 dead frogs", ["frog", "", "swamp", "hash"])) == ("2 dead frogs: frog, swamp", "")
    assert sources.openclipart_caption(svg("gramastar", ["stars"]))[0] is None
    assert sources.openclipart_caption(svg("Part of the Flat Icon Collection (Wed Aug 25)", ["x"]))[0] is None
    assert sources.openclipart_caption(svg("clipart by nicu buculei - jigsaw_red_10", ["jigsaw"]))[0] == "jigsaw red: jigsaw"
    assert sources.openclipart_caption(svg("various cliparts", ["cat", "animal"]))[0] == "cat, animal"
    assert sources.openclipart_caption(svg("Fish &amp; chips", []))[0] == "Fish & chips"
    assert sources.openclipart_caption(svg("smiley111", []))[0] == "smiley"
    assert sources.openclipart_caption(svg("Apollo 11", []))[0] == "Apollo 11"
    assert sources.openclipart_caption(svg("", []))[0] is None
    # the uploader's name as title or keyword says nothing about the picture
    assert sources.openclipart_caption(svg("Someone", ["someone", "armadillo"]))[0] == "armadillo"


def _fake_openclipart(tmp_path, monkeypatch, files):
    png_root, svg_root = tmp_path / "png", tmp_path / "svg"
    for rel, (png_bytes, title) in files.items():
        (png_root / rel).parent.mkdir(parents=True, exist_ok=True)
        (svg_root / rel).parent.mkdir(parents=True, exist_ok=True)
        (png_root / f"{rel}.png").write_bytes(png_bytes)
        (svg_root / f"{rel}.svg").write_text(f"<svg><cc:Work><dc:title>{title}</dc:title></cc:Work></svg>")
    monkeypatch.setattr(sources, "OPENCLIPART_PNG", png_root)
    monkeypatch.setattr(sources, "OPENCLIPART_SVG", svg_root)


def test_corrupt_file_is_skipped_and_counted(tmp_path, monkeypatch):
    _fake_openclipart(tmp_path, monkeypatch, {
        "animals/cat": (_png(Image.new("P", (30, 20))), "A cat"),
        "animals/broken": (b"\x89PNG\r\n garbage", "A broken file"),
        "shapes/stars/star_05pt02step": (_png(Image.new("RGB", (9, 9))), "gramastar"),
    })
    stats = SourceStats("openclipart", "p", "l")
    pairs = list(sources.openclipart_pairs(16, stats=stats))
    assert [p.caption for p in pairs] == ["A cat"]
    assert pairs[0].image.size == (16, 16) and pairs[0].image.mode == "RGB"
    assert stats.corrupt == 1 and stats.skipped == {"generated gramastar star": 1}


def test_empty_source_is_an_error(tmp_path, monkeypatch):
    _fake_openclipart(tmp_path, monkeypatch, {"shapes/stars/s1": (_png(Image.new("RGB", (9, 9))), "gramastar")})
    with pytest.raises(EmptySourceError, match="openclipart.*no pairs"):
        list(sources.openclipart_pairs(16))


def test_missing_debian_package_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "TUXPAINT_STAMPS", tmp_path / "no-stamps")
    with pytest.raises(DataPackageMissing, match="tuxpaint-stamps-default.*make data"):
        list(sources.tuxpaint_pairs(16))


def test_read_idx_against_handmade_file(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    path.write_bytes(gzip.compress(header + images.tobytes()))
    np.testing.assert_array_equal(fashion_mnist.read_idx(path), images)
    path.write_bytes(gzip.compress(header + images.tobytes()[:-1]))
    with pytest.raises(ValueError, match="header says shape"):
        fashion_mnist.read_idx(path)
    with pytest.raises(DataPackageMissing, match="dataset-fashion-mnist"):
        fashion_mnist.load("test", data_dir=tmp_path / "absent")
    with pytest.raises(ValueError, match="split"):
        fashion_mnist.load("dev")


# ---------------------------------------------------------------------------------------- stage
def test_stage_config_validation():
    with pytest.raises(ConfigError, match="unknown source.*webcam"):
        from_dict(DataStageConfig, {"image_sources": "synthetic,webcam"})
    with pytest.raises(ConfigError, match="at least one"):
        from_dict(DataStageConfig, {"text_sources": " , "})
    with pytest.raises(ConfigError, match="vocab_size"):
        from_dict(DataStageConfig, {"vocab_size": 10})


def test_stage_on_synthetic_data(tmp_path):
    cfg = DataStageConfig(
        out_dir=str(tmp_path), image_sources="synthetic", synthetic_pairs=120, image_size=16,
        text_sources="captions", fashion_mnist=False, vocab_size=320, shard_size=50, val_fraction=0.1,
    )
    outputs = run(cfg)
    assert set(outputs) == {"pairs_dir", "tokenizer", "tokens_dir", "fashion_mnist", "data_dir"}
    assert outputs["fashion_mnist"] == ""
    manifest = read_manifest(tmp_path)
    assert manifest["outputs"] == outputs
    stats = json.loads((tmp_path / "data_card_stats.json").read_text())
    synthetic = stats["image_sources"]["synthetic"]
    assert synthetic["kept"] == 120 and synthetic["train"] + synthetic["val"] == 120
    assert stats["pairs"] == {"train": synthetic["train"], "val": synthetic["val"]}
    assert len(load_pairs(outputs["pairs_dir"], "train")) == synthetic["train"]
    batches = TokenShards(outputs["tokens_dir"], seq_len=8, batch_size=2)
    assert next(iter(batches))[0].max() < 320
    assert (tmp_path / "figures" / "samples.png").is_file() and (tmp_path / "figures" / "token_lengths.png").is_file()
    assert {"pairs_train", "tokens_train"} <= set(json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0]))


# ---------------------------------------------------------------------------------- data cards
def test_cards_counts_are_written_by_code(tmp_path):
    from mmafm.data.cards import BEGIN, END, update_cards

    card = tmp_path / "synthetic.md"
    card.write_text(f"# Synthetic\n\n## Counts\n{BEGIN}\nold numbers\n{END}\n\n## Known noise\n- some\n")
    entry = {"source": "synthetic", "kept": 1234, "train": 1200, "val": 34, "corrupt": 2, "skipped": {"too small": 5}}
    stats = {"image_sources": {"synthetic": entry}, "text_sources": {"captions": entry}, "config": {"seed": 3}}
    assert update_cards(stats, tmp_path) == [card]
    text = card.read_text()
    assert "old numbers" not in text and "| kept | 1,234 |" in text and "| skipped: too small | 5 |" in text
    assert "seed=3" in text and text.endswith("## Known noise\n- some\n")
    card.write_text("# no block\n")
    with pytest.raises(ValueError, match="no counts block"):
        update_cards(stats, tmp_path)
    with pytest.raises(FileNotFoundError, match="emoji"):
        update_cards({"image_sources": {"emoji": entry}}, tmp_path)


def test_committed_cards_hold_counts():
    from pathlib import Path

    from mmafm.data.cards import BEGIN, END

    cards = sorted((Path(__file__).resolve().parents[1] / "data_cards").glob("*.md"))
    names = {card.stem for card in cards}
    assert {"synthetic", "emoji", "openclipart", "tuxpaint", "fashion_mnist", "wikipedia", "wordnet", "fortunes", "jargon"} <= names
    for card in cards:
        text = card.read_text()
        block = text[text.index(BEGIN) : text.index(END)]
        assert "| kept |" in block or "| test images |" in block, f"{card.name}: counts not filled in"
        for heading in ("## How it is built", "## Known noise"):
            assert heading in text, f"{card.name} lacks {heading}"
