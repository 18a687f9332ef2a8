"""Stage 09: RLHF over the SFT model with MDLOO (or PPO-clip / REINFORCE-LOO), the 2024 report's
online RL, with the 2025 report's prompt selection.

1. Prompts: ``prompts_per_family`` of each task family (seed ``seed + 2``: not 07's or 08's),
   after ``eval_examples`` held out per family. Prompt selection [paper, 2025]: sample
   ``selection_samples`` answers per prompt from the SFT policy, keep the ``keep_share`` of prompts
   whose reward varies most (1.0 = no selection).
2. The loop (:mod:`mmafm.posttrain.rl`) on the shared trainer: each iteration samples ``n``
   answers for ``prompts_per_iteration`` prompts through the inference wing, scores them with
   ``reward`` -- 08's reward model (``reward_model``, the recipe) or the oracle's score
   (``oracle``, the ground truth the reward model was trained to imitate) -- minus ``beta`` x KL
   to 07's model, and takes ``inner_steps`` optimizer steps of ``algorithm`` (``mdloo``: no
   clipping, ``kl_coef`` x KL to the iteration's start; ``ppo_clip``; ``reinforce_loo``: one step
   per batch). ``max_steps`` counts optimizer steps.
3. After: greedy answers to the held-out prompts by the SFT and the RLHF model, scored by the
   checkers (pass rate per family) and compared pairwise by the oracle (win / tie / loss: the
   2025 report's RLHF-over-SFT 16:9, here judged by code). Figures: reward and oracle score
   against KL to the reference, per iteration; pass rates and the win rate. Samples/s of the
   rollouts are logged per iteration.
4. iTeC (``itec_samples > 0``, :mod:`mmafm.posttrain.itec`): the committee {SFT, RLHF} answers
   the RL prompts ``itec_samples`` times each, the reward (model) picks the best answer per
   prompt, the RLHF model is fine-tuned on the picks for ``itec_steps`` steps; per-member wins
   and the student's pass rates go to the summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mmafm.config import ConfigError
from mmafm.io import atomic_write_json
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig, check_tokenizer_vocab, require_inputs
from mmafm.stages.sft import ALL_FAMILIES, _families, pass_rates
from mmafm.train.trainer import setting

__all__ = ["RlhfStageConfig", "reward_function", "oracle_function", "win_rate", "run"]

STAGE = "09_rlhf"


@dataclass
class RlhfStageConfig(TrainStageConfig):
    """RLHF of 07's model. Defaults: the tiny pipeline (under a minute on 2 idle cores)."""

    # --- inputs (a pipeline wires them)
    checkpoint: str = field(default="", metadata={"path": "model"})  # 07_sft's `checkpoint`: the policy's start and the KL reference
    reward_model: str = field(default="", metadata={"path": "dir"})  # 08_reward_model's `reward_model`; unused with reward=oracle
    tokenizer: str = field(default="", metadata={"path": "file"})  # 00_data's `tokenizer`
    # --- reward and algorithm (mmafm.posttrain.rl)
    reward: str = field(default="reward_model", metadata={"choices": ("reward_model", "oracle")})  # what RL maximises
    algorithm: str = field(default="mdloo", metadata={"choices": ("mdloo", "ppo_clip", "reinforce_loo")})  # [paper: MDLOO]
    n: int = field(default=4, metadata={"min": 2})  # answers per prompt (leave-one-out needs >= 2) [open]
    prompts_per_iteration: int = field(default=4, metadata={"min": 1})  # prompts per rollout batch
    inner_steps: int = field(default=4, metadata={"min": 1})  # optimizer steps per rollout batch (reinforce_loo: 1)
    beta: float = field(default=0.05, metadata={"min": 0.0})  # KL-to-SFT penalty in the reward [open]
    kl_coef: float = field(default=0.1, metadata={"min": 0.0})  # mdloo: KL to the iteration's start policy [open]
    clip: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})  # ppo_clip's epsilon [open: TRL's default]
    temperature: float = field(default=1.0, metadata={"min": 0.05})  # sampling temperature of the rollouts
    max_new_tokens: int = field(default=32, metadata={"min": 1})  # longest sampled answer
    # --- prompts
    families: str = ALL_FAMILIES  # task families, comma-separated
    prompts_per_family: int = field(default=12, metadata={"min": 1})  # candidate RL prompts per family
    keep_share: float = field(default=0.5, metadata={"min": 0.01, "max": 1.0})  # prompt selection: share kept [paper 2025; share open]; 1.0 = off
    selection_samples: int = field(default=4, metadata={"min": 2})  # answers per prompt to measure reward variance
    eval_examples: int = field(default=8, metadata={"min": 1})  # held-out prompts per family (pass rates, win rate)
    # --- iTeC (mmafm.posttrain.itec), after RL; off at 0
    itec_samples: int = field(default=0, metadata={"min": 0})  # answers per prompt from each member (SFT, RLHF); 0 = no iTeC
    itec_steps: int = field(default=10, metadata={"min": 1})  # SFT steps of the RLHF model on the reward model's picks
    # --- the trainer
    max_steps: int = setting("max_steps", 24)  # optimizer steps (iterations x inner_steps)
    lr: float = setting("lr", 2e-4)  # [open]
    schedule: str = setting("schedule", "constant")
    warmup_steps: int = setting("warmup_steps", 0)
    weight_decay: float = setting("weight_decay", 0.0)
    log_every: int = setting("log_every", 1)
    ckpt_every: int = setting("ckpt_every", 0)


def reward_function(reward_model: torch.nn.Module, tokenizer: Any) -> Callable[[list, list[str]], torch.Tensor]:
    """``(contexts, answers) -> rewards (N,)`` of the reward model; a context is ``(family, turns)``."""
    from mmafm.posttrain.reward import _right_pad, encode_response

    @torch.no_grad()
    def score(contexts: list, texts: list[str]) -> torch.Tensor:
        rows = [encode_response(turns, text, tokenizer) for (_, turns), text in zip(contexts, texts)]
        ids, lengths = _right_pad(rows, tokenizer.pad_id)
        return reward_model(ids, lengths)[0].float()

    return score


def oracle_function(contexts: list, texts: list[str]) -> torch.Tensor:
    """``(contexts, answers) -> oracle scores (N,)`` (:func:`mmafm.posttrain.oracle.oracle_score`)."""
    from mmafm.posttrain.oracle import grade, oracle_score

    return torch.tensor([oracle_score(grade(family, text, turns)) for (family, turns), text in zip(contexts, texts)])


def win_rate(contexts: list, first: list[str], second: list[str]) -> dict[str, int]:
    """``{"win", "tie", "loss"}``: how often ``second`` beats ``first`` by the noise-free oracle."""
    a, b = oracle_function(contexts, first), oracle_function(contexts, second)
    return {"win": int((b > a).sum()), "tie": int((b == a).sum()), "loss": int((b < a).sum())}


def _figures(stage_dir: StageDir, history: list[dict], before: dict, after: dict, wins: dict, reward: str) -> None:
    from mmafm.report import stage_figure

    with stage_figure(stage_dir, "reward_kl", 1, 2, figsize=(10, 3.6)) as (fig, (left, right)):
        _reward_kl(fig, left, right, history, reward)
    families = list(before)
    with stage_figure(stage_dir, "pass_win", 1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 1]}) as (_, (left, right)):
        for offset, (label, rates) in enumerate((("SFT (07)", before), ("RLHF", after))):
            bars = left.bar([i + 0.4 * offset for i in range(len(families))], [rates[f] for f in families], 0.4, label=label)
            left.bar_label(bars, fmt="%.2f", fontsize=7)
        left.set_xticks([i + 0.2 for i in range(len(families))], families, fontsize=8, rotation=20)
        left.set(ylim=(0, 1.1), ylabel="checker pass rate (held out)", title="pass rate per family")
        left.legend(fontsize=8)
        right.bar(list(wins), list(wins.values()), color=["tab:green", "tab:grey", "tab:red"])
        right.set(title="RLHF vs SFT (oracle)", ylabel="held-out prompts")


def _reward_kl(fig, left, right, history: list[dict], reward: str) -> None:
    """Reward against KL to the SFT model per rollout batch (left), and both over the batches (right)."""
    kl = [h["kl_ref"] for h in history]
    left.scatter(kl, [h["reward"] for h in history], c=range(len(history)), cmap="viridis", label=f"reward ({reward})")
    for h in history:  # each rollout batch, numbered: the trajectory need not be monotone in KL
        left.annotate(str(h["iteration"]), (h["kl_ref"], h["reward"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if reward != "oracle":
        twin = left.twinx()
        twin.scatter(kl, [h["oracle_score"] for h in history], marker="x", color="tab:red", label="oracle score")
        twin.set_ylabel("oracle score (0-10), x", fontsize=8)
        twin.legend(fontsize=8, loc="lower right")
    left.set(xlabel="KL(policy || SFT) per answer (nats)", ylabel="mean reward", title="reward against KL (points: batches)")
    left.legend(fontsize=8, loc="upper left")
    steps = [h["iteration"] for h in history]
    right.plot(steps, [h["reward"] for h in history], label=f"reward ({reward})")
    right.plot(steps, [h["shaped_reward"] for h in history], label="reward - beta KL")
    right.plot(steps, kl, label="KL to SFT (nats)")
    right.set(xlabel="rollout batch", title="per rollout batch")
    right.legend(fontsize=8)
    fig.subplots_adjust(wspace=0.45)


def _itec(cfg: RlhfStageConfig, stage_dir: StageDir, members: dict, prompts: list, reward_fn: Callable, tokenizer: Any,
          held: dict, generator: torch.Generator) -> dict[str, Any]:
    """One iTeC round over the RL prompts; the RLHF model fine-tuned on the picks (a copy)."""
    import copy

    from mmafm.checkpoint import save_model
    from mmafm.posttrain.itec import committee_picks, pick_conversations
    from mmafm.stages.adapter import ChatBatches, ChatTask, encode_conversations
    from mmafm.train import Trainer

    end = tokenizer.token_id("<|end|>")
    round_ = committee_picks(members, prompts, cfg.itec_samples, reward_fn, tokenizer.decode, end,
                             [end, tokenizer.eos_id], tokenizer.pad_id, cfg.max_new_tokens, cfg.temperature, generator)
    student = copy.deepcopy(members["rlhf"]).train()
    examples, _ = encode_conversations(pick_conversations(round_.picks), tokenizer, student.config.max_seq_len)
    settings = cfg.train_config(max_steps=cfg.itec_steps, warmup_steps=0, log_every=1, schedule="constant")
    Trainer(ChatTask(student, []), ChatBatches(examples, 8, tokenizer.pad_id), settings,
            StageDir(stage_dir.root / "itec", f"{STAGE}/itec")).fit()
    student.eval()
    rates, _ = pass_rates(student, tokenizer, held, cfg.max_new_tokens)
    checkpoint = save_model(stage_dir.checkpoint_dir / "itec_model", student, {"tokenizer": cfg.tokenizer, "stage": STAGE})
    atomic_write_json(stage_dir.root / "itec_picks.json", [
        {"member": p.member, "reward": p.reward, "answer": p.answer} for p in round_.picks])
    return {"checkpoint": str(checkpoint), "summary": {
        "wins": round_.wins, "mean_reward": {k: round(v, 4) for k, v in round_.mean_reward.items()},
        "picks": len(round_.picks), "pass_mean_student": round(sum(rates.values()) / len(rates), 4)}}


def run(cfg: RlhfStageConfig) -> dict[str, str]:
    """Select prompts, run the RL loop, evaluate, plot, save; returns the stage outputs."""
    from mmafm.checkpoint import load_model, save_model
    from mmafm.data.chat import prompt_ids
    from mmafm.posttrain.reward import load_reward_model
    from mmafm.posttrain.rl import PolicyTask, RolloutSource, sample_responses, select_by_reward_variance
    from mmafm.posttrain.tasks import eval_turns, family_conversations
    from mmafm.tokenizer import Tokenizer
    from mmafm.train import Trainer, seed_everything

    inputs = ("checkpoint", "tokenizer") + (("reward_model",) if cfg.reward == "reward_model" else ())
    require_inputs(cfg, STAGE, dict.fromkeys(inputs, "07_sft's `checkpoint`, 08_reward_model's `reward_model` and "
                                             "00_data's `tokenizer` (configs/pipelines/tiny.yaml wires them)"))
    if cfg.parallel != "none":
        raise ConfigError(f"{STAGE}: parallel={cfg.parallel!r}; the RL loop runs in one process (parallel=none)")
    families = _families(cfg.families)
    start = time.time()
    stage_dir = StageDir(cfg.out_dir, STAGE)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    seed_everything(cfg.seed)
    policy = load_model(cfg.checkpoint, family="text")
    reference = load_model(cfg.checkpoint, family="text").eval().requires_grad_(False)
    check_tokenizer_vocab(STAGE, policy, tokenizer, cfg.tokenizer, "the policy")
    if cfg.reward == "reward_model":
        reward_fn = reward_function(load_reward_model(cfg.reward_model).requires_grad_(False), tokenizer)
    else:
        reward_fn = oracle_function
    end, stops = tokenizer.token_id("<|end|>"), [tokenizer.token_id("<|end|>"), tokenizer.eos_id]

    held, candidates = {}, []
    for family in families:
        conversations = family_conversations(family, cfg.eval_examples + cfg.prompts_per_family, cfg.seed + 2)
        held[family] = conversations[: cfg.eval_examples]
        for turns in conversations[cfg.eval_examples :]:
            cut = eval_turns(turns)
            candidates.append((prompt_ids(cut, tokenizer), (family, cut)))

    # prompt selection (2025): keep the prompts whose reward varies most across the SFT's answers
    generator = torch.Generator().manual_seed(cfg.seed)
    selection: dict[str, Any] = {"candidates": len(candidates), "keep_share": cfg.keep_share}
    if cfg.keep_share < 1.0:
        responses = sample_responses(policy, [p for p, _ in candidates], cfg.selection_samples, cfg.max_new_tokens,
                                     end, stops, tokenizer.pad_id, cfg.temperature, generator)
        texts = [tokenizer.decode([t for t in r if t != end]) for r in responses]
        contexts = [c for _, c in candidates for _ in range(cfg.selection_samples)]
        rewards = reward_fn(contexts, texts).view(len(candidates), cfg.selection_samples)
        kept = select_by_reward_variance(rewards, cfg.keep_share)
        variance = rewards.var(dim=1, unbiased=False)
        selection.update({"kept": len(kept), "mean_variance_kept": variance[kept].mean().item(),
                          "mean_variance_all": variance.mean().item(),
                          "kept_per_family": {f: sum(candidates[i][1][0] == f for i in kept) for f in families}})
        candidates = [candidates[i] for i in kept]

    inner = 1 if cfg.algorithm == "reinforce_loo" else cfg.inner_steps
    source = RolloutSource(policy, reference, candidates, reward_fn, tokenizer.decode, end, stops, tokenizer.pad_id,
                           n=cfg.n, prompts_per_iteration=cfg.prompts_per_iteration, inner_steps=inner, beta=cfg.beta,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           keep_vocab_log_probs=cfg.algorithm == "mdloo" and cfg.kl_coef > 0,
                           score_fn=oracle_function, seed=cfg.seed)
    trainer = Trainer(PolicyTask(policy, cfg.algorithm, cfg.kl_coef, cfg.clip), source, cfg.train_config(), stage_dir)
    trainer.fit()
    policy.eval()

    sft_rates, sft_answers = pass_rates(reference, tokenizer, held, cfg.max_new_tokens)
    rl_rates, rl_answers = pass_rates(policy, tokenizer, held, cfg.max_new_tokens)
    contexts = [(f, eval_turns(t)) for f in families for t in held[f]]
    wins = win_rate(contexts, [a for f in families for a in sft_answers[f]], [a for f in families for a in rl_answers[f]])
    checkpoint = save_model(stage_dir.checkpoint_dir / "rlhf_model", policy,
                            {"tokenizer": cfg.tokenizer, "stage": STAGE, "algorithm": cfg.algorithm})
    itec = _itec(cfg, stage_dir, {"sft": reference, "rlhf": policy}, candidates, reward_fn, tokenizer, held,
                 generator) if cfg.itec_samples > 0 else None
    _figures(stage_dir, source.history, sft_rates, rl_rates, wins, cfg.reward)
    atomic_write_json(stage_dir.root / "rollouts.json", source.history)
    samples = {f: [{"prompt": eval_turns(t)[-2]["content"], "sft": sft_answers[f][i], "rlhf": rl_answers[f][i]}
                   for i, t in enumerate(held[f][:2])] for f in families}
    atomic_write_json(stage_dir.root / "samples.json", samples)
    first, last = source.history[0], source.history[-1]
    summary: dict[str, Any] = {
        "algorithm": cfg.algorithm,
        "reward": cfg.reward,
        "iterations": len(source.history),
        "reward_first": round(first["reward"], 4), "reward_last": round(last["reward"], 4),
        "oracle_first": round(first["oracle_score"], 4), "oracle_last": round(last["oracle_score"], 4),
        "kl_ref_last": round(last["kl_ref"], 4),
        "samples_per_s": round(sum(h["samples_per_s"] for h in source.history) / len(source.history), 2),
        "pass_mean_sft": round(sum(sft_rates.values()) / len(sft_rates), 4),
        "pass_mean_rlhf": round(sum(rl_rates.values()) / len(rl_rates), 4),
        "win_tie_loss_vs_sft": f"{wins['win']}:{wins['tie']}:{wins['loss']}",
        "wins_vs_sft": wins["win"], "ties_vs_sft": wins["tie"], "losses_vs_sft": wins["loss"],  # numbers for RESULTS.md
        "prompt_selection": selection,
        "seconds": round(time.time() - start, 1),
    }
    outputs = {"checkpoint": str(checkpoint), "tokenizer": cfg.tokenizer, "rollouts": str(stage_dir.root / "rollouts.json")}
    if itec is not None:
        summary["itec"] = itec["summary"]
        outputs["itec_checkpoint"] = itec["checkpoint"]
    stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


register_stage(STAGE, RlhfStageConfig, run)
