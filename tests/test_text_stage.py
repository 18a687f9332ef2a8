"""Stage 02_text_pretrain: the notebook runs end to end on a tiny corpus made here, its checkpoint
reloads into the same model, and held-out perplexity beats the uniform-vocabulary level."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from mmafm.checkpoint import CheckpointError, load_model, save_checkpoint
from mmafm.config import ConfigError
from mmafm.stages import make_config
from mmafm.stages.base import read_manifest
from mmafm.stages.text_pretrain import TextPretrainConfig, build_text_model, held_out_batches

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 320


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """A token corpus the way the data stage builds one: synthetic scene captions, a BPE
    tokenizer trained on them, uint32 token shards."""
    from mmafm.data.shards import write_token_shards
    from mmafm.data.synthetic import describe, sample_scene
    from mmafm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("text_corpus")
    rng = random.Random(0)
    docs = [(f"scene-{i}", describe(sample_scene(rng))) for i in range(1500)]
    tokenizer = train_tokenizer([text for _, text in docs], root / "tokenizer" / "tokenizer", vocab_size=VOCAB)
    write_token_shards(docs, tokenizer, root / "tokens", val_fraction=0.1)
    return {"tokens_dir": str(root / "tokens"), "tokenizer": str(tokenizer.path)}


def tiny_params(corpus: dict[str, str], out_dir: Path) -> dict:
    return dict(
        out_dir=str(out_dir), tokens_dir=corpus["tokens_dir"], tokenizer=corpus["tokenizer"],
        seq_len=32, batch_size=4, max_steps=10, lr=1e-2, warmup_steps=2, eval_every=5, eval_batches=2,
        ckpt_every=5, log_every=5, sample_prompts="two small|three large", sample_tokens=6,
        # the AdamW baseline: 10 steps are too few for the AFM optimizer's slow start (its update EMA
        # is not bias-corrected); the AFM default runs in tests/test_golden.py and test_afm_optim.py
        optimizer="adamw", weight_decay=0.1, grad_skip=0.0,
    )


@pytest.mark.slow
def test_stage_notebook_trains_and_writes_a_reloadable_checkpoint(corpus, tmp_path):
    papermill = pytest.importorskip("papermill")
    out_dir = tmp_path / "02_text_pretrain"
    params = tiny_params(corpus, out_dir)
    assert set(params) <= set(TextPretrainConfig.__dataclass_fields__)
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "02_text_pretrain.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters=params, kernel_name="mmafm", cwd=str(ROOT), progress_bar=False,
    )
    manifest = read_manifest(out_dir)
    outputs, summary = manifest["outputs"], manifest["summary"]
    assert outputs["preset"] == "afm_2024_device_tiny" and outputs["tokenizer"] == corpus["tokenizer"]
    assert {"loss", "perplexity"} <= {Path(p).stem for p in manifest["figures"]}

    # held-out perplexity: finite and well below guessing uniformly over the vocabulary
    assert summary["uniform_ppl"] == VOCAB and summary["steps"] == 10
    assert math.isfinite(summary["val_ppl"]) and summary["val_ppl"] < VOCAB / 4
    evals = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval/val_ppl" in r]
    assert [r["step"] for r in evals] == [5, 10]

    # the checkpoint rebuilds the trained model: same held-out loss as the stage measured
    model = load_model(outputs["checkpoint"], family="text")
    assert model.config.vocab_size == VOCAB
    batches = held_out_batches(corpus["tokens_dir"], 32, 4, 2)
    with torch.no_grad():
        total = sum(
            torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), tgt.flatten(), reduction="sum").item()
            for ids, tgt in batches
        )
    val_loss = total / sum(tgt.numel() for _, tgt in batches)
    assert val_loss == pytest.approx(summary["val_loss"], abs=1e-3)

    samples = json.loads(Path(outputs["samples"]).read_text())
    assert [s["prompt"] for s in samples] == ["two small", "three large"]
    assert all(0 < s["tokens"] <= 6 and s["completion"] for s in samples)


def test_init_checkpoint_and_overrides(corpus, tmp_path):
    cfg = make_config("02_text_pretrain", dict(tiny_params(corpus, tmp_path), seq_len=2048, rope_theta=6_315_089.0))
    model, overrides = build_text_model(cfg, VOCAB)
    assert overrides == {"vocab_size": VOCAB, "max_seq_len": 2048, "rope_theta": 6_315_089.0}
    assert model.config.max_seq_len == 2048 and model.config.rope_theta == 6_315_089.0

    path = save_checkpoint(tmp_path / "start", model.state_dict())
    started, _ = build_text_model(make_config("02_text_pretrain", dict(tiny_params(corpus, tmp_path),
                                                                        init_checkpoint=str(path))), VOCAB)
    torch.testing.assert_close(started.embed.weight, model.embed.weight, atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="preset"):  # another vocabulary: shapes differ
        build_text_model(make_config("02_text_pretrain", dict(tiny_params(corpus, tmp_path),
                                                               init_checkpoint=str(path))), VOCAB + 8)


def test_bad_config_is_refused(corpus, tmp_path):
    from mmafm.stages.text_pretrain import run

    with pytest.raises(ConfigError, match="tokens_dir"):
        run(make_config("02_text_pretrain", dict(out_dir=str(tmp_path))))
    with pytest.raises(ConfigError, match="preset"):
        build_text_model(make_config("02_text_pretrain", dict(tiny_params(corpus, tmp_path), preset="vit_base_patch16_tiny")), VOCAB)
    with pytest.raises(ConfigError, match="not a registered"):
        build_text_model(make_config("02_text_pretrain", dict(tiny_params(corpus, tmp_path), preset="afm_1999")), VOCAB)
    with pytest.raises(ConfigError, match="precision"):
        make_config("02_text_pretrain", dict(precision="fp8"))
    with pytest.raises(ConfigError, match="sample_prompts"):
        run(make_config("02_text_pretrain", dict(tiny_params(corpus, tmp_path), sample_prompts="|")))
