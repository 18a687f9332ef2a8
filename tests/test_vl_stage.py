"""Stage 03 (vision-language alignment): its config, data helpers and scoring against naive
per-row references, upstream checkpoints, and the notebook run end to end by papermill."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmafm
from mmafm.checkpoint import load_model, save_model
from mmafm.config import ConfigError, from_dict, load_yaml
from mmafm.eval.captions import (
    caption_candidates,
    caption_ids,
    caption_log_likelihoods,
    collate_captions,
    evaluate_captions,
)
from mmafm.models.multimodal import IGNORE_INDEX
from mmafm.stages.base import read_manifest
from mmafm.stages.vl_alignment import VLAlignmentConfig, build_model, run

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(  # a run of a few seconds
    synthetic_pairs=80, max_steps=2, batch_size=4, eval_pairs=8, num_candidates=3, show_images=2,
    max_new_tokens=4, log_every=1, ckpt_every=0, warmup_steps=1,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mmafm.data.synthetic import generate_pairs
    from mmafm.tokenizer import train_tokenizer

    captions = [pair.caption for pair in generate_pairs(200, seed=1, image_size=16)]
    return train_tokenizer(captions, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=320)


def test_yaml_holds_the_config_defaults():
    values = load_yaml(ROOT / "configs" / "stages" / "03_vl_alignment.yaml")
    assert from_dict(VLAlignmentConfig, values) == VLAlignmentConfig()
    assert set(values) == {f.name for f in dataclasses.fields(VLAlignmentConfig)} - {"out_dir"}


def test_caption_ids_and_collate(tokenizer):
    ids = caption_ids(tokenizer, "two small red circles on the left", max_caption_tokens=4)
    assert ids[:2].tolist() == [tokenizer.bos_id, tokenizer.image_id]
    assert ids.numel() == 2 + 4 and ids[-1] == tokenizer.eos_id
    images, batch_ids, labels = collate_captions(
        [(torch.zeros(3, 4, 4), torch.tensor([2, 8, 5, 3])), (torch.ones(3, 4, 4), torch.tensor([2, 8, 3]))], pad_id=0
    )
    assert images.shape == (2, 3, 4, 4)
    assert batch_ids.tolist() == [[2, 8, 5, 3], [2, 8, 3, 0]]
    assert labels.tolist() == [[2, 8, 5, 3], [2, 8, 3, IGNORE_INDEX]]


def test_candidates_put_the_truth_first_and_differ():
    captions = ["a", "b", "a", "c", "d"]
    for index, candidates in enumerate(caption_candidates(captions, 3, seed=0)):
        assert candidates[0] == index and len(candidates) == 3
        assert len({captions[j] for j in candidates}) == 3
    with pytest.raises(ValueError, match="needs 5 different held-out captions, found 4"):
        caption_candidates(captions, 5, seed=0)


def test_log_likelihoods_match_unpadded_rows(tokenizer):
    """Batched, right-padded scoring equals scoring each row alone with a hand-written sum."""
    model = mmafm.create_model("afm_vl_tiny", text={"vocab_size": tokenizer.vocab_size}, balanced_size=32,
                               num_image_tokens=4).eval()
    captions = ["a small red circle", "three large blue squares at the top and a star", "a green star"]
    ids = [caption_ids(tokenizer, c, 40) for c in captions]
    images = torch.randn(3, 3, 32, 32)
    sums, counts = caption_log_likelihoods(model, images, ids, "balanced", batch_size=2)
    k = model.num_image_tokens()
    for row in range(3):
        with torch.no_grad():
            logits = model(ids[row][None], images[row][None]).logits[0]
        caption = ids[row][2:]  # tokens after <s> <image>, EOS included
        log_probs = F.log_softmax(logits, -1)
        first = 1 + k  # expanded position of the first caption token
        expected = sum(float(log_probs[first + i - 1, int(t)]) for i, t in enumerate(caption))
        assert counts[row] == caption.numel()
        assert float(sums[row]) == pytest.approx(expected, rel=1e-4)


def test_evaluate_reports_chance_and_consistent_ppl(tokenizer):
    model = mmafm.create_model("afm_vl_tiny", text={"vocab_size": tokenizer.vocab_size}, balanced_size=32,
                               num_image_tokens=4).eval()
    captions = ["a red circle", "a blue square", "two green stars", "a large pink diamond", "three stars"]
    metrics = evaluate_captions(model, tokenizer, torch.randn(5, 3, 32, 32), captions, "balanced", num_candidates=3)
    assert metrics["choice_chance"] == pytest.approx(1 / 3)
    assert 0 <= metrics["choice_accuracy"] <= 1 and 0 <= metrics["choice_accuracy_wrong_image"] <= 1
    sums, counts = caption_log_likelihoods(
        model, torch.randn(5, 3, 32, 32), [caption_ids(tokenizer, c, 40) for c in captions], "balanced"
    )
    assert metrics["caption_ppl"] > 1.0 and counts.sum() > 5


def _tiny_cfg(tmp_path, **overrides):
    return VLAlignmentConfig(**{**TINY, "out_dir": str(tmp_path / "out"), **overrides})


def test_upstream_checkpoints_load_into_the_towers(tmp_path, tokenizer):
    from mmafm.models.clip import CLIP, save_image_tower

    clip = CLIP(mmafm.get_config("clip_tiny"))
    tower_path = save_image_tower(clip, tmp_path / "image_tower")
    text = mmafm.create_model("afm_2024_device_tiny", vocab_size=tokenizer.vocab_size, rope_theta=1e6)
    text_path = save_model(tmp_path / "text_model", text)
    cfg = _tiny_cfg(tmp_path, image_tower=str(tower_path), image_preset="vit_base_patch16_tiny",
                    text_checkpoint=str(text_path), text_preset="afm_2024_device_tiny",
                    train_vision=False, train_text=False)
    model = build_model(cfg, tokenizer)
    assert model.trainable_parts() == {"vision": False, "adapter": True, "text": False}
    assert model.text.config.rope_theta == 1e6
    for name, tensor in clip.visual.state_dict().items():
        torch.testing.assert_close(model.vision.state_dict()[name], tensor)
    for name, tensor in text.state_dict().items():
        torch.testing.assert_close(model.text.state_dict()[name], tensor)

    with pytest.raises(ConfigError, match="trained from preset 'vit_base_patch16_tiny'"):
        build_model(dataclasses.replace(cfg, image_preset="vit_giant_patch14_tiny"), tokenizer)
    small_vocab = save_model(tmp_path / "other_text", mmafm.create_model("afm_2024_device_tiny"))
    with pytest.raises(ConfigError, match="vocabulary of 2048 but the tokenizer"):
        build_model(dataclasses.replace(cfg, text_checkpoint=str(small_vocab)), tokenizer)
    with pytest.raises(ConfigError, match="nothing to train"):
        build_model(dataclasses.replace(cfg, train_adapter=False), tokenizer)
    with pytest.raises(ConfigError, match="'afm_2024_device_tiny' is not a multimodal preset"):
        build_model(dataclasses.replace(cfg, model_preset="afm_2024_device_tiny"), tokenizer)


def test_inconsistent_inputs_are_named(tmp_path):
    with pytest.raises(ConfigError, match="pass both pairs_dir and tokenizer"):
        run(_tiny_cfg(tmp_path, pairs_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="image_tower is set but image_preset is empty"):
        run(_tiny_cfg(tmp_path, image_tower=str(tmp_path / "x.safetensors")))
    with pytest.raises(ConfigError, match="expected one of"):
        from_dict(VLAlignmentConfig, {"mode": "fast"})


@pytest.mark.slow
def test_stage_notebook_runs_with_papermill(tmp_path):
    from mmafm.runner import run_stage

    params = {**TINY, "mode": "rapid", "image_size": 32, "image_tokens": 4, "train_vision": False}
    stage_dir = run_stage("03_vl_alignment", params=params, run_id="t", runs_dir=tmp_path)
    manifest = read_manifest(stage_dir)
    outputs, summary = manifest["outputs"], manifest["summary"]
    assert outputs["preset"] == "afm_vl_tiny" and outputs["mode"] == "rapid"
    assert summary["choice_chance"] == pytest.approx(1 / 3, abs=1e-3) and summary["image_tokens"] == 4
    assert summary["trainable"] == {"vision": False, "adapter": True, "text": True}
    assert summary["caption_ppl"] > 1.0 and len(summary["examples"]) == 2
    assert {Path(f).name for f in manifest["figures"]} == {"curves.png", "captions.png"}
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "ce" in r] == [1, 2]
    model = load_model(outputs["checkpoint"], family="multimodal")
    assert model.num_image_tokens("rapid") == 4 and model.config.default_mode == "rapid"
