"""Stage 06 (multimodal adaptation): the mixture knob, its batches and per-kind losses against
naive references, the inputs it refuses, the frozen-text invariant, and the notebook run end to
end by papermill on tiny upstream outputs made here.

References: closed-form row counts (largest remainder), the token file and the caption layout the
rows must reproduce, each row scored alone by a hand-written next-token sum, and the text
checkpoint's own tensors (a frozen text model must come out bitwise unchanged).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmafm
from mmafm.config import ConfigError, from_dict, load_yaml
from mmafm.models.multimodal import IGNORE_INDEX
from mmafm.stages.base import read_manifest
from mmafm.stages.multimodal_adaptation import (
    KINDS,
    AdaptationTask,
    MixtureBatches,
    MultimodalAdaptationConfig,
    parse_mixture,
    parse_mixture_list,
    rows_per_kind,
    run,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(  # a run of a few seconds
    mixture="text=1,pairs=1,interleaved=1", batch_size=6, seq_len=16, min_images=2, max_images=2,
    max_document_tokens=64, image_size=64, image_tokens=4, max_steps=2, warmup_steps=1, log_every=1,
    eval_every=1, eval_text_rows=4, eval_pairs=8, eval_documents=3, num_candidates=3,
)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """What 00_data, 01_clip_pretrain and 02_text_pretrain hand to the stage, made tiny here."""
    from mmafm.checkpoint import save_model
    from mmafm.data import Pair
    from mmafm.data.shards import PairShardWriter, write_token_shards
    from mmafm.data.synthetic import generate_pairs
    from mmafm.models.clip import CLIP, save_image_tower
    from mmafm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("upstream06")
    generated = list(generate_pairs(60, seed=0, image_size=64))
    with PairShardWriter(root / "pairs", val_fraction=0.25, shard_size=100) as writer:
        for index, pair in enumerate(generated):  # two sources, as the data stage writes them
            source = "emoji" if index % 2 else pair.source
            writer.write(Pair(pair.key, pair.image, pair.caption, source, pair.license, pair.id))
    captions = [pair.caption for pair in generated]
    tokenizer = train_tokenizer(captions * 3, root / "tokenizer", vocab_size=320)
    documents = [(f"doc-{i}", ". ".join(captions[i % 60 : i % 60 + 4])) for i in range(200)]
    write_token_shards(documents, tokenizer, root / "tokens", val_fraction=0.2)
    torch.manual_seed(0)
    text = mmafm.create_model("afm_2024_device_tiny", vocab_size=tokenizer.vocab_size)
    text_path = save_model(root / "text_model", text)
    tower = save_image_tower(CLIP(mmafm.get_config("clip_tiny")), root / "image_tower")
    return {
        "pairs_dir": str(root / "pairs"), "tokens_dir": str(root / "tokens"), "tokenizer": str(tokenizer.path),
        "image_tower": str(tower), "image_preset": "vit_base_patch16_tiny", "text_checkpoint": str(text_path),
        "text_preset": "afm_2024_device_tiny",
    }


def _cfg(tmp_path, upstream, **overrides) -> MultimodalAdaptationConfig:
    return MultimodalAdaptationConfig(**{**TINY, **upstream, "out_dir": str(tmp_path / "out"), **overrides})


def test_yaml_holds_the_config_defaults():
    values = load_yaml(ROOT / "configs" / "stages" / "06_multimodal_adaptation.yaml")
    assert from_dict(MultimodalAdaptationConfig, values) == MultimodalAdaptationConfig()
    assert set(values) == {f.name for f in dataclasses.fields(MultimodalAdaptationConfig)} - {"out_dir"}
    defaults = MultimodalAdaptationConfig()
    assert (defaults.train_vision, defaults.train_adapter, defaults.train_text) == (False, True, True)


def test_mixture_is_parsed_and_normalised():
    assert parse_mixture("text=1,pairs=1,interleaved=2") == {"text": 0.25, "pairs": 0.25, "interleaved": 0.5}
    assert parse_mixture(" pairs = 3 ") == {"text": 0.0, "pairs": 1.0, "interleaved": 0.0}
    assert parse_mixture("text:1,pairs:1,interleaved:2") == parse_mixture("text=1,pairs=1,interleaved=2")
    for bad, message in (("images=1", "unknown source 'images'"), ("text", "SOURCE=WEIGHT"), ("text=x", "SOURCE=WEIGHT"),
                         ("text=-1", ">= 0"), ("text=0,pairs=0", "no source a positive weight"), ("text=nan", "SOURCE=WEIGHT"),
                         ("text=1,text=2", "listed twice")):
        with pytest.raises(ConfigError, match=message):
            parse_mixture(bad)


def test_rows_per_kind_by_largest_remainder():
    # 16 x (0.3, 0.35, 0.35) = 4.8, 5.6, 5.6: floors 4, 5, 5 (14); the two largest remainders get one more
    assert rows_per_kind({"text": 0.3, "pairs": 0.35, "interleaved": 0.35}, 16) == {"text": 5, "pairs": 6, "interleaved": 5}
    # equal thirds of 16: 5 each and one left, given to the first kind on a tie
    assert rows_per_kind(parse_mixture("text=1,pairs=1,interleaved=1"), 16) == {"text": 6, "pairs": 5, "interleaved": 5}
    assert rows_per_kind(parse_mixture("pairs=1"), 7) == {"text": 0, "pairs": 7, "interleaved": 0}
    with pytest.raises(ConfigError, match=r"leaves no row for \['text'\]"):
        rows_per_kind(parse_mixture("text=0.05,pairs=1"), 4)


def _batches(cfg, tokenizer):
    from mmafm.data.interleaved import load_sourced_pairs
    from mmafm.data.shards import TOKEN_DTYPE, image_to_tensor

    pairs, _ = load_sourced_pairs(cfg.pairs_dir, "train")
    pool = [image_to_tensor(p.image, cfg.image_size) for p in pairs]
    tokens = np.memmap(Path(cfg.tokens_dir) / "train.bin", dtype=TOKEN_DTYPE, mode="r")
    rows = rows_per_kind(parse_mixture(cfg.mixture), cfg.batch_size)
    return MixtureBatches(tokens=tokens, pairs=pairs, image_pool=pool, tokenizer=tokenizer, rows=rows, cfg=cfg), pairs, pool, tokens


def test_batches_hold_the_mixture_and_reproduce_their_sources(tmp_path, upstream):
    from mmafm.eval.captions import caption_ids
    from mmafm.tokenizer import Tokenizer

    cfg = _cfg(tmp_path, upstream)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    batches, pairs, pool, tokens = _batches(cfg, tokenizer)
    epoch0 = list(batches)
    assert len(epoch0) == len(batches) == len(pairs) // 2  # each pair once per epoch, 2 pair rows a batch
    layouts = {tuple(caption_ids(tokenizer, p.caption, cfg.max_caption_tokens).tolist()): i for i, p in enumerate(pairs)}
    for batch in epoch0:
        kinds = batch["kinds"].tolist()
        assert [kinds.count(k) for k in range(3)] == [2, 2, 2]
        assert int((batch["ids"] == tokenizer.image_id).sum()) == batch["images"].shape[0]
        image_at = 0
        for row in range(6):
            real = batch["labels"][row] != IGNORE_INDEX
            ids = batch["ids"][row][real].tolist()
            assert torch.equal(batch["labels"][row][real], batch["ids"][row][real])
            if KINDS[kinds[row]] == "text":  # a window of train.bin at a multiple of seq_len
                assert len(ids) == cfg.seq_len
                starts = [w for w in range(len(tokens) // cfg.seq_len)
                          if np.array_equal(tokens[w * cfg.seq_len : (w + 1) * cfg.seq_len], ids)]
                assert starts
            elif KINDS[kinds[row]] == "pairs":  # 03's caption row, its own image beside it
                index = layouts[tuple(ids)]
                assert torch.equal(batch["images"][image_at], pool[index])
            image_at += ids.count(tokenizer.image_id)
    assert all(torch.equal(a["ids"], b["ids"]) for a, b in zip(epoch0, batches))  # the same epoch again
    batches.set_epoch(1)
    assert not all(torch.equal(a["ids"], b["ids"]) for a, b in zip(epoch0, batches))


def test_per_kind_losses_equal_rows_scored_alone(tmp_path, upstream):
    from mmafm.stages.vl_alignment import build_model
    from mmafm.tokenizer import Tokenizer

    cfg = _cfg(tmp_path, upstream)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    model = build_model(cfg, tokenizer, stage="06_multimodal_adaptation").eval()
    batches, *_ = _batches(cfg, tokenizer)
    batch = next(iter(batches))
    rows = rows_per_kind(parse_mixture(cfg.mixture), cfg.batch_size)
    with torch.no_grad():
        losses, metrics = AdaptationTask(model, cfg.mode, rows, {}).training_forward(batch)
    k = model.num_image_tokens(cfg.mode)
    sums, counts = {kind: 0.0 for kind in KINDS}, {kind: 0 for kind in KINDS}
    image_at = 0
    for row in range(cfg.batch_size):
        ids = batch["ids"][row][batch["labels"][row] != IGNORE_INDEX]
        n_images = int((ids == tokenizer.image_id).sum())
        images = batch["images"][image_at : image_at + n_images]
        image_at += n_images
        with torch.no_grad():
            logits = model(ids[None], images if n_images else None, mode=cfg.mode).logits[0]
        log_probs = F.log_softmax(logits.float(), -1)
        position, total, count = 0, 0.0, 0  # expanded position of each source token
        positions = []
        for token in ids.tolist():
            positions.append(position)
            position += k if token == tokenizer.image_id else 1
        for i in range(len(ids) - 1):
            nxt = int(ids[i + 1])
            if nxt == tokenizer.image_id:
                continue  # an image slot is never a target
            total -= float(log_probs[positions[i + 1] - 1, nxt])
            count += 1
        kind = KINDS[int(batch["kinds"][row])]
        sums[kind] += total
        counts[kind] += count
    for kind in KINDS:
        assert metrics[f"ce_{kind}"] == pytest.approx(sums[kind] / counts[kind], rel=1e-4)
        assert metrics[f"tokens_{kind}"] == counts[kind]
    assert metrics["ce"] == pytest.approx(sum(sums.values()) / sum(counts.values()), rel=1e-4)
    assert set(losses) == {"lm"}


def test_images_reach_the_decoder_in_pair_and_interleaved_rows(tmp_path, upstream):
    """Swap every image of a training batch for another one: the logits of each pair and
    interleaved row change after its first image, and not before it (the decoder is causal), and
    a text row's logits do not change at all."""
    from mmafm.stages.vl_alignment import build_model
    from mmafm.tokenizer import Tokenizer

    cfg = _cfg(tmp_path, upstream)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer, stage="06_multimodal_adaptation").eval()
    batches, _, pool, _ = _batches(cfg, tokenizer)
    batch = next(iter(batches))
    other = torch.stack([pool[(i + 7) % len(pool)] for i in range(batch["images"].shape[0])])
    assert not torch.equal(other, batch["images"])
    with torch.no_grad():
        out = model(batch["ids"], batch["images"], mode=cfg.mode)
        swapped = model(batch["ids"], other, mode=cfg.mode)
    checked = set()
    for row in range(batch["ids"].shape[0]):
        slots = torch.nonzero(out.image_mask[row])[:, 0]
        difference = (out.logits[row] - swapped.logits[row]).abs().amax(-1)  # (L,)
        if KINDS[int(batch["kinds"][row])] == "text":
            assert len(slots) == 0 and float(difference.max()) == 0.0
            continue
        if len(slots) == 0:  # an interleaved document whose images fell past max_document_tokens
            continue
        first = int(slots[0])
        assert float(difference[:first].max()) == 0.0  # before the first image: nothing seen yet
        assert float(difference[first:].min()) > 1e-4  # from the first image on: every position
        checked.add(KINDS[int(batch["kinds"][row])])
    assert checked == {"pairs", "interleaved"}


def test_text_lr_scale_splits_the_groups_and_follows_the_schedule():
    from mmafm.stages.multimodal_adaptation import scale_text_lr
    from mmafm.train.optim import build_optimizer
    from mmafm.train.schedule import build_scheduler
    from mmafm.train.trainer import TrainConfig

    model = mmafm.create_model("afm_vl_tiny", text={"vocab_size": 320}, balanced_size=32, num_image_tokens=4)
    config = TrainConfig(lr=1e-3, max_steps=10, warmup_steps=2)
    optimizer = scale_text_lr(build_optimizer(model, config), model.text, 0.1)
    scheduler = build_scheduler(optimizer, config)
    text = {id(p) for p in model.text.parameters()}
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter once
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        for group in optimizer.param_groups:
            in_text = {id(p) in text for p in group["params"]}
            assert len(in_text) == 1  # a group is all text or all not
            factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
            assert group["lr"] == pytest.approx(1e-3 * factor * (0.1 if in_text.pop() else 1.0))
    untouched = build_optimizer(model, config)
    assert scale_text_lr(untouched, model.text, 1.0).param_groups == untouched.param_groups


def test_inputs_are_checked(tmp_path, upstream):
    with pytest.raises(ConfigError, match="image_tower, text_checkpoint empty"):
        run(_cfg(tmp_path, {**upstream, "image_tower": "", "text_checkpoint": ""}))
    with pytest.raises(ConfigError, match="text_checkpoint is set but text_preset is empty"):
        run(_cfg(tmp_path, {**upstream, "text_preset": ""}))
    with pytest.raises(ConfigError, match="min_images=3 > max_images=2"):
        run(_cfg(tmp_path, upstream, min_images=3))
    with pytest.raises(ConfigError, match="key 'mixture': mixture: unknown source 'video'"):
        run(_cfg(tmp_path, upstream, mixture="video=1"))
    from mmafm.data.shards import write_token_shards
    from mmafm.tokenizer import train_tokenizer

    other = train_tokenizer(["some entirely different words here"] * 40, tmp_path / "other", vocab_size=310)
    write_token_shards([(f"d{i}", "some entirely different words here") for i in range(50)], other, tmp_path / "tok2", 0.2)
    with pytest.raises(ConfigError, match="310-token vocabulary"):
        run(_cfg(tmp_path, {**upstream, "tokens_dir": str(tmp_path / "tok2")}))


def test_a_frozen_text_model_keeps_its_perplexity_exactly(tmp_path, upstream):
    from mmafm.checkpoint import load_checkpoint

    outputs = run(_cfg(tmp_path, upstream, train_text=False, max_steps=1, eval_every=0))
    summary = read_manifest(tmp_path / "out")["summary"]
    assert summary["trainable"] == {"vision": False, "adapter": True, "text": False}
    assert summary["text_unchanged"] is True
    assert summary["text_ppl"] == summary["text_ppl_before"] and summary["text_ppl_change"] == 0.0
    saved, _ = load_checkpoint(outputs["text_model"])
    original, _ = load_checkpoint(upstream["text_checkpoint"])
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)


def test_compare_mixtures_are_split_on_semicolons_and_checked():
    assert parse_mixture_list("") == [] and parse_mixture_list(" ; ") == []
    assert parse_mixture_list("text:0.9,pairs:0.1; pairs:1") == ["text:0.9,pairs:0.1", "pairs:1"]
    with pytest.raises(ConfigError, match="key 'compare_mixtures': 'video:1'"):
        parse_mixture_list("text:1;video:1")


def test_mixture_comparison_starts_from_the_main_runs_start(tmp_path, upstream):
    """Each compared mixture trains from the model the main run started from: the comparison of
    the main run's own mixture, for as many steps, lands on the main run's held-out numbers; a
    text-only mixture lands elsewhere. One point per mixture, and the trade-off figure."""
    run(_cfg(tmp_path, upstream, eval_every=0, compare_mixtures=f"{TINY['mixture']};text:1", compare_steps=TINY["max_steps"]))
    manifest = read_manifest(tmp_path / "out")
    summary = manifest["summary"]
    same, text_only = summary["mixture_comparison"]
    assert same["mixture"] == summary["mixture"] and same["steps"] == summary["steps"] == TINY["max_steps"]
    for key in ("text_ppl", "caption_ppl", "interleaved_ppl", "choice_accuracy", "text_ppl_change"):
        assert same[key] == pytest.approx(summary[key], rel=1e-5, abs=1e-4), key
    assert text_only["rows_per_batch"] == {"text": TINY["batch_size"], "pairs": 0, "interleaved": 0}
    assert text_only["caption_ppl"] != pytest.approx(same["caption_ppl"], rel=1e-4)
    assert summary["compare_steps"] == TINY["max_steps"]
    assert "mixture_tradeoff.png" in {Path(f).name for f in manifest["figures"]}


def test_a_compared_mixture_the_batch_cannot_hold_is_refused_before_training(tmp_path, upstream):
    with pytest.raises(ConfigError, match="leaves no row"):
        run(_cfg(tmp_path, upstream, compare_mixtures="text:0.01,pairs:1"))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_stage_notebook_runs_with_papermill(tmp_path, upstream):
    from mmafm.runner import run_stage

    compare = {"compare_mixtures": "text:1;pairs:1", "compare_steps": 1}  # the notebook's trade-off cell, briefly
    stage_dir = run_stage("06_multimodal_adaptation", params={**TINY, **upstream, **compare}, run_id="t", runs_dir=tmp_path)
    manifest = read_manifest(stage_dir)
    outputs, summary = manifest["outputs"], manifest["summary"]
    assert outputs["preset"] == "afm_vl_tiny" and summary["image_tokens"] == 4
    assert summary["trainable"] == {"vision": False, "adapter": True, "text": True}
    assert summary["rows_per_batch"] == {"text": 2, "pairs": 2, "interleaved": 2}
    assert summary["text_unchanged"] is False and summary["choice_chance"] == pytest.approx(1 / 3, abs=1e-3)
    for key in ("text_ppl", "interleaved_ppl", "caption_ppl", "choice_accuracy"):
        assert summary[f"{key}_before"] > 0 and summary[key] > 0
    assert {Path(f).name for f in manifest["figures"]} == {"adaptation.png", "interleaved_example.png", "mixture_tradeoff.png"}
    assert [point["mixture"] for point in summary["mixture_comparison"]] == [
        {"text": 1.0, "pairs": 0.0, "interleaved": 0.0}, {"text": 0.0, "pairs": 1.0, "interleaved": 0.0}]
    executed = (stage_dir / "06_multimodal_adaptation.ipynb").read_text()
    assert "each 1 steps from the same start" in executed  # the notebook read the comparison
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "ce_interleaved" in r] == [1, 2]
    assert [r["step"] for r in records if "eval/val_text_ppl" in r] == [1, 2]
    text = mmafm.load_model(stage_dir, family="text")  # the manifest's text_model
    assert text.config.vocab_size == mmafm.load_model(outputs["checkpoint"]).text.config.vocab_size
    stats = json.loads((stage_dir / "data_card_stats.json").read_text())
    assert stats["image_sources"]["interleaved"]["val"] == 3
