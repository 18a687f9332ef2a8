"""Stage 12_prune: its YAML holds the config defaults, bad inputs are named, and the notebook runs
end to end under papermill on a tiny model: masks learned, the materialized model saved as a plain
model whose held-out loss is the one the stage reports, distillation run.

References: the saved checkpoints themselves (reloaded and re-scored here), the config dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

import mmafm
from mmafm.config import ConfigError, from_dict, load_yaml
from mmafm.stages.prune import PruneStageConfig, run
from mmafm.train.trainer import TrainSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def larger_model(tmp_path_factory) -> dict[str, str]:
    """Token shards, their tokenizer and a (random-init) tiny text model saved as 02 saves one."""
    from mmafm.data.shards import write_token_shards
    from mmafm.data.synthetic import describe, sample_scene
    from mmafm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("prune_stage")
    rng = random.Random(0)
    docs = [(f"scene-{i}", describe(sample_scene(rng))) for i in range(400)]
    tokenizer = train_tokenizer([text for _, text in docs], root / "tok" / "tokenizer", vocab_size=300)
    write_token_shards(docs, tokenizer, root / "tokens", val_fraction=0.1)
    torch.manual_seed(0)
    model = mmafm.create_model("afm_2024_device_tiny", vocab_size=tokenizer.vocab_size)
    checkpoint = mmafm.save_model(root / "text_model", model, {"tokenizer": str(tokenizer.path)})
    return {"checkpoint": str(checkpoint), "tokens_dir": str(root / "tokens"), "tokenizer": str(tokenizer.path)}


def test_yaml_holds_the_config_defaults():
    values = load_yaml(ROOT / "configs" / "stages" / "12_prune.yaml")
    assert from_dict(PruneStageConfig, values) == PruneStageConfig()
    fields = {f.name for f in dataclasses.fields(PruneStageConfig)}
    own = fields - {f.name for f in dataclasses.fields(TrainSettings)} - {"out_dir"}
    assert own <= set(values) <= fields  # every stage field, and the trainer settings it sets
    assert PruneStageConfig.distill_weight == 0.9  # [paper]


def test_inputs_are_checked(tmp_path, larger_model):
    with pytest.raises(ConfigError, match="checkpoint is empty"):
        run(PruneStageConfig(out_dir=str(tmp_path / "a")))
    other = mmafm.save_model(tmp_path / "other", mmafm.create_model("afm_2024_device_tiny", vocab_size=64), {})
    with pytest.raises(ConfigError, match="64-token vocabulary"):
        run(PruneStageConfig(out_dir=str(tmp_path / "b"), **{**larger_model, "checkpoint": str(other)}))


@pytest.mark.slow
def test_stage_notebook_prunes_and_distils(tmp_path, larger_model):
    papermill = pytest.importorskip("papermill")
    from mmafm.eval.perplexity import token_nll
    from mmafm.stages.base import read_manifest
    from mmafm.stages.text_pretrain import held_out_batches

    out_dir = tmp_path / "12_prune"
    params = dict(out_dir=str(out_dir), **larger_model, keep_ratio=0.25, seq_len=32, batch_size=4, max_steps=4,
                  distill_steps=3, eval_batches=2, warmup_steps=1, log_every=1)
    assert set(params) <= {f.name for f in dataclasses.fields(PruneStageConfig)}
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "12_prune.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters=params, kernel_name="mmafm", cwd=str(ROOT), progress_bar=False,
    )
    manifest = read_manifest(out_dir)
    outputs, summary = manifest["outputs"], manifest["summary"]
    assert {Path(f).stem for f in manifest["figures"]} == {"masks", "loss"}
    assert summary["ffn_dim_pruned"] == round(0.25 * 252) and summary["params_M_pruned"] < summary["params_M"]
    assert summary["mask_tokens"] == 4 * 4 * 32 and summary["distill_tokens"] == 3 * 4 * 32
    assert all(0 <= summary[f"val_acc_{name}"] <= 1 for name in ("original", "learned_prune", "pruned_distilled"))
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    temperatures = [r["temperature"] for r in records if "temperature" in r]
    assert len(temperatures) == 4 and temperatures[-1] == pytest.approx(PruneStageConfig.final_temperature, rel=1e-5)
    assert (out_dir / "distill" / "metrics.jsonl").is_file()

    # both saved models are plain models of the source preset with a smaller ffn_dim; their
    # held-out losses are the ones the stage reports
    batches = held_out_batches(larger_model["tokens_dir"], 32, 4, 2)
    for output, key in (("pruned_model", "val_loss_learned_prune"), ("checkpoint", "val_loss_pruned_distilled")):
        model = mmafm.load_model(outputs[output])
        assert model.config.ffn_dim == 63 and model.model_spec.preset == "afm_2024_device_tiny"
        total, count = token_nll(model, batches)
        assert total / count == pytest.approx(summary[key], abs=1e-3)
    assert mmafm.load_model(out_dir).config.ffn_dim == 63  # the stage folder loads its main model


def test_table6_runs_every_variant_on_equal_tokens(tmp_path, larger_model):
    import statistics

    from mmafm.stages.prune import TABLE6_VARIANTS, reproduce_table6, table6_figure, table6_summary

    rows = reproduce_table6(larger_model["checkpoint"], larger_model["tokens_dir"], seeds=(0, 1), steps=2,
                            mask_steps=2, seq_len=32, batch_size=4, eval_batches=1)
    assert [(r["variant"], r["seed"]) for r in rows] == [(v, s) for s in (0, 1) for v in TABLE6_VARIANTS]
    assert {r["train_tokens"] for r in rows} == {2 * 4 * 32}  # equal tokens
    summary = table6_summary(rows)
    baseline = [r["val_ppl"] for r in rows if r["variant"] == "baseline"]
    assert summary[0]["val_ppl_mean"] == pytest.approx(statistics.mean(baseline))
    assert summary[0]["val_ppl_std"] == pytest.approx(statistics.stdev(baseline))
    # distillation costs the student the same FLOPs (the teacher's forward is not counted)
    assert len({r["train_flops"] for r in rows}) == 1
    table6_figure(summary, str(tmp_path / "table6.png"))
    assert (tmp_path / "table6.png").stat().st_size > 0


@pytest.mark.slow
def test_reproduce_distillation_notebook_runs(tmp_path, larger_model):
    papermill = pytest.importorskip("papermill")

    out = tmp_path / "table6"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "reproduce_distillation.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters=dict(checkpoint=larger_model["checkpoint"], tokens_dir=larger_model["tokens_dir"], out_dir=str(out),
                        seeds=2, steps=2, mask_steps=2, seq_len=32, batch_size=4, eval_batches=1, teacher_steps=2,
                        num_experts=4, threads=1),
        kernel_name="mmafm", cwd=str(ROOT), progress_bar=False,
    )
    result = json.loads((out / "table6.json").read_text())
    variants = [r["variant"] for r in result["summary"]]
    assert variants == ["baseline", "pruned init", "distillation", "pruned + distillation",
                        "pruned + distillation (MoE teacher)"]
    assert all(r["seeds"] == 2 for r in result["summary"]) and len(result["teachers"]) == 3
    assert (out / "table6.png").is_file() and "| baseline | 2 |" in (out / "table6.md").read_text()
