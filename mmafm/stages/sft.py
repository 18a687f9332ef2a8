"""Stage 07: supervised fine-tuning on generated instruction data, every family checked by code.

The reports' SFT (WAVE2.md "Post-training"): human and synthetic data, constant learning rate,
dropout 0.1 [paper]. Here every example is synthetic (:mod:`mmafm.posttrain.tasks`: define a word,
answer from a Wikipedia summary, arithmetic, list / JSON formatting, typed tool calls; the tiny
default trains the three a tiny model learns in its budget), so each family's pass rate is
measured by its checker before and after:

1. per family, write ``train_examples`` + ``eval_examples`` conversations as chat JSONL under
   ``data/<family>/`` (disjoint splits) and tokenize them with the chat template (loss on the
   assistant spans only, :func:`mmafm.data.chat.encode_chat`);
2. load the pretrained text model (05_long_context's in the tiny pipeline; any text checkpoint,
   02's too) with residual dropout ``dropout`` and fine-tune every weight with
   the shared trainer (constant LR after a short warm-up);
3. answer each family's held-out prompts greedily (the inference wing), before and after, and
   score them with the family's checker; plot the pass rates and the loss; save the model
   (dropout reset to 0 in its record) for 08 and 09.

Packing (``packing``, default on): a step's conversations are packed into rows of ``pack_len``
tokens with per-conversation ``document_ids``, so attention never crosses conversations and RoPE
positions restart in each (:mod:`mmafm.posttrain.packing`, :func:`mmafm.models.text.document_mask`).

Multimodal (``multimodal``, default off): a second phase fine-tunes a vision-language model
(``mm_checkpoint``: 06's) on ``visual_qa`` over the generated shape scenes, each ``<image>``
becoming the adapter's tokens of the rendered scene; pass rates per question kind before and after
(:func:`multimodal_sft`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mmafm.config import ConfigError
from mmafm.io import atomic_write_json
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig, check_tokenizer_vocab, require_inputs
from mmafm.train.trainer import setting

__all__ = ["SftStageConfig", "SftTask", "sft_logits", "held_out_prompt_free", "pass_rates", "multimodal_sft", "scene_images", "visual_answers",
           "visual_pass_rates", "visual_kind", "run"]

STAGE = "07_sft"
ALL_FAMILIES = "define_word,wiki_cloze,arithmetic,format_list,format_json,tool_call"
# what a ~0.6M-parameter model learns within 07's time budget: the families whose answers copy from
# the prompt into a format (define_word needs knowledge, wiki_cloze a lookup, arithmetic carrying;
# all three stayed at 0 in 300 steps on 2026-11-30, see docs/post_training.md)
TINY_FAMILIES = "format_list,format_json,tool_call"
SCENE_SEED_OFFSET = 1000  # visual_qa scenes: seed + this, so no scene is one 00_data rendered for 03 / 06


@dataclass
class SftStageConfig(TrainStageConfig):
    """SFT of the text model on generated instruction data. Defaults: the tiny pipeline (about 70 CPU
    seconds; the multimodal phase, off by default, about 25 more)."""

    # --- inputs (a pipeline wires them)
    checkpoint: str = field(default="", metadata={"path": "model"})  # the pretrained text model: 05_long_context's (tiny pipeline) or 02's `checkpoint` (or a stage folder)
    tokenizer: str = field(default="", metadata={"path": "file"})  # 00_data's `tokenizer` (the base's)
    # --- data (mmafm.posttrain.tasks.FAMILIES)
    families: str = TINY_FAMILIES  # task families, comma-separated (all: define_word,wiki_cloze,arithmetic,format_list,format_json,tool_call)
    train_examples: int = field(default=300, metadata={"min": 1})  # training conversations per family
    eval_examples: int = field(default=32, metadata={"min": 1})  # held-out conversations per family, checked by code
    max_tokens: int = field(default=256, metadata={"min": 8})  # longest conversation kept (tokens); longer are dropped
    # --- training
    dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 0.9})  # residual dropout while training [paper: 0.1]
    batch_size: int = field(default=16, metadata={"min": 1})  # conversations per step
    packing: bool = True  # pack a step's conversations into rows, attention reset per conversation [open: first-fit decreasing]
    pack_len: int = field(default=0, metadata={"min": 0})  # packed row length in tokens; 0 = max_tokens
    max_steps: int = setting("max_steps", 300)  # [open: 80 left every family at 0 at tiny size; 300 copies into formats]
    lr: float = setting("lr", 1e-3)  # [open: the report's 2e-5 is for a 3B model; a 1M-parameter model needs more]
    schedule: str = setting("schedule", "constant")  # [paper: constant LR for SFT]
    warmup_steps: int = setting("warmup_steps", 10)
    weight_decay: float = setting("weight_decay", 0.0)  # [open]
    ckpt_every: int = setting("ckpt_every", 0)
    # --- multimodal SFT: visual_qa over the generated shape scenes, images through the adapter
    multimodal: bool = False  # also fine-tune a vision-language model on visual questions (own phase; output `mm_checkpoint`) [issue 17]
    mm_checkpoint: str = field(default="", metadata={"path": "model"})  # 06_multimodal_adaptation's `checkpoint` (or 03's); used when multimodal
    visual_train_examples: int = field(default=600, metadata={"min": 1})  # training scene questions (count / colour / position)
    visual_eval_examples: int = field(default=64, metadata={"min": 1})  # held-out scenes, checked against the scene generator
    mm_steps: int = field(default=300, metadata={"min": 1})  # optimizer steps of the multimodal phase (the text phase: max_steps) [open: 60 stayed at chance]
    # --- evaluation
    max_new_tokens: int = field(default=40, metadata={"min": 1})  # answer length cap when checking
    show_examples: int = field(default=2, metadata={"min": 0})  # answers per family in samples.json


def _families(spec: str) -> list[str]:
    from mmafm.posttrain.tasks import FAMILIES, VISUAL_FAMILIES

    names = [n.strip() for n in spec.split(",") if n.strip()]
    visual = [n for n in names if n in VISUAL_FAMILIES]
    if visual:
        raise ConfigError(f"{STAGE}: families {visual} ask about images; the text families cannot show them "
                          f"(07's visual questions run in its multimodal phase: multimodal=true, mm_checkpoint=06's)")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ConfigError(f"{STAGE}: families {unknown} are not task families; known: {', '.join(FAMILIES)}")
    if not names:
        raise ConfigError(f"{STAGE}: families is empty; name at least one of {', '.join(FAMILIES)}")
    return names


def held_out_prompt_free(held_out: list[list[dict]], train: list[list[dict]]) -> list[list[dict]]:
    """``train`` without the conversations whose checked prompt (every turn before the scored
    assistant turn, :func:`~mmafm.posttrain.tasks.eval_turns`) is a held-out one's: distinct
    conversations can share it (a weather question names one of ten cities, and the checker scores
    the call only), and such a prompt would be scored on an answer seen in training."""
    import json

    from mmafm.posttrain.tasks import eval_turns

    def prompt(turns: list[dict]) -> str:
        return json.dumps(eval_turns(turns)[:-1], sort_keys=True)

    seen = {prompt(turns) for turns in held_out}
    return [turns for turns in train if prompt(turns) not in seen]


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


def sft_logits(model: torch.nn.Module, batch: Any, mode: str | None = None) -> torch.Tensor:  # (R, T, V)
    """Logits of an SFT batch (:class:`mmafm.posttrain.packing.SftBatch`): packed rows with their
    ``document_ids`` (attention reset per conversation); for a multimodal model the image slots
    (``image_tokens`` copies of the placeholder, :func:`mmafm.data.chat.encode_chat`) are filled
    with the adapter's tokens of ``batch.images`` in reading order (single process: the plain
    module's parts are called)."""
    plain = getattr(model, "module", model)
    if not hasattr(plain, "encode_images"):
        return model(batch.input_ids, document_ids=batch.document_ids)
    embeds = plain.text.embed_tokens(batch.input_ids)  # (R, T, D)
    slots = batch.input_ids == plain.config.image_token_id  # (R, T)
    if batch.images is not None:
        tokens = plain.encode_images(batch.images, mode).to(embeds.dtype)  # (N, K, D)
        if tokens.shape[0] * tokens.shape[1] != int(slots.sum()):
            raise ValueError(f"{STAGE}: {int(slots.sum())} image slots in the rows, {tokens.shape[0]} image(s) x "
                             f"{tokens.shape[1]} tokens given; encode the chats with image_tokens={tokens.shape[1]}")
        embeds = embeds.masked_scatter(slots[..., None].expand_as(embeds), tokens)
    elif bool(slots.any()):
        raise ValueError(f"{STAGE}: the rows hold image slots but the batch has no images")
    return plain.text(inputs_embeds=embeds, document_ids=batch.document_ids)


class SftTask:
    """Next-token loss on the assistant spans of (packed) SFT batches, for the shared trainer.

    Args:
        model: the text model, or a multimodal model (``mode`` its resolution mode).
        val_batches: held-out :class:`~mmafm.posttrain.packing.SftBatch` es for :meth:`evaluate`.
    """

    def __init__(self, model: torch.nn.Module, val_batches: list, mode: str | None = None):
        self.model, self.val_batches, self.mode = model, val_batches, mode

    def _text(self) -> torch.nn.Module:
        plain = getattr(self.model, "module", self.model)
        return plain.text if hasattr(plain, "encode_images") else plain

    def training_forward(self, batch: Any) -> tuple[dict, dict]:
        logits = sft_logits(self.model, batch, self.mode)  # (R, T, V)
        loss, metrics = self._text().loss(logits, batch.targets)
        return {"lm": loss}, metrics

    def count_items(self, batch: Any) -> int:
        """Tokens computed per batch (padding included)."""
        return batch.input_ids.numel()

    def evaluate(self) -> dict[str, float]:
        """Held-out cross-entropy per assistant token."""
        total, count = 0.0, 0
        for batch in self.val_batches:
            logits = sft_logits(self.model, batch, self.mode)
            total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                                                       ignore_index=-100, reduction="sum").item()
            count += int((batch.targets != -100).sum())
        return {"val_loss": total / max(count, 1)}


# ----------------------------------------------------------------------------- multimodal SFT


def visual_kind(turns: list[dict]) -> str:
    """``count``, ``colour`` or ``position``: what a ``visual_qa`` conversation asks."""
    question = next(t["content"] for t in turns if t["role"] == "user")
    return "count" if "How many" in question else "colour" if "What colour" in question else "position"


def scene_images(conversations: list[list[dict]], image_size: int) -> list[torch.Tensor]:
    """Per conversation, its scenes rendered at ``image_size`` and normalised ``(n, 3, S, S)``, in
    the order their ``<image>`` placeholders appear (the turns' ``"image": {"seed", "index"}``)."""
    from mmafm.data.shards import image_to_tensor
    from mmafm.data.synthetic import synthetic_pair

    out = []
    for turns in conversations:
        refs = [t["image"] for t in turns if t.get("image")]
        if any(r.get("source") != "synthetic" for r in refs):
            raise ConfigError(f"{STAGE}: only generated scenes (image source 'synthetic') can be rendered, got {refs}")
        out.append(torch.stack([image_to_tensor(synthetic_pair(r["index"], r["seed"], image_size).image, image_size)
                                for r in refs]))
    return out


@torch.no_grad()
def visual_answers(model: torch.nn.Module, tokenizer: Any, conversations: list[list[dict]], images: list[torch.Tensor],
                   max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy answers of a multimodal model to each conversation's last assistant turn (stopping at
    ``<|end|>``), prompts with one ``<image>`` per picture (the model expands them)."""
    from mmafm.data.chat import prompt_ids

    end = tokenizer.token_id("<|end|>")
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        prompts = [prompt_ids(turns, tokenizer) for turns in chunk]
        tokens = model.generate(torch.cat(images[start : start + batch_size]), prompts,
                                max_new_tokens=max_new_tokens, eos_id=end)
        for row in tokens.tolist():
            outputs.append(tokenizer.decode(row[: row.index(end)] if end in row else row))
    model.train(was_training)
    return outputs


def visual_pass_rates(answers_: list[str], conversations: list[list[dict]]) -> dict[str, float]:
    """``visual_qa`` checker pass rate overall and per question kind (count / colour / position)."""
    from mmafm.posttrain.tasks import check

    scores: dict[str, list[float]] = {}
    for answer, turns in zip(answers_, conversations):
        passed = check("visual_qa", answer, turns)
        scores.setdefault("visual_qa", []).append(passed)
        scores.setdefault(f"visual_{visual_kind(turns)}", []).append(passed)
    return {name: sum(v) / len(v) for name, v in scores.items()}


def multimodal_sft(cfg: SftStageConfig, tokenizer: Any, stage_dir: StageDir, row_len: int) -> tuple[dict, dict]:
    """SFT of a vision-language model on ``visual_qa``: each ``<image>`` becomes the adapter's image
    tokens of the rendered scene, rows packed like the text phase; the CLIP tower stays frozen.
    Returns ``(outputs, summary)``; figures ``mm_pass_rates`` / samples in ``mm_samples.json``."""
    from mmafm.checkpoint import load_model, save_model
    from mmafm.data.chat import encode_chat, read_chat_jsonl, write_chat_jsonl
    from mmafm.posttrain.packing import SftBatches
    from mmafm.posttrain.tasks import visual_conversations
    from mmafm.train import Trainer, seed_everything

    if not cfg.mm_checkpoint:
        raise ConfigError(f"{STAGE}: multimodal=true needs mm_checkpoint: 06_multimodal_adaptation's (or 03's) "
                          f"`checkpoint`")
    model = load_model(cfg.mm_checkpoint, family="multimodal")
    if model.text.config.vocab_size != tokenizer.vocab_size or model.config.image_token_id != tokenizer.image_id:
        raise ConfigError(f"{STAGE}: mm_checkpoint {cfg.mm_checkpoint} has a {model.text.config.vocab_size}-token "
                          f"vocabulary (image id {model.config.image_token_id}); tokenizer {cfg.tokenizer} has "
                          f"{tokenizer.vocab_size} (image id {tokenizer.image_id})")
    for module in model.text.modules():  # residual dropout while training [paper: 0.1]; the record keeps 0
        if isinstance(module, torch.nn.Dropout):
            module.p = cfg.dropout
    model.set_trainable(vision=False, adapter=True, text=True)
    mode = model.config.default_mode
    size, per_image = model.resolution_mode(mode).image_size, model.num_image_tokens(mode)

    # scenes of another seed than the data stage's (00 draws seed `seed`, which 03 / 06 trained on)
    conversations = visual_conversations(cfg.visual_eval_examples + cfg.visual_train_examples, cfg.seed + SCENE_SEED_OFFSET)
    folder = stage_dir.root / "data" / "visual_qa"
    write_chat_jsonl(folder / "val.jsonl", conversations[: cfg.visual_eval_examples])
    write_chat_jsonl(folder / "train.jsonl", conversations[cfg.visual_eval_examples :])
    held_out, train_turns = read_chat_jsonl(folder / "val.jsonl"), read_chat_jsonl(folder / "train.jsonl")
    held_images, train_images = scene_images(held_out, size), scene_images(train_turns, size)
    train = [encode_chat(turns, tokenizer, image_tokens=per_image) for turns in train_turns]
    val = [encode_chat(turns, tokenizer, image_tokens=per_image) for turns in held_out]
    longest = max(len(ids) for ids, _ in train + val)
    row = max(row_len, longest) if row_len else 0
    seed_everything(cfg.seed)
    val_source = SftBatches(val, cfg.batch_size, tokenizer.pad_id, row, images=held_images)
    val_batches = [val_source.collate(range(i, min(i + cfg.batch_size, len(val)))) for i in range(0, len(val), cfg.batch_size)]
    batches = SftBatches(train, cfg.batch_size, tokenizer.pad_id, row, images=train_images)

    before_answers = visual_answers(model, tokenizer, held_out, held_images, cfg.max_new_tokens)
    before = visual_pass_rates(before_answers, held_out)
    train_cfg = replace(cfg.train_config(), max_steps=cfg.mm_steps)
    trainer = Trainer(SftTask(model, val_batches, mode), batches, train_cfg, StageDir(stage_dir.root / "multimodal", STAGE))
    records = trainer.fit()
    model = trainer.model
    for module in model.text.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    after_answers = visual_answers(model, tokenizer, held_out, held_images, cfg.max_new_tokens)
    after = visual_pass_rates(after_answers, held_out)
    checkpoint = save_model(stage_dir.checkpoint_dir / "sft_mm_model", model,
                            {"tokenizer": cfg.tokenizer, "stage": STAGE, "step": trainer.step, "mode": mode})
    _bars(stage_dir, "mm_pass_rates", before, after, "visual questions on held-out scenes")
    samples = [{"question": turns[0]["content"], "reference": turns[-1]["content"], "before": b, "after": a}
               for turns, b, a in list(zip(held_out, before_answers, after_answers))[: max(cfg.show_examples, 4)]]
    atomic_write_json(stage_dir.root / "mm_samples.json", samples)
    final = [r for r in records if "eval/val_loss" in r][-1]
    summary = {f"pass_{k}_before": round(v, 4) for k, v in before.items()}
    summary.update({f"pass_{k}_after": round(v, 4) for k, v in after.items()})
    summary.update({"mm_val_loss": round(final["eval/val_loss"], 4), "mm_train_conversations": len(train),
                    "mm_image_tokens": per_image, "mm_padding_share": round(batches.padding_share(), 4)})
    return {"mm_checkpoint": str(checkpoint)}, summary


def _bars(stage_dir: StageDir, name: str, before: dict[str, float], after: dict[str, float], title: str) -> None:
    """Before / after bars per family (or question kind)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(before)
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(families), 3.4))
    for offset, (label, rates) in enumerate((("before", before), ("after SFT", after))):
        bars = ax.bar([i + 0.4 * offset for i in range(len(families))], [rates[f] for f in families], 0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([i + 0.2 for i in range(len(families))], families, fontsize=8, rotation=20)
    ax.set(ylim=(0, 1.1), ylabel="checker pass rate (held out)", title=title)
    ax.legend(fontsize=8)
    stage_dir.save_figure(fig, name)
    plt.close(fig)


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

    _bars(stage_dir, "pass_rates", before, after, "pass rate per task family")


def run(cfg: SftStageConfig) -> dict[str, str]:
    """Generate the data, fine-tune, check, plot and save; returns the stage outputs."""
    from mmafm.checkpoint import load_model, save_model
    from mmafm.data.chat import read_chat_jsonl, write_chat_jsonl
    from mmafm.posttrain.tasks import family_conversations
    from mmafm.posttrain.packing import SftBatches
    from mmafm.stages.adapter import encode_conversations
    from mmafm.tokenizer import Tokenizer
    from mmafm.train import Trainer, seed_everything

    require_inputs(cfg, STAGE, dict.fromkeys(("checkpoint", "tokenizer"), "a pretrained text model's `checkpoint` (05 or 02) "
                                             "and 00_data's `tokenizer` (configs/pipelines/tiny.yaml wires them)"))
    if cfg.multimodal and not cfg.mm_checkpoint:
        raise ConfigError(f"{STAGE}: multimodal=true needs mm_checkpoint: 06_multimodal_adaptation's (or 03's) "
                          f"`checkpoint`")
    families = _families(cfg.families)
    start = time.time()
    stage_dir = StageDir(cfg.out_dir, STAGE)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    model = load_model(cfg.checkpoint, family="text", overrides={"dropout": cfg.dropout})
    check_tokenizer_vocab(STAGE, model, tokenizer, cfg.tokenizer, "the base", refer_as="the base")

    train, held_out, counts = [], {}, {}
    for family in families:
        conversations = family_conversations(family, cfg.eval_examples + cfg.train_examples, cfg.seed)
        held, kept = conversations[: cfg.eval_examples], held_out_prompt_free(conversations[: cfg.eval_examples],
                                                                               conversations[cfg.eval_examples :])
        folder = stage_dir.root / "data" / family
        write_chat_jsonl(folder / "val.jsonl", held)
        write_chat_jsonl(folder / "train.jsonl", kept)
        held_out[family] = read_chat_jsonl(folder / "val.jsonl")
        encoded, dropped = encode_conversations(read_chat_jsonl(folder / "train.jsonl"), tokenizer, cfg.max_tokens)
        train += encoded
        counts[family] = {"train": len(encoded), "val": cfg.eval_examples,
                          "skipped": {f"longer than max_tokens={cfg.max_tokens}": dropped,
                                      "a held-out prompt": len(conversations) - cfg.eval_examples - len(kept)}}
    val, _ = encode_conversations([t for c in held_out.values() for t in c], tokenizer, cfg.max_tokens)
    seed_everything(cfg.seed)
    row_len = (cfg.pack_len or cfg.max_tokens) if cfg.packing else 0
    if row_len and row_len < cfg.max_tokens:
        raise ConfigError(f"{STAGE}: pack_len={row_len} is shorter than max_tokens={cfg.max_tokens}: a kept "
                          f"conversation would not fit a row")
    val_source = SftBatches(val, cfg.batch_size, tokenizer.pad_id, row_len)
    val_batches = [val_source.collate(range(i, min(i + cfg.batch_size, len(val))))
                   for i in range(0, len(val), cfg.batch_size)]
    train_batches = SftBatches(train, cfg.batch_size, tokenizer.pad_id, row_len)

    before, before_answers = pass_rates(model, tokenizer, held_out, cfg.max_new_tokens)
    trainer = Trainer(SftTask(model, val_batches), train_batches, cfg.train_config(), stage_dir)
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
        "packing": f"rows of {row_len} tokens, attention reset per conversation" if row_len else "off: one padded row per conversation",
        "padding_share": round(train_batches.padding_share(), 4),
        "seconds": round(time.time() - start, 1),
    })
    outputs = {"checkpoint": str(checkpoint), "tokenizer": cfg.tokenizer, "samples": str(samples_path),
               "data_dir": str(stage_dir.root / "data")}
    if cfg.multimodal:
        mm_outputs, mm_summary = multimodal_sft(cfg, tokenizer, stage_dir, row_len)
        outputs.update(mm_outputs)
        summary.update(mm_summary)
        summary["seconds"] = round(time.time() - start, 1)
    stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


register_stage(STAGE, SftStageConfig, run)
