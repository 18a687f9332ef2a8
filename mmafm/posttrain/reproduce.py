"""The post-training ablations of ``notebooks/reproduce_post_training.ipynb``, over seeds.

- :func:`reward_model_ablation`: 08_reward_model with ``loss = soft | margin | hard`` (the 2024
  report: the soft-label loss beat Llama 2's margin loss), accuracy per level and ECE;
- :func:`rl_ablation`: 09_rlhf with ``algorithm = mdloo | ppo_clip | reinforce_loo`` (the report:
  MDLOO beat PPO) and prompt selection on / off, every rollout batch's reward, oracle score and
  KL to the SFT model, and the oracle's win / tie / loss of each RLHF model against SFT (the 2025
  report's RLHF-over-SFT 16:9, here judged by code).

Each run is a stage run in a folder of its own under ``out_dir`` (a finished one is reused).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

__all__ = ["run_once", "reward_model_ablation", "rl_ablation", "mean_std_rows", "ablation_figures"]


def run_once(stage: str, config: Any) -> dict:
    """Run ``stage`` with ``config`` unless its folder already holds a finished run; its manifest."""
    from mmafm.stages import get_stage
    from mmafm.stages.base import read_manifest

    if not (Path(config.out_dir) / "manifest.json").is_file():
        get_stage(stage).run(config)
    return read_manifest(config.out_dir)


def reward_model_ablation(base: Any, losses: Sequence[str] = ("soft", "margin", "hard"), seeds: Sequence[int] = (0, 1, 2)
                          ) -> list[dict]:
    """One row per (loss, seed): held-out accuracy overall and per level, ECE. ``base`` is a
    :class:`~mmafm.stages.reward_model.RewardModelStageConfig` whose ``out_dir`` is the parent
    folder."""
    rows = []
    for loss in losses:
        for seed in seeds:
            config = replace(base, loss=loss, seed=seed, out_dir=str(Path(base.out_dir) / f"rm_{loss}_seed{seed}"))
            manifest = run_once("08_reward_model", config)
            facts = json.loads(Path(manifest["outputs"]["evaluation"]).read_text())
            rows.append({"loss": loss, "seed": seed, "accuracy": facts["accuracy"], "ece": facts["ece"],
                         **{f"acc_{level}": value for level, value in facts["accuracy_per_level"].items()}})
    return rows


def rl_ablation(base: Any, variants: dict[str, dict], seeds: Sequence[int] = (0, 1, 2)) -> tuple[list[dict], dict]:
    """``(rows, curves)``: one row per (variant, seed) with the last rollout batch's reward, oracle
    score and KL, the pass rates and the win / tie / loss against SFT; ``curves[variant][seed]``
    the rollout history. ``variants`` maps a name to the 09_rlhf fields it changes."""
    rows, curves = [], {}
    for name, changes in variants.items():
        for seed in seeds:
            folder = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")  # "mdloo, no prompt selection" -> mdloo_no_prompt_selection
            config = replace(base, seed=seed, out_dir=str(Path(base.out_dir) / f"rl_{folder}_seed{seed}"), **changes)
            manifest = run_once("09_rlhf", config)
            summary = manifest["summary"]
            win, tie, loss = (int(x) for x in summary["win_tie_loss_vs_sft"].split(":"))
            history = json.loads(Path(manifest["outputs"]["rollouts"]).read_text())
            curves.setdefault(name, {})[seed] = history
            rows.append({"variant": name, "seed": seed, "reward_last": summary["reward_last"],
                         "oracle_last": summary["oracle_last"], "kl_ref_last": summary["kl_ref_last"],
                         "pass_sft": summary["pass_mean_sft"], "pass_rlhf": summary["pass_mean_rlhf"],
                         "win": win, "tie": tie, "loss": loss, "samples_per_s": summary["samples_per_s"]})
    return rows, curves


def mean_std_rows(rows: list[dict], key: str) -> list[dict]:
    """Rows grouped by ``key`` (e.g. ``"loss"``): every numeric column's mean and std over seeds."""
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    out = []
    for name, members in groups.items():
        entry: dict[str, Any] = {key: name, "seeds": len(members)}
        for column in members[0]:
            values = [m[column] for m in members if isinstance(m.get(column), (int, float))]
            if column in (key, "seed") or len(values) != len(members):
                continue
            entry[column] = statistics.fmean(values)
            entry[f"{column}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def ablation_figures(rm_rows: list[dict], curves: dict, out_dir: str | Path) -> list[Path]:
    """``reward_model_losses.png`` (accuracy per level and ECE per loss) and ``rl_reward_kl.png``
    (the oracle's score against KL to SFT per rollout batch, each variant averaged over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmafm.io import atomic_path

    out_dir = Path(out_dir)
    paths = []
    summary = mean_std_rows(rm_rows, "loss")
    levels = [c for c in summary[0] if c.startswith("acc_") and not c.endswith("_std")] if summary else []
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(summary), 1)
    for index, row in enumerate(summary):
        left.bar([i + index * width for i in range(len(levels))], [row[c] for c in levels], width,
                 yerr=[row[c + "_std"] for c in levels], label=row["loss"])
    left.set_xticks([i + width * (len(summary) - 1) / 2 for i in range(len(levels))], [c[4:] for c in levels])
    left.set(ylim=(0, 1.05), ylabel="held-out accuracy", title="reward model: accuracy per preference level")
    left.legend(fontsize=8)
    right.bar([r["loss"] for r in summary], [r["ece"] for r in summary], yerr=[r["ece_std"] for r in summary])
    right.set(title="ECE (lower is better)")
    paths.append(out_dir / "reward_model_losses.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, by_seed in curves.items():
        length = min(len(h) for h in by_seed.values())
        kl = [statistics.fmean(h[i]["kl_ref"] for h in by_seed.values()) for i in range(length)]
        score = [statistics.fmean(h[i]["oracle_score"] for h in by_seed.values()) for i in range(length)]
        ax.plot(kl, score, "o-", ms=3, label=name)
    ax.set(xlabel="KL(policy || SFT) per answer (nats)", ylabel="oracle score (0-10)",
           title="RL: oracle score against KL to the reference (mean over seeds)")
    ax.legend(fontsize=8)
    paths.append(out_dir / "rl_reward_kl.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths
