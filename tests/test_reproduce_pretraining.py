"""notebooks/reproduce_pretraining.ipynb and its library (mmafm/train/reproduce.py): Table 5's
configs come from the stage YAML, its statistics equal the standard library's, and the notebook
runs end to end under papermill at tiny parameters on a tiny data stage and tiny checkpoints."""

import json
import math
import statistics
from pathlib import Path

import pytest

from _stage_helpers import write_data_stage, write_text_stage
from mmafm.config import ConfigError, load_yaml
from mmafm.train.reproduce import scaled_warmup, table5_summary, text_stage_config

ROOT = Path(__file__).resolve().parents[1]
TEXT_YAML = ROOT / "configs" / "stages" / "02_text_pretrain.yaml"


def test_table5_arms_differ_only_in_the_optimizer_block(tmp_path):
    yaml_values = load_yaml(TEXT_YAML)
    afm = text_stage_config("afm", 1, 240, tmp_path / "a", "T", "K")
    adamw = text_stage_config("adamw", 1, 240, tmp_path / "b", "T", "K", adamw_lr=3e-3, adamw_weight_decay=0.1)
    for key in ("optimizer", "lr", "weight_decay", "grad_skip", "min_lr_ratio", "seq_len", "batch_size", "preset"):
        assert getattr(afm, key) == yaml_values[key]  # the recipe, as the YAML says it today
    assert (adamw.optimizer, adamw.lr, adamw.weight_decay, adamw.grad_skip) == ("adamw", 3e-3, 0.1, 0.0)
    assert afm.max_steps == adamw.max_steps == 240 and afm.seq_len == adamw.seq_len and afm.batch_size == adamw.batch_size
    expected_warmup = max(1, round(yaml_values["warmup_steps"] * 240 / yaml_values["max_steps"]))
    assert afm.warmup_steps == adamw.warmup_steps == expected_warmup
    assert scaled_warmup(50, 1200, 240) == 10 and scaled_warmup(50, 1200, 2) == 1
    with pytest.raises(ConfigError, match="optimizer 'sgd'"):
        text_stage_config("sgd", 0, 10, tmp_path / "c", "T", "K")
    ema = text_stage_config("afm_ema", 1, 240, tmp_path / "d", "T", "K")  # the report's update EMA, else the YAML's
    assert (ema.optimizer, ema.afm_update_ema) == ("afm", 0.95) and afm.afm_update_ema == yaml_values["afm_update_ema"]
    assert (ema.lr, ema.weight_decay, ema.warmup_steps) == (afm.lr, afm.weight_decay, afm.warmup_steps)


def test_table5_summary_is_mean_and_sample_std():
    rows = [{"optimizer": o, "seed": s, "val_ppl": v} for o, s, v in
            [("afm", 0, 10.0), ("adamw", 0, 9.0), ("afm", 1, 12.5), ("adamw", 1, 9.5), ("afm", 2, 11.0), ("adamw", 2, 8.0)]]
    summary = {entry["optimizer"]: entry for entry in table5_summary(rows, ["val_ppl"])}
    for name in ("afm", "adamw"):
        values = [r["val_ppl"] for r in rows if r["optimizer"] == name]
        assert summary[name]["n"] == 3
        assert summary[name]["val_ppl"] == pytest.approx(statistics.mean(values))
        assert summary[name]["val_ppl_std"] == pytest.approx(statistics.stdev(values))


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    """A tiny 00_data stage and random-init 02 / 04 / 05 stage folders (seq_len 32 / 64 / 128,
    05 with its RoPE base raised), laid out as the stages leave them."""
    from mmafm.layers.rope import rope_base_for_context

    root = tmp_path_factory.mktemp("recipe")
    tokenizer = write_data_stage(root, text_cap=120)
    for stage, seq_len, overrides in (("02", 32, {}), ("04", 64, {}),
                                      ("05", 128, {"rope_theta": rope_base_for_context(500_000, 64, 128)})):
        write_text_stage(root / stage, stage, tokenizer, seq_len=seq_len, seed=int(stage), **overrides)
    return {"root": root, "tokenizer": str(tokenizer.path)}


@pytest.mark.slow
def test_notebook_runs_at_tiny_parameters(tiny_recipe, tmp_path):
    papermill = pytest.importorskip("papermill")
    from mmafm.stages.base import read_manifest

    root = tiny_recipe["root"]
    out = tmp_path / "out"
    params = dict(tokens_dir=str(root / "data" / "tokens"), tokenizer=tiny_recipe["tokenizer"], data_dir=str(root / "data"),
                  core_checkpoint=str(root / "02"), continued_checkpoint=str(root / "04"),
                  long_context_checkpoint=str(root / "05"), out_dir=str(out), seeds=2, steps=3, eval_batches=1,
                  task_size=2, task_lengths="256", ppl_lengths="32,64", ladder="256,384", ladder_examples=1)
    papermill.execute_notebook(str(ROOT / "notebooks" / "reproduce_pretraining.ipynb"), str(tmp_path / "run.ipynb"),
                               parameters=params, kernel_name="mmafm", cwd=str(ROOT), progress_bar=False)
    summary = json.loads((out / "summary.json").read_text())

    # Table 5: every run is a finished 02_text_pretrain run of the arm's config, equal tokens
    rows = summary["table5"]["rows"]
    assert sorted((r["optimizer"], r["seed"]) for r in rows) == [
        ("adamw", 0), ("adamw", 1), ("afm", 0), ("afm", 1), ("afm_ema", 0), ("afm_ema", 1)]
    yaml_values = load_yaml(TEXT_YAML)
    yaml_lr = yaml_values["lr"]
    for row in rows:
        manifest = read_manifest(out / "table5" / f"{row['optimizer']}_seed{row['seed']}")
        optimizer = "afm" if row["optimizer"] == "afm_ema" else row["optimizer"]
        assert manifest["config"]["optimizer"] == optimizer and manifest["config"]["seed"] == row["seed"]
        assert manifest["config"]["lr"] == (3e-3 if optimizer == "adamw" else yaml_lr)
        if optimizer == "afm":  # the report's update EMA in the afm_ema arm, the YAML's in the afm arm
            expected = 0.95 if row["optimizer"] == "afm_ema" else yaml_values["afm_update_ema"]
            assert manifest["config"]["afm_update_ema"] == expected
        assert manifest["summary"]["val_ppl"] == row["val_ppl"] and "cloze_acc" in row
    assert len({r["train_tokens"] for r in rows}) == 1
    for name in ("afm", "afm_ema", "adamw"):
        values = [r["val_ppl"] for r in rows if r["optimizer"] == name]
        assert summary[f"table5_{name}_val_ppl"] == pytest.approx(statistics.mean(values), abs=1e-4)
        assert summary[f"table5_{name}_val_ppl_std"] == pytest.approx(statistics.stdev(values), abs=1e-4)

    # Tables 7/8: three checkpoints, perplexity at both lengths, every local task scored
    table78 = summary["table78"]
    assert list(table78) == ["core (02)", "continued (04)", "long-context (05)"]
    for row in table78.values():
        assert math.isfinite(row["ppl@32"]) and row["ppl@64"] > 1
        assert {"cloze_acc", "wordnet_acc", "arith_exact_match", "passkey_exact_match"} <= set(row)

    # Table 9: before = 04 (trained 64), after = 05 (trained 128), accuracies on the ladder
    table9 = summary["table9"]
    assert table9["trained"] == {"before": 64, "after": 128} and table9["lengths"] == [256, 384]
    for side in ("before", "after"):
        assert set(table9[side]["mean"]) == {"256", "384"}
        assert all(0.0 <= v <= 1.0 for v in table9[side]["mean"].values())
    for name in ("table5.png", "table78.png", "table9.png", "tables.md"):
        assert (out / name).stat().st_size > 0
