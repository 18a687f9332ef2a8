"""Stage 07: supervised fine-tuning on generated instruction data, every family checked by code.

The reports' SFT (WAVE2.md "Post-training"): human and synthetic data, constant learning rate,
dropout 0.1 [paper]. Here every example is synthetic (:mod:`mmafm.posttrain.tasks`: define a word,
answer from a Wikipedia summary, arithmetic, list / JSON formatting, typed tool calls), so each
family's pass rate is measured by its checker before and after:

1. per family, write ``train_examples`` + ``eval_examples`` conversations as chat JSONL under
   ``data/<family>/`` (disjoint splits) and tokenize them with the chat template (loss on the
   assistant spans only, :func:`mmafm.data.chat.encode_chat`);
2. load the pretrained text model (05_long_context's in the tiny pipeline; any text checkpoint,
   02's too) with residual dropout ``dropout`` and fine-tune every weight with
   the shared trainer (constant LR after a short warm-up);
3. answer each family's held-out prompts greedily (the inference wing), before and after, and
   score them with the family's checker; plot the pass rates and the loss; save the model
   (dropout reset to 0 in its record) for 08 and 09.

Packing: not done. Packing several conversations into one row needs attention reset at document
boundaries (a block-diagonal mask); :class:`mmafm.models.text.TextModel` takes only a key-padding
mask, so packed rows would attend across conversations. Rows are padded instead (the batches are
short: the tiny tasks are 20-150 tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mmafm.config import ConfigError
from mmafm.io import atomic_write_json
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig
from mmafm.train.trainer import setting

__all__ = ["SftStageConfig", "pass_rates", "run"]

STAGE = "07_sft"
ALL_FAMILIES = "define_word,wiki_cloze,arithmetic,format_list,format_json,tool_call"


@dataclass
class SftStageConfig(TrainStageConfig):
    """SFT of the text model on generated instruction data. Defaults: the tiny pipeline (under a
    minute on 2 idle cores)."""

    # --- inputs (a pipeline wires them)
    checkpoint: str = field(default="", metadata={"path": "model"})  # the pretrained text model: 05_long_context's (tiny pipeline) or 02's `checkpoint` (or a stage folder)
    tokenizer: str = field(default="", metadata={"path": "file"})  # 00_data's `tokenizer` (the base's)
    # --- data (mmafm.posttrain.tasks.FAMILIES)
    families: str = ALL_FAMILIES  # task families, comma-separated
    train_examples: int = field(default=300, metadata={"min": 1})  # training conversations per family
    eval_examples: int = field(default=16, metadata={"min": 1})  # held-out conversations per family, checked by code
    max_tokens: int = field(default=256, metadata={"min": 8})  # longest conversation kept (tokens); longer are dropped
    # --- training
    dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 0.9})  # residual dropout while training [paper: 0.1]
    batch_size: int = field(default=16, metadata={"min": 1})  # conversations per step
    max_steps: int = setting("max_steps", 80)
    lr: float = setting("lr", 1e-3)  # [open: the report's 2e-5 is for a 3B model; a 1M-parameter model needs more]
    schedule: str = setting("schedule", "constant")  # [paper: constant LR for SFT]
    warmup_steps: int = setting("warmup_steps", 10)
    weight_decay: float = setting("weight_decay", 0.0)  # [open]
    ckpt_every: int = setting("ckpt_every", 0)
    # --- evaluation
    max_new_tokens: int = field(default=40, metadata={"min": 1})  # answer length cap when checking
    show_examples: int = field(default=2, metadata={"min": 0})  # answers per family in samples.json


def _families(spec: str) -> list[str]:
    from mmafm.posttrain.tasks import FAMILIES, VISUAL_FAMILIES

    names = [n.strip() for n in spec.split(",") if n.strip()]
    visual = [n for n in names if n in VISUAL_FAMILIES]
    if visual:
        raise ConfigError(f"{STAGE}: families {visual} ask about images; these text stages cannot show them "
                          f"(the multimodal SFT is not built yet)")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ConfigError(f"{STAGE}: families {unknown} are not task families; known: {', '.join(FAMILIES)}")
    if not names:
        raise ConfigError(f"{STAGE}: families is empty; name at least one of {', '.join(FAMILIES)}")
    return names


def pass_rates(model: torch.nn.Module, tokenizer: Any, held_out: dict[str, list[list[dict]]], max_new_tokens: int
               ) -> tuple[dict[str, float], dict[str, list[str]]]:
    """``({family: share of held-out prompts whose greedy answer passes the checker}, answers)``."""
    from mmafm.posttrain.tasks import FAMILIES, eval_turns
    from mmafm.stages.adapter import answers

    rates, outputs = {}, {}
    for family, conversations in held_out.items():
        cut = [eval_turns(turns) for turns in conversations]
        outputs[family] = answers(model, tokenizer, cut, max_new_tokens)
        rates[family] = sum(FAMILIES[family].checker(a, t) for a, t in zip(outputs[family], cut)) / len(cut)
    return rates, outputs


def _figures(stage_dir: StageDir, records: list[dict], before: dict[str, float], after: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    train = [r for r in records if "ce" in r]
    evals = [r for r in records if "eval/val_loss" in r]
    ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train")
    ax.plot([r["step"] for r in evals], [r["eval/val_loss"] for r in evals], "o-", label="held out")
    ax.set(xlabel="step", ylabel="nats / assistant token", title="SFT loss (assistant spans only)")
    ax.legend(fontsize=8)
    stage_dir.save_figure(fig, "loss")
    plt.close(fig)

    families = list(before)
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(families), 3.4))
    for offset, (label, rates) in enumerate((("before (the base)", before), ("after SFT", after))):
        bars = ax.bar([i + 0.4 * offset for i in range(len(families))], [rates[f] for f in families], 0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([i + 0.2 for i in range(len(families))], families, fontsize=8, rotation=20)
    ax.set(ylim=(0, 1.1), ylabel="checker pass rate (held out)", title="pass rate per task family")
    ax.legend(fontsize=8)
    stage_dir.save_figure(fig, "pass_rates")
    plt.close(fig)


def run(cfg: SftStageConfig) -> dict[str, str]:
    """Generate the data, fine-tune, check, plot and save; returns the stage outputs."""
    from mmafm.checkpoint import load_model, save_model
    from mmafm.data.chat import read_chat_jsonl, write_chat_jsonl
    from mmafm.posttrain.tasks import family_conversations
    from mmafm.stages.adapter import ChatBatches, ChatTask, encode_conversations
    from mmafm.tokenizer import Tokenizer
    from mmafm.train import Trainer, seed_everything

    for name in ("checkpoint", "tokenizer"):
        if not getattr(cfg, name):
            raise ConfigError(f"{STAGE}: {name} is empty; pass a pretrained text model's `checkpoint` (05 or 02) and 00_data's "
                              f"`tokenizer` (configs/pipelines/tiny.yaml wires them)")
    families = _families(cfg.families)
    start = time.time()
    stage_dir = StageDir(cfg.out_dir, STAGE)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    model = load_model(cfg.checkpoint, family="text", overrides={"dropout": cfg.dropout})
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"{STAGE}: the base has a {model.config.vocab_size}-token vocabulary, tokenizer "
                          f"{cfg.tokenizer} has {tokenizer.vocab_size}; pass the tokenizer the base was trained with")

    train, held_out, counts = [], {}, {}
    for family in families:
        conversations = family_conversations(family, cfg.eval_examples + cfg.train_examples, cfg.seed)
        folder = stage_dir.root / "data" / family
        write_chat_jsonl(folder / "val.jsonl", conversations[: cfg.eval_examples])
        write_chat_jsonl(folder / "train.jsonl", conversations[cfg.eval_examples :])
        held_out[family] = read_chat_jsonl(folder / "val.jsonl")
        encoded, dropped = encode_conversations(read_chat_jsonl(folder / "train.jsonl"), tokenizer, cfg.max_tokens)
        train += encoded
        counts[family] = {"train": len(encoded), "val": cfg.eval_examples,
                          "skipped": {f"longer than max_tokens={cfg.max_tokens}": dropped}}
    val, _ = encode_conversations([t for c in held_out.values() for t in c], tokenizer, cfg.max_tokens)
    seed_everything(cfg.seed)
    val_batches = list(ChatBatches(val, cfg.batch_size, tokenizer.pad_id))

    before, before_answers = pass_rates(model, tokenizer, held_out, cfg.max_new_tokens)
    trainer = Trainer(ChatTask(model, val_batches), ChatBatches(train, cfg.batch_size, tokenizer.pad_id),
                      cfg.train_config(), stage_dir)
    records = trainer.fit()
    model.eval()
    after, after_answers = pass_rates(model, tokenizer, held_out, cfg.max_new_tokens)
    checkpoint = save_model(stage_dir.checkpoint_dir / "sft_model", model,
                            {"tokenizer": cfg.tokenizer, "stage": STAGE, "step": trainer.step},
                            config=replace(model.config, dropout=0.0))

    _figures(stage_dir, records, before, after)
    samples = {family: [{"prompt": turns[-2]["content"] if turns[-1]["role"] == "assistant" else "",
                         "reference": turns[-1]["content"], "before": before_answers[family][i],
                         "after": after_answers[family][i]}
                        for i, turns in enumerate(held_out[family][: cfg.show_examples])] for family in families}
    samples_path = stage_dir.root / "samples.json"
    atomic_write_json(samples_path, samples)
    atomic_write_json(stage_dir.root / "data_card_stats.json", {"families": counts, "config": {"seed": cfg.seed}})
    final = [r for r in records if "eval/val_loss" in r][-1]
    summary: dict[str, Any] = {f"pass_{f}_before": round(before[f], 4) for f in families}
    summary.update({f"pass_{f}_after": round(after[f], 4) for f in families})
    summary.update({
        "pass_mean_before": round(sum(before.values()) / len(before), 4),
        "pass_mean_after": round(sum(after.values()) / len(after), 4),
        "val_loss": round(final["eval/val_loss"], 4),
        "train_conversations": len(train),
        "packing": "off: the text model has no per-document attention reset",
        "seconds": round(time.time() - start, 1),
    })
    outputs = {"checkpoint": str(checkpoint), "tokenizer": cfg.tokenizer, "samples": str(samples_path),
               "data_dir": str(stage_dir.root / "data")}
    stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


register_stage(STAGE, SftStageConfig, run)
