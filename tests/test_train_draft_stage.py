"""Stage 13_train_draft: its YAML holds the config defaults, bad inputs are named, distillation
brings the draft's distributions towards the target's (KL down, acceptance up against the
untrained draft), and the notebook runs end to end under papermill on a tiny model.

References: the target itself (every speculative output is checked equal to its plain greedy
decoding inside the stage; acceptance is recomputed here from the saved draft), the config
dataclass.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

import mmafm
from mmafm.config import ConfigError, from_dict, load_yaml
from mmafm.stages.train_draft import TrainDraftConfig, held_out_prompts, run
from mmafm.train.trainer import TrainSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def target_model(tmp_path_factory) -> dict[str, str]:
    """Token shards, their tokenizer and a tiny text model trained a little on them (so its
    distributions are not uniform), saved as 02 saves one."""
    from mmafm.data.shards import TokenShards, write_token_shards
    from mmafm.data.synthetic import describe, sample_scene
    from mmafm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("draft_stage")
    rng = random.Random(0)
    docs = [(f"scene-{i}", describe(sample_scene(rng))) for i in range(400)]
    tokenizer = train_tokenizer([text for _, text in docs], root / "tok" / "tokenizer", vocab_size=300)
    write_token_shards(docs, tokenizer, root / "tokens", val_fraction=0.1)
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step, (ids, targets) in enumerate(TokenShards(root / "tokens", 32, 8, seed=0)):
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 40:
            break
    checkpoint = mmafm.save_model(root / "text_model", model.eval(), {"tokenizer": str(tokenizer.path)})
    return {"checkpoint": str(checkpoint), "tokens_dir": str(root / "tokens"), "tokenizer": str(tokenizer.path)}


def test_yaml_holds_the_config_defaults():
    values = load_yaml(ROOT / "configs" / "stages" / "13_train_draft.yaml")
    assert from_dict(TrainDraftConfig, values) == TrainDraftConfig()
    fields = {f.name for f in dataclasses.fields(TrainDraftConfig)}
    own = fields - {f.name for f in dataclasses.fields(TrainSettings)} - {"out_dir"}
    assert own <= set(values) <= fields


def test_inputs_are_checked(tmp_path, target_model):
    with pytest.raises(ConfigError, match="checkpoint is empty"):
        run(TrainDraftConfig(out_dir=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="draft_layers=4 must be below"):
        run(TrainDraftConfig(out_dir=str(tmp_path / "b"), **target_model, draft_layers=4))
    with pytest.raises(ConfigError, match="ks="):
        run(TrainDraftConfig(out_dir=str(tmp_path / "c"), **target_model, ks="1,x"))
    other = mmafm.save_model(tmp_path / "other", mmafm.create_model("afm_2024_device_tiny", vocab_size=64), {})
    with pytest.raises(ConfigError, match="generation_prompts=1000000"):
        run(TrainDraftConfig(out_dir=str(tmp_path / "e"), **target_model, generation_prompts=1_000_000))
    with pytest.raises(ConfigError, match="prompt_len"):
        run(TrainDraftConfig(out_dir=str(tmp_path / "f"), **target_model, seq_len=8, prompt_len=16, eval_tokens=8))
    with pytest.raises(ConfigError, match="64-token vocabulary"):
        run(TrainDraftConfig(out_dir=str(tmp_path / "d"), **{**target_model, "checkpoint": str(other)}))


@pytest.mark.parametrize("distill_data", ["text", "generations"])
def test_distillation_raises_acceptance(tmp_path, target_model, distill_data):
    """The distilled draft's recorded acceptance is recomputed from the saved draft, and beats the
    untrained truncated draft's; the KL to the target fell (on either text)."""
    from mmafm.inference.speculative import acceptance_by_k
    from mmafm.stages.base import read_manifest

    out_dir = tmp_path / "13"
    outputs = run(TrainDraftConfig(out_dir=str(out_dir), **target_model, seq_len=32, batch_size=8, max_steps=40,
                                   ks="2,4", k=2, eval_prompts=4, prompt_len=8, eval_tokens=16, timing_repeats=1,
                                   eval_batches=1, warmup_steps=2, log_every=5, distill_data=distill_data,
                                   generation_prompts=64))
    summary = read_manifest(out_dir)["summary"]
    assert summary["distill_data"] == distill_data
    assert summary["kl_last"] < 0.7 * summary["kl_first"]
    assert summary["acceptance_k2"] > summary["acceptance_k2_before"]
    target, draft = mmafm.load_model(outputs["checkpoint"]), mmafm.load_model(outputs["draft"])
    assert draft.config.n_layers == 1 and draft.config.dim == target.config.dim
    prompts = held_out_prompts(target_model["tokens_dir"], 4, 8)
    again = acceptance_by_k(target, draft, prompts, 16, [2, 4])
    assert round(again[2], 4) == summary["acceptance_k2"] and round(again[4], 4) == summary["acceptance_k4"]
    assert summary["speedup"] > 0 and summary["distill_tokens"] == 40 * 8 * 32


@pytest.mark.slow
def test_stage_notebook_runs(tmp_path, target_model):
    papermill = pytest.importorskip("papermill")
    from mmafm.stages.base import read_manifest

    out_dir = tmp_path / "13_train_draft"
    params = dict(out_dir=str(out_dir), **target_model, seq_len=32, batch_size=4, max_steps=3, ks="1,2", k=2,
                  eval_prompts=2, prompt_len=8, eval_tokens=8, timing_repeats=1, eval_batches=1, warmup_steps=1,
                  log_every=1)
    assert set(params) <= {f.name for f in dataclasses.fields(TrainDraftConfig)}
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "13_train_draft.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters=params, kernel_name="mmafm", cwd=str(ROOT), progress_bar=False,
    )
    manifest = read_manifest(out_dir)
    assert {Path(f).stem for f in manifest["figures"]} == {"acceptance", "loss"}
    assert set(manifest["outputs"]) == {"draft", "checkpoint", "preset", "tokenizer", "metrics"}
