"""Stage 13: distil a speculative-decoding draft model from a trained text model.

The 2025 report's framework decodes the on-device model speculatively, and its Python toolkit
trains the draft models by distillation from the model they draft for [paper; WAVE2.md]. At tiny
scale this stage:

1. loads the target (``02_text_pretrain``'s model) and makes a ``draft_layers``-layer draft of
   it (:func:`mmafm.train.draft.make_draft`: its first layers, or fresh ones, with its embedding,
   final norm and head);
2. measures the untrained draft's greedy acceptance rate for each ``k`` in ``ks`` on held-out
   prompts (:func:`mmafm.inference.speculative.acceptance_by_k`; every speculative output is
   checked equal to plain greedy decoding);
3. distils it for ``max_steps`` steps, forward KL to the target's full distributions, the target
   running online (:func:`mmafm.train.draft.distill_draft`), on the pretraining tokens
   (``distill_data="text"``) or on the target's own greedy continuations of ``generation_prompts``
   train-split prompts (``"generations"``, :func:`mmafm.train.draft.greedy_continuations`: the text
   greedy drafting meets);
4. measures the acceptance rates again, and the speed-up of speculative over plain greedy decoding
   at ``k`` (:func:`~mmafm.inference.speculative.speculative_speedup`: interleaved, medians, wall
   and CPU time);
5. plots acceptance (and the tokens a round yields) against ``k``, and the loss curve; saves the
   draft.

The tiny target is overhead-bound on a CPU (a decode step is a fraction of a millisecond and its
2,048-token head is a third of its weights, which every draft shares), so its speed-up says little;
the acceptance rate is what carries over (docs/guided_generation.md, "Speculative decoding").

Outputs: ``draft`` (the distilled draft), ``checkpoint`` (the target), ``preset``, ``tokenizer``,
``metrics``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mmafm.config import ConfigError, to_dict
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig
from mmafm.train.trainer import setting

__all__ = ["TrainDraftConfig", "held_out_prompts", "run"]

STAGE = "13_train_draft"


@dataclass
class TrainDraftConfig(TrainStageConfig):
    """Distil a draft from 02's model and measure it. Defaults: the tiny pipeline (well under 90 s
    on 2 idle cores)."""

    # --- inputs (a pipeline wires them)
    checkpoint: str = field(default="", metadata={"path": "model"})  # the target: 02_text_pretrain's `checkpoint` (or its stage folder)
    tokens_dir: str = field(default="", metadata={"path": "dir"})  # 00_data's `tokens_dir`: the text the draft learns the target's distributions on
    tokenizer: str = field(default="", metadata={"path": "file"})  # 00_data's `tokenizer` (recorded with the draft)
    # --- the draft
    draft_layers: int = field(default=1, metadata={"min": 1})  # decoder layers of the draft [open: the toolkit's draft sizes are not given]
    draft_init: str = field(default="truncated", metadata={"choices": ("truncated", "fresh")})  # the target's first layers, or new ones [open]
    train_embeddings: bool = True  # also train the (tied) embedding and head copied from the target [open]
    kl_temperature: float = field(default=1.0, metadata={"min": 1e-3})  # softmax temperature of the KL [open: 1 = the target's own distribution]
    distill_data: str = field(default="generations", metadata={"choices": ("text", "generations")})  # the text the KL is taken on: the pretraining tokens, or the target's greedy continuations of prompts from them [open: on runs/lora_dev's 02 model, 100 steps, greedy acceptance at k=1 0.54 on text, 0.77 on generations]
    generation_prompts: int = field(default=256, metadata={"min": 1})  # distill_data=generations: train-split prompts of prompt_len tokens, each continued greedily to seq_len + 1 tokens
    seq_len: int = field(default=64, metadata={"min": 2})  # tokens per row
    batch_size: int = field(default=8, metadata={"min": 1})  # rows per step
    # --- measuring it
    ks: str = "1,2,4,8"  # proposals per round at which acceptance is measured (comma-separated)
    k: int = field(default=3, metadata={"min": 1})  # proposals per round of the timed speed-up [open]
    eval_prompts: int = field(default=8, metadata={"min": 1})  # held-out prompts (the first tokens of val.bin windows)
    prompt_len: int = field(default=16, metadata={"min": 1})  # tokens per prompt
    eval_tokens: int = field(default=32, metadata={"min": 1})  # greedy tokens generated per prompt
    timing_repeats: int = field(default=2, metadata={"min": 1})  # interleaved timing rounds (medians)
    eval_batches: int = field(default=2, metadata={"min": 1})  # held-out batches for the draft's loss (first of val.bin)
    # --- the trainer's settings
    max_steps: int = setting("max_steps", 100)  # distillation steps (51k tokens)
    lr: float = setting("lr", 3e-3)  # [open: measured, docs/guided_generation.md]
    weight_decay: float = setting("weight_decay", 0.0)
    warmup_steps: int = setting("warmup_steps", 10)
    min_lr_ratio: float = setting("min_lr_ratio", 0.1)
    log_every: int = setting("log_every", 10)
    ckpt_every: int = setting("ckpt_every", 0)  # end only: the stage takes well under a minute


def held_out_prompts(tokens_dir: str, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens: the starts of consecutive windows of ``val.bin``."""
    from mmafm.stages.text_pretrain import held_out_batches

    prompts: list[list[int]] = []
    for ids, _ in held_out_batches(tokens_dir, length, count, max(1, count)):
        prompts += ids.tolist()
        if len(prompts) >= count:
            break
    if len(prompts) < count:
        raise ValueError(f"{tokens_dir}: val.bin holds {len(prompts)} windows of {length} tokens, "
                         f"eval_prompts={count} asked; lower eval_prompts or prompt_len")
    return prompts[:count]


def _continuations(cfg: TrainDraftConfig, target) -> torch.Tensor:
    """(generation_prompts, seq_len + 1): train-split prompts of ``prompt_len`` tokens, each
    continued by the target's plain greedy decoding."""
    from mmafm.data.shards import TokenShards
    from mmafm.train.draft import greedy_continuations

    if cfg.prompt_len >= cfg.seq_len + 1:
        raise ConfigError(f"{STAGE}: distill_data=generations needs prompt_len ({cfg.prompt_len}) < seq_len + 1 "
                          f"({cfg.seq_len + 1}): the target continues each prompt to seq_len + 1 tokens")
    try:
        prompts = next(iter(TokenShards(cfg.tokens_dir, cfg.prompt_len, cfg.generation_prompts, seed=cfg.seed,
                                        split="train")), None)
    except ValueError:  # fewer tokens than one batch of prompts
        prompts = None
    if prompts is None:
        raise ConfigError(f"{STAGE}: {cfg.tokens_dir}/train.bin holds fewer than generation_prompts="
                          f"{cfg.generation_prompts} windows of prompt_len={cfg.prompt_len} tokens; lower one of them")
    return greedy_continuations(target, prompts[0], cfg.seq_len + 1 - cfg.prompt_len)


def _parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"{STAGE}: ks={text!r} is not a comma-separated list of integers") from None
    if not ks or ks[0] < 1:
        raise ConfigError(f"{STAGE}: ks={text!r}: give proposals per round >= 1")
    return ks


def _figures(stage_dir: StageDir, before: dict[int, float], after: dict[int, float], records: list[dict],
             speed: dict, layers: tuple[int, int]) -> None:
    from mmafm.inference.speculative import expected_tokens_per_round
    from mmafm.report import stage_figure

    ks = sorted(after)
    with stage_figure(stage_dir, "acceptance", 1, 2, figsize=(10, 3.6)) as (_, (left, right)):
        left.plot(ks, [before[k] for k in ks], "o--", color="grey", label="draft before distillation")
        left.plot(ks, [after[k] for k in ks], "o-", color="tab:blue", label="distilled draft")
        left.set(xlabel="k (proposals per round)", ylabel="acceptance rate", ylim=(0, 1.02),
                 title=f"greedy acceptance: {layers[0]}-layer draft of a {layers[1]}-layer target")
        left.legend(fontsize=8)
        right.plot(ks, [expected_tokens_per_round(after[k], k) for k in ks], "o-", color="tab:blue",
                   label="distilled draft")
        right.plot(ks, [expected_tokens_per_round(before[k], k) for k in ks], "o--", color="grey", label="before")
        right.plot(ks, [k + 1 for k in ks], ":", color="black", label="every proposal accepted")
        right.set(xlabel="k", ylabel="tokens per target forward",
                  title=f"tokens per round; measured speed-up at k={speed['k']}: {speed['speedup']:.2f}x")
        right.legend(fontsize=8)

    train = [r for r in records if "distill" in r]
    with stage_figure(stage_dir, "loss", figsize=(5.5, 3.6)) as (_, axis):
        axis.plot([r["step"] for r in train], [r["distill"] for r in train], label="KL(target || draft)")
        axis.plot([r["step"] for r in train], [r["ce"] for r in train], label="draft CE on the data")
        axis.set(xlabel="step", ylabel="nats / token", title="draft distillation")
        axis.legend(fontsize=8)


def run(cfg: TrainDraftConfig) -> dict[str, str]:
    """Make, measure, distil, measure again, plot and save the draft; returns the stage outputs."""
    from mmafm.checkpoint import load_model, save_model
    from mmafm.data.shards import TokenShards, read_token_meta
    from mmafm.inference.speculative import acceptance_by_k, speculative_speedup
    from mmafm.stages.text_pretrain import held_out_batches
    from mmafm.train.draft import distill_draft, make_draft, sequence_batches

    for name in ("checkpoint", "tokens_dir"):
        if not getattr(cfg, name):
            raise ConfigError(f"{STAGE}: {name} is empty; pass 02_text_pretrain's `checkpoint` and 00_data's "
                              f"`tokens_dir` (configs/pipelines/tiny.yaml wires them)")
    if cfg.parallel != "none":
        raise ConfigError(f"{STAGE}: parallel={cfg.parallel!r}; the draft stage runs in one process")
    ks = _parse_ks(cfg.ks)
    start = time.time()
    stage_dir = StageDir(cfg.out_dir, STAGE)
    target = load_model(cfg.checkpoint, family="text", dtype=torch.float32).eval()
    vocab = int(read_token_meta(cfg.tokens_dir)["vocab_size"])
    if target.config.vocab_size != vocab:
        raise ConfigError(f"{STAGE}: the model has a {target.config.vocab_size}-token vocabulary, the tokens in "
                          f"{cfg.tokens_dir} {vocab}; pass the data the model was trained on")
    if cfg.draft_layers >= target.config.n_layers:
        raise ConfigError(f"{STAGE}: draft_layers={cfg.draft_layers} must be below the target's "
                          f"{target.config.n_layers} layers")
    if cfg.prompt_len + cfg.eval_tokens + max(ks + [cfg.k]) + 1 > target.config.max_seq_len:
        raise ConfigError(f"{STAGE}: prompt_len + eval_tokens + k exceeds the target's context "
                          f"({target.config.max_seq_len})")
    if cfg.distill_data == "generations":  # first: a bad setting fails before any measuring
        train_data = sequence_batches(_continuations(cfg, target), cfg.batch_size, seed=cfg.seed)
    else:
        train_data = TokenShards(cfg.tokens_dir, cfg.seq_len, cfg.batch_size, seed=cfg.seed, split="train")
    prompts = held_out_prompts(cfg.tokens_dir, cfg.eval_prompts, cfg.prompt_len)
    val_batches = held_out_batches(cfg.tokens_dir, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    draft = make_draft(target, cfg.draft_layers, cfg.draft_init, seed=cfg.seed)
    before = acceptance_by_k(target, draft, prompts, cfg.eval_tokens, ks)

    records = distill_draft(draft, target, train_data, cfg.max_steps, val_batches=val_batches,
                            temperature=cfg.kl_temperature, train_embeddings=cfg.train_embeddings, seed=cfg.seed,
                            stage_dir=stage_dir, train_config=cfg.train_config(eval_every=0))
    after = acceptance_by_k(target, draft, prompts, cfg.eval_tokens, ks)
    speed = speculative_speedup(target, draft, prompts[: max(2, cfg.eval_prompts // 2)], cfg.eval_tokens, cfg.k,
                                cfg.timing_repeats)

    _figures(stage_dir, before, after, records, speed, (cfg.draft_layers, target.config.n_layers))
    metadata = {"stage": STAGE, "tokenizer": cfg.tokenizer, "target": str(cfg.checkpoint),
                "draft_init": cfg.draft_init, "distill_data": cfg.distill_data, "acceptance": {str(k): round(v, 4) for k, v in after.items()},
                "stage_config": to_dict(cfg)}
    draft_path = save_model(stage_dir.checkpoint_dir / "draft_model", draft, metadata)
    train = [r for r in records if "distill" in r]
    summary: dict[str, Any] = {
        **{f"acceptance_k{k}_before": round(before[k], 4) for k in ks},
        **{f"acceptance_k{k}": round(after[k], 4) for k in ks},
        "speedup_k": cfg.k, "speedup": round(speed["speedup"], 3), "speedup_cpu": round(speed["speedup_cpu"], 3),
        "acceptance_timed": round(speed["acceptance"], 4),
        "plain_tok_s": round(speed["plain_tok_s"], 1), "speculative_tok_s": round(speed["speculative_tok_s"], 1),
        "kl_first": round(train[0]["distill"], 4) if train else None,
        "kl_last": round(train[-1]["distill"], 4) if train else None,
        "params_M_target": round(target.num_params() / 1e6, 4), "params_M_draft": round(draft.num_params() / 1e6, 4),
        "threads": torch.get_num_threads(), "distill_tokens": cfg.max_steps * cfg.batch_size * cfg.seq_len,
        "distill_data": cfg.distill_data,
        "seconds": round(time.time() - start, 1),
    }
    outputs = {
        "draft": str(draft_path),
        "checkpoint": str(cfg.checkpoint),
        "preset": target.model_spec.preset,
        "tokenizer": cfg.tokenizer,
        "metrics": str(stage_dir.metrics_path),
    }
    stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


register_stage(STAGE, TrainDraftConfig, run)
