"""Stages 07_sft, 08_reward_model, 09_rlhf: configs, errors, the RL stage run directly on a tiny
model, and the three notebooks executed end to end by papermill (07 -> 08 -> 09).

References: the stage config dataclasses (YAML defaults); the rollouts' own bookkeeping
(iterations = optimizer steps / inner steps); the checkpoint written by 07 loading back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mmafm.config import ConfigError, from_dict, load_yaml
from mmafm.stages.reward_model import RewardModelStageConfig
from mmafm.stages.rlhf import RlhfStageConfig
from mmafm.stages.rlhf import run as run_rlhf
from mmafm.stages.sft import SftStageConfig
from mmafm.stages.sft import run as run_sft

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"07_sft": SftStageConfig, "08_reward_model": RewardModelStageConfig, "09_rlhf": RlhfStageConfig}
FAMILIES = "arithmetic,format_list,tool_call"  # short conversations: the fixture's tokenizer has 300 pieces


@pytest.mark.parametrize("stage", list(CONFIGS))
def test_yaml_holds_the_config_defaults(stage):
    values = load_yaml(ROOT / "configs" / "stages" / f"{stage}.yaml")
    assert from_dict(CONFIGS[stage], values) == CONFIGS[stage]()
    assert set(values) <= {f.name for f in dataclasses.fields(CONFIGS[stage])}


def test_stage_errors_name_the_problem(tmp_path, text_checkpoint):
    with pytest.raises(ConfigError, match="checkpoint is empty"):
        run_sft(SftStageConfig(out_dir=str(tmp_path / "a")))
    paths = {"checkpoint": str(text_checkpoint["checkpoint"]), "tokenizer": str(text_checkpoint["tokenizer"].path)}
    with pytest.raises(ConfigError, match=r"families \['poems'\] are not task families"):
        run_sft(SftStageConfig(out_dir=str(tmp_path / "b"), families="poems", **paths))
    with pytest.raises(ConfigError, match="reward_model is empty"):
        run_rlhf(RlhfStageConfig(out_dir=str(tmp_path / "c"), **paths))


def test_rlhf_stage_runs_on_the_oracle(tmp_path, text_checkpoint):
    from mmafm.stages.base import read_manifest

    out_dir = tmp_path / "09_rlhf"
    cfg = RlhfStageConfig(out_dir=str(out_dir), checkpoint=str(text_checkpoint["checkpoint"]),
                          tokenizer=str(text_checkpoint["tokenizer"].path), reward="oracle", algorithm="reinforce_loo",
                          families=FAMILIES, prompts_per_family=3, keep_share=0.5, selection_samples=2, eval_examples=2,
                          n=2, prompts_per_iteration=2, max_new_tokens=6, max_steps=3)
    run_rlhf(cfg)
    summary = read_manifest(out_dir)["summary"]
    assert summary["iterations"] == 3  # reinforce_loo: one optimizer step per rollout batch
    assert summary["prompt_selection"]["kept"] == 5  # ceil(0.5 x 9 candidates)
    assert sum(int(x) for x in summary["win_tie_loss_vs_sft"].split(":")) == 6
    assert {Path(f).stem for f in read_manifest(out_dir)["figures"]} == {"reward_kl", "pass_win"}


@pytest.mark.slow
def test_post_training_notebooks_run_end_to_end(tmp_path, text_checkpoint):
    papermill = pytest.importorskip("papermill")
    from mmafm.checkpoint import load_model
    from mmafm.stages.base import read_manifest

    tokenizer = str(text_checkpoint["tokenizer"].path)

    def execute(stage: str, **params) -> dict:
        params = {"out_dir": str(tmp_path / stage), "tokenizer": tokenizer, "families": FAMILIES, **params}
        assert set(params) <= {f.name for f in dataclasses.fields(CONFIGS[stage])}
        papermill.execute_notebook(str(ROOT / "notebooks" / f"{stage}.ipynb"), str(tmp_path / f"{stage}.ipynb"),
                                   parameters=params, kernel_name="mmafm", cwd=str(ROOT), progress_bar=False)
        return read_manifest(tmp_path / stage)

    sft = execute("07_sft", checkpoint=str(text_checkpoint["checkpoint"]), train_examples=8, eval_examples=2,
                  batch_size=4, max_steps=3, log_every=1, eval_every=1, max_new_tokens=6)
    assert {Path(f).stem for f in sft["figures"]} == {"loss", "pass_rates"}
    assert {f"pass_{f}_after" for f in FAMILIES.split(",")} <= set(sft["summary"])
    records = [json.loads(line) for line in (tmp_path / "07_sft" / "metrics.jsonl").read_text().splitlines()]
    val = [r["eval/val_loss"] for r in records if "eval/val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]  # it learns the assistant spans
    assert load_model(sft["outputs"]["checkpoint"]).config.dropout == 0.0  # saved for inference

    rm = execute("08_reward_model", checkpoint=sft["outputs"]["checkpoint"], prompts_per_family=3, max_tokens=512,
                 eval_prompts_per_family=2, pairs_per_prompt=2, batch_size=4, max_steps=2, log_every=1)
    assert {Path(f).stem for f in rm["figures"]} == {"loss", "accuracy_calibration"}
    assert 0.0 <= rm["summary"]["ece"] <= 1.0 and rm["summary"]["val_pairs"] == 12

    rl = execute("09_rlhf", checkpoint=sft["outputs"]["checkpoint"], reward_model=rm["outputs"]["reward_model"],
                 prompts_per_family=2, keep_share=1.0, eval_examples=1, n=2, prompts_per_iteration=2, inner_steps=2,
                 max_new_tokens=6, max_steps=4)
    assert rl["summary"]["iterations"] == 2 and rl["summary"]["algorithm"] == "mdloo"
    assert rl["summary"]["samples_per_s"] > 0
    rollouts = json.loads(Path(rl["outputs"]["rollouts"]).read_text())
    assert [r["iteration"] for r in rollouts] == [1, 2] and all("oracle_score" in r for r in rollouts)


@pytest.mark.slow
def test_reproduce_notebook_runs_every_ablation(tmp_path, text_checkpoint):
    papermill = pytest.importorskip("papermill")

    out = tmp_path / "out"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "reproduce_post_training.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters=dict(sft_checkpoint=str(text_checkpoint["checkpoint"]), tokenizer=str(text_checkpoint["tokenizer"].path),
                        out_dir=str(out), seeds=2, families="arithmetic,format_list", rm_steps=2, rm_prompts=3,
                        rl_steps=2, rl_prompts=2, rl_reward="reward_model", itec_samples=2, threads=1),
        kernel_name="mmafm", cwd=str(ROOT), progress_bar=False)
    results = json.loads((out / "results.json").read_text())
    assert sorted({(r["loss"], r["seed"]) for r in results["reward_model"]}) == [
        (loss, seed) for loss in ("hard", "margin", "soft") for seed in (0, 1)]
    assert {r["variant"] for r in results["rl"]} == {"mdloo", "ppo_clip", "reinforce_loo", "mdloo, no prompt selection"}
    assert (out / "rl_mdloo_no_prompt_selection_seed1" / "manifest.json").is_file()
    assert (out / "reward_model_losses.png").is_file() and (out / "rl_reward_kl.png").is_file()
    assert (out / "itec" / "itec_picks.json").is_file()
