"""Stage 10: feature adapters, LoRA over the frozen text base, trained on JSONL chat data.

The 2025 report's adapter toolkit trains rank-32 LoRA adapters (alpha 16 [teardown]) on JSONL
chat conversations over a frozen base, one adapter per feature, retrained per base version; the
2024 report serves dozens of such adapters, swapped at run time over one base (WAVE2.md
"Adapters"). This stage does that at tiny scale, on :mod:`mmafm.lora`:

1. for each feature (the generated ones of :data:`mmafm.data.chat.FEATURES`, and optionally
   ``chat_jsonl``, a JSONL file of your own), write its training and held-out conversations as
   chat JSONL under ``data/<feature>/``, read them back and tokenize them (loss on assistant
   turns only);
2. load the base (02_text_pretrain's ``checkpoint``), attach a LoRA adapter, train it with the
   shared trainer (metrics and resumable checkpoints under ``adapters/<feature>/``), save it as an
   adapter file (safetensors + JSON with the base fingerprint, 16-bit by default);
3. load the base once more with one slot per adapter, load every adapter file, and score each
   feature's held-out conversations with its checker under the base alone and under every
   adapter (``set_adapter``: a buffer write), greedy decoding through the decode plan;
4. check that the base weights are bitwise those of the checkpoint after training, and that a
   mixed batch (one adapter per row) generates what each adapter generates alone;
5. plot the loss curves and the score bars, write samples and the manifest.

A feature of your own is scored by held-out loss only (no checker): write a checker next to
:data:`mmafm.data.chat.FEATURES` to score it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmafm.config import ConfigError, to_dict
from mmafm.io import atomic_write_json
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig, check_tokenizer_vocab, require_inputs
from mmafm.train.trainer import setting

__all__ = ["AdapterStageConfig", "ChatTask", "ChatBatches", "encode_conversations", "parse_feature_steps", "score_feature", "run"]

STAGE = "10_adapter"
ADAPTER_DTYPES = ("bfloat16", "float32")


@dataclass
class AdapterStageConfig(TrainStageConfig):
    """Feature adapters over the frozen text base. Defaults: the tiny pipeline (~1-2 minutes on
    2 cores for both generated features). The trainer's settings apply to each adapter."""

    # --- inputs (a pipeline wires them)
    checkpoint: str = ""  # the frozen base: 02_text_pretrain's `checkpoint` (or its stage folder)
    tokenizer: str = ""  # 00_data's `tokenizer`; must be the one the base was trained with
    # --- features
    features: str = "one_sentence_summary,date_place"  # generated features (mmafm.data.chat.FEATURES), comma-separated; "" = none
    chat_jsonl: str = ""  # a feature of your own: chat JSONL (a list of turns per line); "" = none
    chat_name: str = "custom"  # the adapter name of `chat_jsonl` (its last 10% of lines are held out)
    train_examples: int = field(default=800, metadata={"min": 1})  # generated training conversations per feature
    eval_examples: int = field(default=48, metadata={"min": 1})  # held-out conversations per feature, scored by its checker
    max_tokens: int = field(default=192, metadata={"min": 8})  # longest conversation kept (tokens); longer ones are dropped
    summary_max_chars: int = field(default=300, metadata={"min": 80})  # longest Wikipedia summary of one_sentence_summary
    # --- LoRA
    rank: int = field(default=32, metadata={"min": 1})  # [paper: the 2025 toolkit trains rank 32; 16 in 2024]
    alpha: float = field(default=16.0, metadata={"min": 0.0})  # scale = alpha / rank [teardown: 16 in the 2025 toolkit]
    lora_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.9})  # on the adapter input while training [open]
    targets: str = ""  # LoRA module patterns, comma-separated; "" = every attention and FFN linear [paper]
    adapter_dtype: str = field(default="bfloat16", metadata={"choices": ADAPTER_DTYPES})  # stored precision [paper: 16-bit]
    # --- training, per adapter (shared trainer: AdamW, warm-up + cosine)
    batch_size: int = field(default=8, metadata={"min": 1})  # conversations per step (8 x 300 beat 16 x 150 here)
    max_steps: int = setting("max_steps", 300)  # optimizer steps per adapter
    # steps of the named features instead of max_steps ("name:steps,..."; "" = none) [open: the
    # tiny base cannot copy spans (no induction), and date_place's adapter must learn it: its held-out
    # loss and score kept improving up to 600 steps while 3e-3 / 3e-2 LRs and alpha 32 were worse]
    feature_steps: str = "date_place:500"
    lr: float = setting("lr", 1e-2)  # peak LR [open: LoRA takes ~10x a full fine-tuning LR; 3e-2 was worse here]
    weight_decay: float = setting("weight_decay", 0.0)  # [open: peft's examples use 0]
    warmup_steps: int = setting("warmup_steps", 10)
    min_lr_ratio: float = setting("min_lr_ratio", 0.1)
    ckpt_every: int = setting("ckpt_every", 0)  # resumable checkpoints: at the end only (adapters train in ~1 minute)
    # --- evaluation
    max_new_tokens: int = field(default=48, metadata={"min": 1})  # answer length cap when scoring
    show_examples: int = field(default=3, metadata={"min": 0})  # answers per feature shown in the notebook / samples.json


# ----------------------------------------------------------------------------------- data


def parse_feature_steps(text: str) -> dict[str, int]:
    """``"date_place:500,custom:200"`` -> ``{"date_place": 500, "custom": 200}`` (``""`` -> {}).

    Raises:
        ConfigError: an entry is not ``name:steps`` with a positive integer, or a name repeats.
    """
    steps: dict[str, int] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, _, count = entry.partition(":")
        name = name.strip()
        if not name or not count.strip().isdigit() or int(count) < 1 or name in steps:
            raise ConfigError(f"{STAGE}: feature_steps entry {entry!r} is not 'name:steps' with steps >= 1 "
                              f"(once per name), in {text!r}")
        steps[name] = int(count)
    return steps


def encode_conversations(conversations: list[list[dict]], tokenizer: Any, max_tokens: int
                         ) -> tuple[list[tuple[list[int], list[int]]], int]:
    """``(examples, dropped)``: each conversation as ``(input_ids, targets)`` (see
    :func:`mmafm.data.chat.encode_chat`); those longer than ``max_tokens`` are dropped."""
    from mmafm.data.chat import encode_chat

    examples, dropped = [], 0
    for turns in conversations:
        ids, targets = encode_chat(turns, tokenizer)
        if len(ids) > max_tokens:
            dropped += 1
        else:
            examples.append((ids, targets))
    return examples, dropped


def _pad(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids (B, T), targets (B, T))``; padding is never a target."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, (ids, tgt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(tgt)] = torch.tensor(tgt)
    return input_ids, targets


class ChatBatches:
    """Shuffled right-padded batches of tokenized conversations, one epoch per iteration (the
    order comes from torch's global RNG, which the trainer seeds per epoch)."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int):
        if not examples:
            raise ValueError("no training conversations (all longer than max_tokens?)")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id

    def __len__(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.examples)).tolist()
        for start in range(0, len(order), self.batch_size):
            yield _pad([self.examples[i] for i in order[start : start + self.batch_size]], self.pad_id)


class ChatTask:
    """Next-token loss on the assistant turns, for the shared trainer.

    Args:
        model: the LoRA'd text model (only its adapter trains).
        val_batches: held-out ``(input_ids, targets)`` batches for :meth:`evaluate`.
    """

    def __init__(self, model: nn.Module, val_batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.model, self.val_batches = model, val_batches

    def training_forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict, dict]:
        input_ids, targets = batch  # (B, T), (B, T) with -100 outside assistant turns
        logits = self.model(input_ids)  # (B, T, V)
        loss, metrics = getattr(self.model, "module", self.model).loss(logits, targets)
        return {"lm": loss}, metrics

    def count_items(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        """Tokens per batch (padding included: it is computed)."""
        return batch[0].numel()

    def evaluate(self) -> dict[str, float]:
        """Held-out cross-entropy per assistant token."""
        total, count = 0.0, 0
        for input_ids, targets in self.val_batches:
            logits = self.model(input_ids)
            total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                       ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
        return {"val_loss": total / max(count, 1)}


# ----------------------------------------------------------------------------------- scoring


@torch.no_grad()
def answers(model: nn.Module, tokenizer: Any, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers of ``model`` to the last assistant turn of each conversation (stopping at
    ``<|end|>``), through the one decode loop."""
    from mmafm.data.chat import prompt_ids
    from mmafm.inference import generate

    prompts = [prompt_ids(turns, tokenizer) for turns in conversations]
    room = model.config.max_seq_len - max(len(p) for p in prompts)
    tokens = generate(model, prompts, max(1, min(max_new_tokens, room)), pad_token_id=tokenizer.pad_id,
                      stop_tokens=[tokenizer.token_id("<|end|>"), tokenizer.eos_id])
    return [tokenizer.decode(t) for t in tokens]


def score_feature(feature: Any, conversations: list[list[dict]], outputs: list[str]) -> float:
    """Mean checker score of ``outputs`` against the conversations' reference answers."""
    from mmafm.data.chat import reference_answer

    scores = [feature.score(out, reference_answer(turns)) for out, turns in zip(outputs, conversations)]
    return sum(scores) / max(len(scores), 1)


# ----------------------------------------------------------------------------------- figures


def _figures(stage_dir: StageDir, curves: dict[str, list[dict]], scores: dict[str, dict[str, float]],
             score_names: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, records in curves.items():
        train = [r for r in records if "ce" in r]
        evals = [r for r in records if "eval/val_loss" in r]
        line, = ax.plot([r["step"] for r in train], [r["ce"] for r in train], label=f"{name} (train)")
        ax.plot([r["step"] for r in evals], [r["eval/val_loss"] for r in evals], "o", color=line.get_color(),
                label=f"{name} (held out)")
    ax.set(xlabel="step", ylabel="nats / assistant token", title="adapter training loss (base frozen)")
    ax.legend(fontsize=8)
    stage_dir.save_figure(fig, "loss")
    plt.close(fig)

    if not scores:
        return
    features = list(scores)
    columns = list(next(iter(scores.values())))
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(features), 3.6))
    width = 0.8 / len(columns)
    for index, column in enumerate(columns):
        values = [scores[f][column] for f in features]
        bars = ax.bar([i + index * width for i in range(len(features))], values, width, label=column)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([i + width * (len(columns) - 1) / 2 for i in range(len(features))],
                  [f"{f}\n({score_names[f]})" for f in features], fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="held-out task score", title="each feature scored under the base and each adapter")
    ax.legend(fontsize=8)
    stage_dir.save_figure(fig, "scores")
    plt.close(fig)


# ----------------------------------------------------------------------------------- run


def _feature_data(cfg: AdapterStageConfig, stage_dir: StageDir) -> dict[str, tuple[Any, Path, Path]]:
    """``{name: (feature or None, train.jsonl, val.jsonl)}``, the generated ones written here."""
    from mmafm.data.chat import FEATURES, read_chat_jsonl, summary_conversations, write_chat_jsonl

    names = [n.strip() for n in cfg.features.split(",") if n.strip()]
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ConfigError(f"{STAGE}: features {unknown} are not generated features; known: {sorted(FEATURES)}")
    data = {}
    for name in names:
        feature = FEATURES[name]
        folder = stage_dir.root / "data" / name
        count = cfg.eval_examples + cfg.train_examples
        if name == "one_sentence_summary":  # its length cap is a stage parameter
            conversations = summary_conversations(count, cfg.seed, cfg.summary_max_chars)
        else:
            conversations = feature.conversations(count, cfg.seed)
        val, train = conversations[: cfg.eval_examples], conversations[cfg.eval_examples :]  # disjoint
        data[name] = (feature, write_chat_jsonl(folder / "train.jsonl", train), write_chat_jsonl(folder / "val.jsonl", val))
    if cfg.chat_jsonl:
        if cfg.chat_name in data:
            raise ConfigError(f"{STAGE}: chat_name {cfg.chat_name!r} is also a generated feature; pick another name")
        conversations = read_chat_jsonl(cfg.chat_jsonl)
        if len(conversations) < 2:
            raise ConfigError(f"{STAGE}: chat_jsonl {cfg.chat_jsonl} needs >= 2 conversations (train + held out)")
        held = max(1, len(conversations) // 10)
        folder = stage_dir.root / "data" / cfg.chat_name
        data[cfg.chat_name] = (None, write_chat_jsonl(folder / "train.jsonl", conversations[:-held]),
                               write_chat_jsonl(folder / "val.jsonl", conversations[-held:]))
    if not data:
        raise ConfigError(f"{STAGE}: no feature to train: set `features` and/or `chat_jsonl`")
    return data


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not name.endswith((".lora_A", ".lora_B"))}


def _train_adapter(cfg: AdapterStageConfig, name: str, train_path: Path, val_path: Path, tokenizer: Any,
                   stage_dir: StageDir) -> dict[str, Any]:
    """Train one adapter over a fresh copy of the base; save its file. Returns facts about it."""
    from mmafm.checkpoint import load_model
    from mmafm.data.chat import read_chat_jsonl
    from mmafm.lora import attach_lora
    from mmafm.train import Trainer, seed_everything

    seed_everything(cfg.seed)
    train, dropped = encode_conversations(read_chat_jsonl(train_path), tokenizer, cfg.max_tokens)
    val, val_dropped = encode_conversations(read_chat_jsonl(val_path), tokenizer, cfg.max_tokens)
    if not val:
        raise ConfigError(f"{STAGE}: every held-out conversation of {name} is longer than max_tokens={cfg.max_tokens}")
    model = load_model(cfg.checkpoint, family="text")
    before = _base_tensors(model)
    adapters = attach_lora(model, cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.targets or None, slots=1, name=name,
                           seed=cfg.seed)
    val_batches = [_pad(val[i : i + cfg.batch_size], tokenizer.pad_id) for i in range(0, len(val), cfg.batch_size)]
    task = ChatTask(model, val_batches)
    feature_dir = StageDir(stage_dir.root / "adapters" / name, f"{STAGE}/{name}")
    steps = parse_feature_steps(cfg.feature_steps).get(name, cfg.max_steps)
    train_config = cfg.train_config(max_steps=steps, warmup_steps=min(cfg.warmup_steps, steps - 1))
    trainer = Trainer(task, ChatBatches(train, cfg.batch_size, tokenizer.pad_id), train_config, feature_dir)
    records = trainer.fit()
    model.eval()
    unchanged = all(torch.equal(before[k], v) for k, v in _base_tensors(model).items())
    dtype = getattr(torch, cfg.adapter_dtype)
    path = adapters.save(stage_dir.root / "adapters" / name / "adapter", name, dtype=dtype, metadata={
        "stage": STAGE, "feature": name, "steps": trainer.step, "train_conversations": len(train),
        "stage_config": to_dict(cfg)})
    final = [r for r in records if "eval/val_loss" in r][-1]
    return {"path": path, "records": records, "val_loss": final["eval/val_loss"], "base_unchanged": unchanged,
            "steps": trainer.step,
            "val_batches": val_batches,
            "parameters": adapters.num_parameters(name), "counts": {
                "kept": len(train) + len(val), "train": len(train), "val": len(val), "corrupt": 0,
                "skipped": {f"longer than max_tokens={cfg.max_tokens}": dropped + val_dropped}}}


def run(cfg: AdapterStageConfig) -> dict[str, str]:
    """Train, save, load, score and plot the feature adapters; returns the stage outputs."""
    from mmafm.checkpoint import load_model
    from mmafm.data.chat import read_chat_jsonl
    from mmafm.lora import attach_lora
    from mmafm.tokenizer import Tokenizer

    require_inputs(cfg, STAGE, dict.fromkeys(("checkpoint", "tokenizer"), "02_text_pretrain's `checkpoint` and 00_data's "
                                             "`tokenizer` (configs/pipelines/tiny.yaml wires them)"))
    if cfg.parallel != "none":
        raise ConfigError(f"{STAGE}: parallel={cfg.parallel!r}; adapters train in one process (parallel=none)")
    start = time.time()
    stage_dir = StageDir(cfg.out_dir, STAGE)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    base = load_model(cfg.checkpoint, family="text")
    check_tokenizer_vocab(STAGE, base, tokenizer, cfg.tokenizer, "the base", refer_as="the base")
    from mmafm.data.chat import FEATURES

    unknown = sorted(set(parse_feature_steps(cfg.feature_steps)) - set(FEATURES) - {cfg.chat_name})
    if unknown:  # a feature this run does not train may be named (the default names date_place)
        raise ConfigError(f"{STAGE}: feature_steps names {unknown}: neither a generated feature "
                          f"{sorted(FEATURES)} nor chat_name {cfg.chat_name!r}")
    data = _feature_data(cfg, stage_dir)

    trained = {name: _train_adapter(cfg, name, train, val, tokenizer, stage_dir)
               for name, (_, train, val) in data.items()}

    # serving: the base once more, one slot per adapter, every adapter loaded from its file
    served = load_model(cfg.checkpoint, family="text")
    reference = _base_tensors(base)
    adapters = attach_lora(served, max(cfg.rank, 1), cfg.alpha, targets=cfg.targets or None, slots=len(trained),
                           name=None)
    for name, facts in trained.items():
        adapters.load(facts["path"], name)
    columns = ["base"] + list(trained)
    scores: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict]] = {}
    score_names: dict[str, str] = {}
    mixed_rows, mixed_agree = 0, 0
    for name, (feature, _, val_path) in data.items():
        if feature is None:
            continue
        conversations = read_chat_jsonl(val_path)
        outputs = {}
        for column in columns:
            adapters.set_adapter(None if column == "base" else column)
            outputs[column] = answers(served, tokenizer, conversations, cfg.max_new_tokens)
        scores[name] = {column: score_feature(feature, conversations, outputs[column]) for column in columns}
        score_names[name] = feature.score_name
        samples[name] = [{"prompt": turns[-2]["content"], "reference": turns[-1]["content"],
                          **{column: outputs[column][i] for column in columns}}
                         for i, turns in enumerate(conversations[: cfg.show_examples])]
        # a mixed batch: this feature's first rows, alternating its adapter and the base
        rows = conversations[:4]
        row_adapters = [name if i % 2 == 0 else None for i in range(len(rows))]
        with adapters.mixed(row_adapters):
            mixed = answers(served, tokenizer, rows, cfg.max_new_tokens)
        alone = [outputs["base" if a is None else a][i] for i, a in enumerate(row_adapters)]
        mixed_rows += len(rows)
        mixed_agree += sum(m == a for m, a in zip(mixed, alone))
    adapters.set_adapter(None)
    with torch.no_grad():  # the same held-out loss under the base alone: what each adapter gained
        base_loss = {name: ChatTask(served, facts["val_batches"]).evaluate()["val_loss"] for name, facts in trained.items()}
    base_unchanged = all(facts["base_unchanged"] for facts in trained.values()) and all(
        torch.equal(reference[k], v) for k, v in _base_tensors(served).items())

    _figures(stage_dir, {name: facts["records"] for name, facts in trained.items()}, scores, score_names)
    samples_path = stage_dir.root / "samples.json"
    atomic_write_json(samples_path, samples)
    # the generated features' counts, for their data cards (python -m mmafm.data.cards <this file>)
    atomic_write_json(stage_dir.root / "data_card_stats.json", {
        "text_sources": {name: facts["counts"] for name, facts in trained.items() if data[name][0] is not None},
        "config": {"seed": cfg.seed, "max_tokens": cfg.max_tokens}})
    summary: dict[str, Any] = {}
    for name, facts in trained.items():
        summary[f"{name}_val_loss_base"] = round(base_loss[name], 4)
        summary[f"{name}_val_loss"] = round(facts["val_loss"], 4)
        if name in scores:
            summary[f"{name}_score_base"] = round(scores[name]["base"], 4)
            summary[f"{name}_score_adapter"] = round(scores[name][name], 4)
        summary[f"{name}_adapter_params"] = facts["parameters"]
    summary.update({
        "score_names": score_names,
        "scores": scores,
        "base_unchanged": base_unchanged,
        "mixed_batch_rows_equal": f"{mixed_agree}/{mixed_rows}",
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "steps_per_adapter": {name: facts["steps"] for name, facts in trained.items()},
        "seconds": round(time.time() - start, 1),
    })
    outputs = {f"adapter_{name}": str(facts["path"]) for name, facts in trained.items()}
    outputs.update({"adapters_dir": str(stage_dir.root / "adapters"), "base_checkpoint": cfg.checkpoint,
                    "tokenizer": cfg.tokenizer, "samples": str(samples_path)})
    stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


register_stage(STAGE, AdapterStageConfig, run)
