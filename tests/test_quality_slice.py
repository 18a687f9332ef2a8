"""The quality slice (mmafm.data.quality) and the teacher-cost helpers of mmafm.stages.prune.

References: naive Python loops (document boundaries, the selection), the model run on each
document alone with PyTorch's cross-entropy (the scores), closed-form interpolation (costs and
crossings of hand-made curves).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmafm
from mmafm.data.quality import (
    build_quality_slice,
    document_bounds,
    document_nll,
    select_quality_slice,
)

VOCAB, EOS = 64, 3


def naive_bounds(tokens, eos):
    bounds, start = [], 0
    for i, t in enumerate(tokens):
        if t == eos:
            bounds.append((start, i + 1))
            start = i + 1
    if start < len(tokens):
        bounds.append((start, len(tokens)))
    return bounds


def naive_select(scores, lengths, budget, min_tokens):
    ranked = sorted((s, i) for i, s in enumerate(scores) if not math.isnan(s) and lengths[i] >= min_tokens)
    taken, total = [], 0
    for _, i in ranked:
        if total >= budget:
            break
        taken.append(i)
        total += lengths[i]
    return sorted(taken)


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    """Documents of random lengths (1..40 tokens, each ending in EOS), written as the data stage does."""
    from mmafm.io import atomic_write_json

    root = tmp_path_factory.mktemp("quality_tokens")
    rng = np.random.default_rng(0)
    for split, docs in (("train", 60), ("val", 10)):
        parts = [np.append(rng.integers(4, VOCAB, rng.integers(0, 40)), EOS) for _ in range(docs)]
        tokens = np.concatenate(parts).astype(np.uint32)
        tokens.tofile(root / f"{split}.bin")
        if split == "train":
            count = len(tokens)
    atomic_write_json(root / "meta.json", {"dtype": "uint32", "count": {"train": count, "val": 0}, "vocab_size": VOCAB,
                                           "eos_id": EOS, "documents": {"train": 60, "val": 10}})
    return root


def test_document_bounds_match_a_loop():
    rng = np.random.default_rng(1)
    for _ in range(20):
        tokens = rng.integers(0, 6, rng.integers(0, 50))
        assert [tuple(b) for b in document_bounds(tokens, EOS)] == naive_bounds(tokens.tolist(), EOS)


def test_document_nll_is_each_document_scored_alone(tokens_dir):
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=VOCAB).eval()
    tokens = np.fromfile(tokens_dir / "train.bin", dtype=np.uint32)
    bounds = document_bounds(tokens, EOS)
    scores, counts = document_nll(model, tokens, bounds, max_len=24, batch_size=5)
    for (start, end), score, count in zip(bounds, scores, counts):
        ids = torch.from_numpy(tokens[start : min(end, start + 24)].astype(np.int64))[None]
        assert count == ids.shape[1] - 1
        if ids.shape[1] < 2:
            assert math.isnan(score)
            continue
        with torch.no_grad():
            expected = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).item()
        assert score == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_selection_matches_a_naive_reference(seed):
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 80))
    scores = rng.choice([0.5, 1.0, 1.5, 2.0, float("nan")], count) + (rng.random(count) if seed % 2 else 0.0)  # ties when even
    lengths = rng.integers(1, 60, count)
    for budget in (0, 1, 50, 300, 10**6):
        for min_tokens in (1, 16):
            got = select_quality_slice(scores, lengths, budget, min_tokens).tolist()
            assert got == naive_select(scores.tolist(), lengths.tolist(), budget, min_tokens)
    with pytest.raises(ValueError, match="one entry per document"):
        select_quality_slice(scores, lengths[:-1], 10)


def test_the_slice_is_a_token_folder_of_the_lowest_nll_documents(tokens_dir, tmp_path):
    from mmafm.data.shards import TokenShards, read_token_meta

    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tokens_dir.iterdir()}
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=VOCAB).eval()
    info = build_quality_slice(model, tokens_dir, tmp_path / "slice", budget_tokens=200, min_tokens=8, max_len=64,
                               reference="random tiny model")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tokens_dir.iterdir()} == before
    tokens = np.fromfile(tokens_dir / "train.bin", dtype=np.uint32)
    bounds = document_bounds(tokens, EOS)
    scores, _ = document_nll(model, tokens, bounds, max_len=64)
    lengths = (bounds[:, 1] - bounds[:, 0]).tolist()
    chosen = naive_select(scores.tolist(), lengths, 200, 8)
    expected = np.concatenate([tokens[bounds[i, 0] : bounds[i, 1]] for i in chosen])
    assert np.array_equal(np.fromfile(tmp_path / "slice" / "train.bin", dtype=np.uint32), expected)
    # held out: the val documents the same rule admits (>= 8 tokens, NLL at most the highest kept)
    val = np.fromfile(tokens_dir / "val.bin", dtype=np.uint32)
    val_bounds = document_bounds(val, EOS)
    val_scores, _ = document_nll(model, val, val_bounds, max_len=64)
    threshold = max(scores[i] for i in chosen)
    admitted = [i for i, (start, end) in enumerate(val_bounds) if end - start >= 8 and val_scores[i] <= threshold + 1e-9]
    expected_val = np.concatenate([val[val_bounds[i, 0] : val_bounds[i, 1]] for i in admitted] or [np.zeros(0, np.uint32)])
    assert np.array_equal(np.fromfile(tmp_path / "slice" / "val.bin", dtype=np.uint32), expected_val)
    meta = read_token_meta(tmp_path / "slice")
    assert meta["count"]["val"] == len(expected_val) and meta["documents"]["val"] == len(admitted)
    assert meta["count"]["train"] == len(expected) == info["tokens_kept"] >= 200
    assert meta["documents"]["train"] == len(chosen) and meta["quality_slice"]["reference_model"] == "random tiny model"
    assert info["nll_kept_mean"] <= info["nll_pool_mean"]
    # too few held-out tokens admitted: the next-lowest eligible val documents fill up to min_val_tokens
    wide = build_quality_slice(model, tokens_dir, tmp_path / "wide", budget_tokens=200, min_tokens=8, max_len=64,
                               min_val_tokens=10**6)
    eligible = [i for i, (start, end) in enumerate(val_bounds) if end - start >= 8]
    assert wide["val_documents"] == len(eligible) and wide["val_tokens"] == sum(
        int(val_bounds[i, 1] - val_bounds[i, 0]) for i in eligible)
    batch = next(iter(TokenShards(tmp_path / "slice", 8, 2)))  # readable like the data stage's tokens
    assert batch[0].shape == (2, 8)
    with pytest.raises(ValueError, match="its own folder"):
        build_quality_slice(model, tokens_dir, tokens_dir, budget_tokens=10)


def test_cost_to_reach_and_crossings_interpolate_linearly():
    from mmafm.stages.prune import cost_to_reach, curve_crossings

    curve = [{"step": 0, "tokens": 0, "flops": 0.0, "seconds": 0.0, "val_loss": 5.0},
             {"step": 10, "tokens": 100, "flops": 1000.0, "seconds": 2.0, "val_loss": 4.0},
             {"step": 20, "tokens": 200, "flops": 2000.0, "seconds": 6.0, "val_loss": 3.0}]
    assert cost_to_reach(curve, 3.5) == pytest.approx({"step": 15, "tokens": 150, "flops": 1500.0, "seconds": 4.0})
    assert cost_to_reach(curve, 5.0) == {"step": 0, "tokens": 0, "flops": 0.0, "seconds": 0.0}
    assert cost_to_reach(curve, 2.9) is None
    # a flat curve at 4.5 crosses 5 - x/1000 at x = 500, and 4.0 at flops 1000 (3.0 at 2000): only once
    flat = [{"flops": 0.0, "val_loss": 4.5}, {"flops": 3000.0, "val_loss": 4.5}]
    assert curve_crossings(curve, flat) == pytest.approx([500.0])
    assert curve_crossings(curve, [{"flops": 0.0, "val_loss": 9.0}, {"flops": 2000.0, "val_loss": 8.0}]) == []
