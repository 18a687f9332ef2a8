"""Stage 08: the reward model of the 2024 report, trained on the preference oracle's labels.

1. Preference data with no annotators: for ``prompts_per_family`` prompts of every task family
   (:mod:`mmafm.posttrain.tasks`, seed ``seed + 1``, so not 07's own prompts), candidate answers
   from the reference (right / wrong fact / truncated / padded / rude / unsafe / off-format), and
   ``pairs_per_prompt`` pairs labelled by the oracle (:mod:`mmafm.posttrain.oracle`): chosen,
   rejected, one of four preference levels, and both answers' single-sided grades; ``noise`` is
   the oracle's label noise (std of the Gaussian added to each score before comparing).
2. The reward model (:class:`mmafm.posttrain.reward.RewardModel`): 07's SFT model as the trunk,
   a linear preference head and four 3-class grade heads on the last real token; ``loss = soft |
   margin | hard`` (:func:`~mmafm.posttrain.reward.preference_loss`) plus ``grade_weight`` x the
   grade heads' cross-entropy, on the shared trainer.
3. Held-out pairs (other prompts): accuracy per preference level, calibration (ECE of
   ``sigmoid(r_chosen - r_rejected)``, both orders), grade-head accuracy per axis; figures: the
   loss, accuracy per level, the reliability diagram. Saved for 09 with
   :func:`~mmafm.posttrain.reward.save_reward_model`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mmafm.config import ConfigError
from mmafm.io import atomic_write_json
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig, check_tokenizer_vocab, require_inputs
from mmafm.stages.sft import ALL_FAMILIES, _families
from mmafm.train.trainer import setting

__all__ = ["RewardModelStageConfig", "encode_pairs", "evaluate_pairs", "run"]

STAGE = "08_reward_model"


@dataclass
class RewardModelStageConfig(TrainStageConfig):
    """The reward model on oracle-labelled pairs. Defaults: the tiny pipeline (under a minute on
    2 idle cores)."""

    # --- inputs (a pipeline wires them)
    checkpoint: str = field(default="", metadata={"path": "model"})  # the trunk's start: 07_sft's `checkpoint`
    tokenizer: str = field(default="", metadata={"path": "file"})  # 00_data's `tokenizer`
    # --- preference data (mmafm.posttrain.oracle)
    families: str = ALL_FAMILIES  # task families, comma-separated
    prompts_per_family: int = field(default=60, metadata={"min": 1})  # training prompts per family
    eval_prompts_per_family: int = field(default=12, metadata={"min": 1})  # held-out prompts per family
    pairs_per_prompt: int = field(default=4, metadata={"min": 1})  # labelled pairs per prompt (of 21 possible)
    noise: float = field(default=0.5, metadata={"min": 0.0})  # oracle label noise: std added to each score [open]
    max_tokens: int = field(default=192, metadata={"min": 8})  # longest prompt + answer kept (tokens)
    # --- model and loss (mmafm.posttrain.reward)
    loss: str = field(default="soft", metadata={"choices": ("soft", "margin", "hard")})  # [paper: soft beat margin]
    grade_weight: float = field(default=0.5, metadata={"min": 0.0})  # weight of the grade heads' CE [open]
    grade_hidden: int = field(default=0, metadata={"min": 0})  # grade MLP width; 0 = the trunk's dim [open]
    batch_size: int = field(default=8, metadata={"min": 1})  # pairs per step
    max_steps: int = setting("max_steps", 80)
    lr: float = setting("lr", 5e-4)  # [open]
    warmup_steps: int = setting("warmup_steps", 10)
    min_lr_ratio: float = setting("min_lr_ratio", 0.1)
    weight_decay: float = setting("weight_decay", 0.0)
    ckpt_every: int = setting("ckpt_every", 0)


def encode_pairs(pairs: list, tokenizer: Any, max_tokens: int) -> tuple[list[tuple], list, int]:
    """``(items for PairBatches, the kept pairs, dropped)``: each pair's chosen and rejected
    conversation as token ids; pairs with a side longer than ``max_tokens`` are dropped."""
    from mmafm.posttrain.reward import encode_response

    items, kept, dropped = [], [], 0
    for pair in pairs:
        chosen = encode_response(pair.turns, pair.chosen, tokenizer)
        rejected = encode_response(pair.turns, pair.rejected, tokenizer)
        if max(len(chosen), len(rejected)) > max_tokens:
            dropped += 1
            continue
        items.append((chosen, rejected, pair.level, pair.chosen_grades, pair.rejected_grades))
        kept.append(pair)
    return items, kept, dropped


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, batches: list, kept: list) -> dict[str, Any]:
    """Held-out facts: accuracy overall, per level and per family, ECE (both orders), the
    reliability bins, grade-head accuracy per axis."""
    from mmafm.posttrain.oracle import AXES, LEVELS
    from mmafm.posttrain.reward import expected_calibration_error

    model.eval()
    device = next(model.parameters()).device
    rewards, grade_hits, level_ids = [], [], []
    for ids, lengths, levels, grades in batches:
        reward, logits = model(ids.to(device), lengths.to(device))
        rewards.append(torch.stack(reward.chunk(2), dim=1).cpu())
        grade_hits.append((logits.argmax(-1).cpu() == grades).float())  # (2B, 4)
        level_ids.append(levels)
    rewards, levels = torch.cat(rewards), torch.cat(level_ids)
    hits = torch.cat(grade_hits)
    correct = (rewards[:, 0] > rewards[:, 1]).float()
    prob = torch.sigmoid(rewards[:, 0] - rewards[:, 1])
    probabilities, outcomes = torch.cat([prob, 1 - prob]), torch.cat([torch.ones_like(prob), torch.zeros_like(prob)])
    bins = (probabilities * 10).long().clamp(max=9)
    families = sorted({p.family for p in kept})
    return {
        "accuracy": correct.mean().item(),
        "accuracy_per_level": {LEVELS[l]: correct[levels == l].mean().item() for l in range(4) if (levels == l).any()},
        "pairs_per_level": {LEVELS[l]: int((levels == l).sum()) for l in range(4)},
        "accuracy_per_family": {f: correct[torch.tensor([p.family == f for p in kept])].mean().item() for f in families},
        "ece": expected_calibration_error(probabilities, outcomes),
        "mean_probability_per_level": {LEVELS[l]: prob[levels == l].mean().item() for l in range(4) if (levels == l).any()},
        "reliability": [(probabilities[bins == b].mean().item(), outcomes[bins == b].mean().item(), int((bins == b).sum()))
                        for b in range(10) if (bins == b).any()],
        "grade_accuracy": {axis: hits[:, i].mean().item() for i, axis in enumerate(AXES)},
    }


def _figures(stage_dir: StageDir, records: list[dict], facts: dict[str, Any], loss: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmafm.posttrain.reward import LEVEL_TARGETS

    fig, ax = plt.subplots(figsize=(6, 3.4))
    train = [r for r in records if "preference" in r]
    ax.plot([r["step"] for r in train], [r["preference"] for r in train], label=f"preference ({loss})")
    if train and "grades" in train[0]:
        ax.plot([r["step"] for r in train], [r["grades"] for r in train], label="grade heads (weighted CE)")
    ax.set(xlabel="step", ylabel="loss", title="reward model training")
    ax.legend(fontsize=8)
    stage_dir.save_figure(fig, "loss")
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    levels = list(facts["accuracy_per_level"])
    bars = left.bar(levels, [facts["accuracy_per_level"][l] for l in levels])
    left.bar_label(bars, labels=[f"{facts['accuracy_per_level'][l]:.2f}\n(n={facts['pairs_per_level'][l]})"
                                 for l in levels], fontsize=7)
    left.set(ylim=(0, 1.15), ylabel="held-out accuracy", title="accuracy per preference level")
    left.tick_params(axis="x", labelsize=8)
    points = facts["reliability"]
    right.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
    right.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"reward model (ECE {facts['ece']:.3f})")
    for target in LEVEL_TARGETS:
        right.axvline(target, color="grey", lw=0.4)
    right.set(xlabel="sigmoid(r_a - r_b)", ylabel="share where a won", title="reliability (both orders)")
    right.legend(fontsize=8)
    stage_dir.save_figure(fig, "accuracy_calibration")
    plt.close(fig)


def run(cfg: RewardModelStageConfig) -> dict[str, str]:
    """Label pairs, train and evaluate the reward model, plot, save; returns the stage outputs."""
    from mmafm.checkpoint import load_model
    from mmafm.posttrain.oracle import preference_pairs
    from mmafm.posttrain.reward import PairBatches, RewardModel, RewardTask, save_reward_model
    from mmafm.posttrain.tasks import family_conversations
    from mmafm.tokenizer import Tokenizer
    from mmafm.train import Trainer, seed_everything

    require_inputs(cfg, STAGE, dict.fromkeys(("checkpoint", "tokenizer"), "07_sft's `checkpoint` and 00_data's `tokenizer` "
                                             "(configs/pipelines/tiny.yaml wires them)"))
    families = _families(cfg.families)
    start = time.time()
    stage_dir = StageDir(cfg.out_dir, STAGE)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    seed_everything(cfg.seed)
    trunk = load_model(cfg.checkpoint, family="text")
    check_tokenizer_vocab(STAGE, trunk, tokenizer, cfg.tokenizer, "the trunk")
    model = RewardModel(trunk, grade_hidden=cfg.grade_hidden or None)

    conversations = {f: family_conversations(f, cfg.eval_prompts_per_family + cfg.prompts_per_family, cfg.seed + 1)
                     for f in families}
    held = {f: c[: cfg.eval_prompts_per_family] for f, c in conversations.items()}
    train = {f: c[cfg.eval_prompts_per_family :] for f, c in conversations.items()}
    train_items, train_pairs, dropped = encode_pairs(preference_pairs(train, cfg.pairs_per_prompt, cfg.noise, cfg.seed),
                                                     tokenizer, cfg.max_tokens)
    val_items, val_pairs, val_dropped = encode_pairs(
        preference_pairs(held, cfg.pairs_per_prompt, cfg.noise, cfg.seed + 1), tokenizer, cfg.max_tokens)
    if not val_items:
        raise ConfigError(f"{STAGE}: every held-out pair is longer than max_tokens={cfg.max_tokens}")
    val_batches = list(PairBatches(val_items, cfg.batch_size, tokenizer.pad_id, shuffle=False))

    trainer = Trainer(RewardTask(model, cfg.loss, cfg.grade_weight, val_batches),
                      PairBatches(train_items, cfg.batch_size, tokenizer.pad_id), cfg.train_config(), stage_dir)
    records = trainer.fit()
    facts = evaluate_pairs(model, val_batches, val_pairs)
    folder = save_reward_model(stage_dir.root / "reward_model", model,
                               {"tokenizer": cfg.tokenizer, "stage": STAGE, "loss": cfg.loss, "step": trainer.step})
    _figures(stage_dir, records, facts, cfg.loss)
    atomic_write_json(stage_dir.root / "evaluation.json", facts)
    examples = [{"family": p.family, "chosen": p.chosen, "rejected": p.rejected, "level": p.level,
                 "chosen_grades": p.chosen_grades, "rejected_grades": p.rejected_grades} for p in val_pairs[:6]]
    atomic_write_json(stage_dir.root / "samples.json", examples)
    atomic_write_json(stage_dir.root / "data_card_stats.json", {
        "pairs": {"train": len(train_items), "val": len(val_items),
                  "skipped": {f"longer than max_tokens={cfg.max_tokens}": dropped + val_dropped}},
        "flipped_by_noise": sum(p.gap < 0 for p in train_pairs), "config": {"seed": cfg.seed, "noise": cfg.noise}})
    summary: dict[str, Any] = {
        "accuracy": round(facts["accuracy"], 4),
        **{f"accuracy_{level}": round(value, 4) for level, value in facts["accuracy_per_level"].items()},
        "ece": round(facts["ece"], 4),
        **{f"grade_accuracy_{axis}": round(value, 4) for axis, value in facts["grade_accuracy"].items()},
        "loss": cfg.loss,
        "train_pairs": len(train_items),
        "val_pairs": len(val_items),
        "seconds": round(time.time() - start, 1),
    }
    outputs = {"reward_model": str(folder), "checkpoint": cfg.checkpoint, "tokenizer": cfg.tokenizer,
               "evaluation": str(stage_dir.root / "evaluation.json")}
    stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


register_stage(STAGE, RewardModelStageConfig, run)
