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
                            mask_steps=2, seq_len=32, batch_size=4, eval_batches=1, eval_tasks="")
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


def test_teacher_cost_curves_price_what_each_teacher_trained(larger_model):
    """Both teachers start from the same dense model (upcycling keeps its loss); each curve point
    costs train_flops_per_token x the tokens trained; the ratio is the two costs to the target."""
    from mmafm.stages.prune import compare_teacher_costs, cost_to_reach
    from mmafm.train.distill import train_flops_per_token, upcycled_teacher

    result, moe = compare_teacher_costs(larger_model["checkpoint"], larger_model["tokens_dir"], larger_model["tokens_dir"],
                                        moe_steps=3, dense_max_steps=4, eval_every=2, seq_len=32, batch_size=4,
                                        lr=1e-3, num_experts=4, eval_batches=1, scratch_steps=2,
                                        scratch_ffn_multiplier=2, base_flops=5e9, base_seconds=9.0)
    assert [p["step"] for p in result["moe"]] == [0, 2, 3] and [p["step"] for p in result["dense"]] == [0, 2, 4]
    names = [row["name"] for row in result["arms"]]
    assert names == ["upcycled MoE", "dense, more steps", "larger dense (2x FFN), from scratch"]
    starts = [(row["start_flops"], row["start_seconds"]) for row in result["arms"]]
    assert starts == [(5e9, 9.0), (5e9, 9.0), (0.0, 0.0)]  # the dense base is paid by the arms built on it
    scratch = result["arms"][2]
    assert [p["step"] for p in scratch["curve"]] == [0, 2]
    assert scratch["params_M"] > result["dense_params_M"]  # a larger preset, its own fresh weights
    assert result["moe"][0]["val_loss"] == pytest.approx(result["dense"][0]["val_loss"], abs=1e-4)
    dense = mmafm.load_model(larger_model["checkpoint"])
    for name, model in (("moe", moe), ("dense", dense)):
        for point in result[name]:
            assert point["tokens"] == point["step"] * 4 * 32
            assert point["flops"] == pytest.approx(train_flops_per_token(model, 32) * point["tokens"])
        seconds = [p["seconds"] for p in result[name]]
        assert seconds == sorted(seconds) and seconds[-1] > 0
    assert train_flops_per_token(moe, 32) == train_flops_per_token(upcycled_teacher(dense, 4, 2, 2), 32)
    assert result["target"] == min(p["val_loss"] for p in result["moe"][1:])
    if result["flops_ratio"] is not None:
        assert result["flops_ratio"] == pytest.approx(cost_to_reach(result["moe"], result["target"])["flops"]
                                                      / cost_to_reach(result["dense"], result["target"])["flops"])


def _closed_form_train_flops_per_token(config, seq_len: int) -> float:
    """``6 x`` the matmul parameters one token uses, from the config alone (tied embedding once;
    an MoE layer: its router and ``top_k`` experts), plus ``6 x n_layers x n_heads x head_dim x
    (seq_len + 1)`` for the attention scores and values (Kaplan et al. 2020)."""
    dim, head = config.dim, config.head_dim
    attention = 2 * dim * config.n_heads * head + 2 * dim * config.n_kv_heads * head  # q, o; k, v
    dense_ffn = 3 * dim * config.ffn_dim
    moe_ffn = dim * config.num_experts + config.top_k * dense_ffn
    layers = sum(attention + (moe_ffn if config.num_experts and index % config.moe_every == config.moe_every - 1
                              else dense_ffn) for index in range(config.n_layers))
    return 6.0 * (config.vocab_size * dim + layers) + 6.0 * config.n_layers * config.n_heads * head * (seq_len + 1)


def test_cost_to_reach_interpolates_the_first_crossing():
    """Hand-checked curves: linear between the two evaluations around the first crossing, the
    start when already there, None when never reached (a later dip does not count twice)."""
    from mmafm.stages.prune import cost_to_reach

    def point(step, loss):
        return {"step": step, "tokens": 10 * step, "flops": 100.0 * step, "seconds": 0.5 * step, "val_loss": loss}

    curve = [point(0, 5.0), point(2, 3.0), point(4, 4.0), point(6, 2.0)]
    # 3.5 is crossed first between steps 0 and 2, three quarters of the way down from 5.0: step 1.5
    assert cost_to_reach(curve, 3.5) == pytest.approx({"step": 1.5, "tokens": 15, "flops": 150.0, "seconds": 0.75})
    # 2.5: not before the 4.0 -> 2.0 segment, three quarters along it: step 5.5
    assert cost_to_reach(curve, 2.5) == pytest.approx({"step": 5.5, "tokens": 55, "flops": 550.0, "seconds": 2.75})
    assert cost_to_reach(curve, 5.0) == {"step": 0, "tokens": 0, "flops": 0.0, "seconds": 0.0}
    assert cost_to_reach(curve, 1.9) is None


def test_teacher_cost_curves_count_flops_and_read_the_crossing(larger_model):
    """A tiny instance of the cost-to-target comparison: every curve point costs the closed-form
    training FLOPs per token x the tokens trained; each arm's cost is the linear interpolation
    between the evaluations around its first crossing of the target; ratios are the reference's
    cost over the arm's (plus starting costs in the "with start" ratios); an arm that never
    reaches the target (LR 0: it never moves) gets only a bound, the reference's cost over its
    whole run."""
    import numpy as np

    from mmafm.stages.prune import TeacherArm, teacher_cost_curves
    from mmafm.stages.text_pretrain import held_out_batches
    from mmafm.train.distill import upcycled_teacher

    dense = mmafm.load_model(larger_model["checkpoint"])
    config = dense.config
    moe = upcycled_teacher(mmafm.load_model(larger_model["checkpoint"]), 4, 2, 2)
    torch.manual_seed(0)
    larger = mmafm.models.text.TextModel(dataclasses.replace(config, ffn_dim=2 * config.ffn_dim))
    tokens = larger_model["tokens_dir"]
    arms = [TeacherArm("moe", moe, tokens, 4, 3e-3, start_flops=1e9, start_seconds=7.0),
            TeacherArm("dense", dense, tokens, 6, 3e-3, start_flops=1e9, start_seconds=7.0),
            TeacherArm("scratch", larger, tokens, 4, 1e-2, schedule="cosine", warmup_steps=1),
            TeacherArm("frozen", mmafm.load_model(larger_model["checkpoint"]), tokens, 2, 0.0)]
    val_batches = held_out_batches(tokens, 32, 4, 1)
    result = teacher_cost_curves(arms, val_batches, reference="moe", eval_every=1, seq_len=32, batch_size=4)
    rows = {row["name"]: row for row in result["arms"]}
    for arm in arms:
        row = rows[arm.name]
        closed_form = _closed_form_train_flops_per_token(arm.model.config, 32)
        assert row["flops_per_token"] == pytest.approx(closed_form, rel=1e-12)
        assert [p["step"] for p in row["curve"]] == list(range(arm.steps + 1))
        for p in row["curve"]:
            assert p["tokens"] == p["step"] * 4 * 32 and p["flops"] == pytest.approx(closed_form * p["tokens"])
    start_loss = rows["moe"]["curve"][0]["val_loss"]
    assert rows["frozen"]["curve"][-1]["val_loss"] == pytest.approx(start_loss, abs=1e-6)  # LR 0 never moves
    assert result["target"] == min(p["val_loss"] for p in rows["moe"]["curve"][1:]) < start_loss
    for row in result["arms"]:
        losses = [p["val_loss"] for p in row["curve"]]
        first = next((i for i, loss in enumerate(losses) if loss <= result["target"]), None)
        if first is None:
            assert row["cost"] is None and not row["reached"]
            continue
        # independent reading: np.interp over the bracketing pair, loss decreasing -> reverse it
        before, after = row["curve"][max(first - 1, 0)], row["curve"][first]
        expected = np.interp(result["target"], [after["val_loss"], before["val_loss"]], [after["flops"], before["flops"]])
        assert row["cost"]["flops"] == pytest.approx(expected)
    ref = rows["moe"]["cost"]
    assert rows["dense"]["reached"] and rows["dense"]["cost"]["step"] != int(rows["dense"]["cost"]["step"])  # between evaluations
    for row in result["arms"]:
        if row["cost"] is not None:
            assert row["ratio_flops"] == pytest.approx(ref["flops"] / row["cost"]["flops"])
            assert row["ratio_seconds"] == pytest.approx(ref["seconds"] / row["cost"]["seconds"])
            assert row["ratio_flops_with_start"] == pytest.approx((ref["flops"] + 1e9)
                                                                  / (row["cost"]["flops"] + row["start_flops"]))
            assert row["ratio_flops_bound"] is None
    frozen = rows["frozen"]
    assert frozen["ratio_flops"] is None
    assert frozen["ratio_flops_bound"] == pytest.approx(ref["flops"] / frozen["curve"][-1]["flops"])
    with pytest.raises(ValueError, match="nope"):
        teacher_cost_curves(arms[:1], val_batches, reference="nope", eval_every=1, seq_len=32, batch_size=4)


def test_table6_rows_hold_the_text_tasks(tmp_path, larger_model):
    """Every row scored on the lm-eval local tasks (cloze, wordnet, arith); the row's score is the
    one in lm-eval's saved results, the summary's mean and std those of the rows."""
    import statistics

    from mmafm.stages.prune import TABLE6_TASKS, reproduce_table6, table6_figure, table6_summary, table6_task_metrics

    assert TABLE6_TASKS == ("mmafm_cloze", "mmafm_wordnet", "mmafm_arith")
    rows = reproduce_table6(larger_model["checkpoint"], larger_model["tokens_dir"], seeds=(0,), steps=1,
                            mask_steps=1, seq_len=32, batch_size=4, eval_batches=1, eval_task_size=2,
                            variants=("baseline",), tasks_out_dir=tmp_path / "tasks")
    assert {"cloze_acc", "wordnet_acc", "arith_exact_match"} <= set(table6_task_metrics(rows))
    for row in rows:
        saved = json.loads((tmp_path / "tasks" / f"baseline-seed{row['seed']}" / "results.json").read_text())["results"]
        assert row["cloze_acc"] == pytest.approx(saved["mmafm_cloze"]["acc,none"], abs=1e-4)
        exact = [v for k, v in saved["mmafm_arith"].items() if k.split(",")[0] == "exact_match"]
        assert row["arith_exact_match"] == pytest.approx(exact[0], abs=1e-4)
    # a second seed's row, made up: the summary's mean and std over seeds (statistics as the reference)
    rows.append({**rows[0], "seed": 1, "cloze_acc": 0.25, "wordnet_acc": 1.0, "arith_exact_match": 0.5})
    (summary,) = table6_summary(rows)
    for metric in ("cloze_acc", "wordnet_acc", "arith_exact_match"):
        values = [r[metric] for r in rows]
        assert summary[f"{metric}_mean"] == pytest.approx(statistics.mean(values))
        assert summary[f"{metric}_std"] == pytest.approx(statistics.stdev(values))
    table6_figure([summary], str(tmp_path / "table6.png"))
    assert (tmp_path / "table6.png").stat().st_size > 0
    with pytest.raises(ValueError, match="mmafm_nope"):
        reproduce_table6(larger_model["checkpoint"], larger_model["tokens_dir"], eval_tasks="mmafm_nope")


@pytest.mark.slow
def test_reproduce_distillation_notebook_runs(tmp_path, larger_model):
    papermill = pytest.importorskip("papermill")

    out = tmp_path / "table6"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "reproduce_distillation.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters=dict(checkpoint=larger_model["checkpoint"], tokens_dir=larger_model["tokens_dir"], out_dir=str(out),
                        seeds=2, steps=2, mask_steps=2, seq_len=32, batch_size=4, eval_batches=1, teacher_steps=2,
                        num_experts=4, threads=1, eval_tasks="mmafm_wordnet", eval_task_size=2, slice_tokens=1500,
                        slice_min_tokens=4, dense_max_steps=3, teacher_eval_every=1, teacher_eval_batches=1,
                        teacher_warmup_steps=1, scratch_steps=2, scratch_ffn_multiplier=2),
        kernel_name="mmafm", cwd=str(ROOT), progress_bar=False,
    )
    result = json.loads((out / "table6.json").read_text())
    variants = [r["variant"] for r in result["summary"]]
    assert variants == ["baseline", "pruned init", "distillation", "pruned + distillation",
                        "pruned + distillation (MoE teacher)"]
    assert all(r["seeds"] == 2 for r in result["summary"]) and len(result["teachers"]) == 4  # 02's run + 3 arms
    assert (out / "table6.png").is_file() and "| baseline | 2 |" in (out / "table6.md").read_text()
    # the text task in every row and the table; the teachers' curves on the quality slice
    assert all("wordnet_acc" in r for r in result["rows"]) and "wordnet_acc (mean ± std)" in (out / "table6.md").read_text()
    cost, quality = result["teacher_cost"], result["quality_slice"]
    assert [p["step"] for p in cost["moe"]] == [0, 1, 2] and [p["step"] for p in cost["dense"]] == [0, 1, 2, 3]
    assert [a["name"] for a in cost["arms"]][2] == "larger dense (2x FFN), from scratch"
    assert cost["moe"][0]["val_loss"] == pytest.approx(cost["dense"][0]["val_loss"], abs=1e-4)  # upcycling keeps the function
    assert quality["tokens_kept"] == (out / "quality_slice" / "train.bin").stat().st_size // 4 >= 1500
    assert (out / "teacher_cost.png").is_file()
