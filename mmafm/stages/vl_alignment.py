"""Stage 03: joint vision-language training with a captioning loss (2025 report, stage 2).

REFERENCE.md, "Vision encoders": after contrastive pretraining, "encoder + vision-language adapter
+ a small decoder [are] trained jointly" [2nd]. This stage builds a
:class:`mmafm.models.multimodal.MultimodalModel`, starts its encoder from the CLIP stage's image
tower and its decoder from the text pretraining stage (either may be fresh), and trains it on the
data stage's image-caption pairs to continue ``<s> <image> `` with the caption and ``</s>``. The
loss is the decoder's next-token cross-entropy on the caption tokens only (image positions carry
no target). Which parts train is configurable (``train_vision`` / ``train_adapter`` /
``train_text``).

Held-out evaluation (the data stage's ``val`` split) comes from :mod:`mmafm.eval.captions`:
generated captions (greedy, KV cache) under held-out images, in a figure; caption perplexity;
"pick the right caption" among ``num_candidates`` held-out captions, against chance and against
the same candidates under a wrong image (the text prior alone).

Outputs: ``checkpoint`` (weights + config, read back by
:func:`mmafm.load_model`), ``preset``, ``tokenizer``, ``mode``.

Run alone (no upstream stages), it makes its own synthetic pairs and trains a small tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mmafm.checkpoint import CheckpointError, load_model, save_model
from mmafm.config import ConfigError
from mmafm.eval.captions import (
    caption_ids,
    caption_log_likelihoods,
    caption_perplexity,
    collate_captions,
    evaluate_captions,
    generate_captions,
)
from mmafm.models.adapter import MODES
from mmafm.models.multimodal import IGNORE_INDEX, MultimodalModel
from mmafm.registry import create_model, model_family
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig
from mmafm.train.trainer import setting

__all__ = [
    "VLAlignmentConfig",
    "CaptionTask",
    "CaptionBatches",
    "build_model",
    "check_tower_inputs",
    "run",
]

STAGE = "03_vl_alignment"
log = logging.getLogger(__name__)


@dataclass
class VLAlignmentConfig(TrainStageConfig):
    """Stage 03. Defaults are the tiny CPU run (< 4 minutes on 2 cores)."""

    # --- inputs (a pipeline wires them from upstream manifests; empty = standalone) ---
    pairs_dir: str = field(default="", metadata={"path": "dir"})  # 00_data `pairs_dir`; "" = make `synthetic_pairs` shape scenes here
    tokenizer: str = field(default="", metadata={"path": "file"})  # 00_data `tokenizer` (.model); "" = train a small BPE on the captions
    image_tower: str = field(default="", metadata={"path": "model"})  # 01_clip_pretrain `image_tower`; "" = fresh encoder
    image_preset: str = ""  # 01_clip_pretrain `image_preset`; "" = the model preset's encoder
    text_checkpoint: str = field(default="", metadata={"path": "model"})  # 02_text_pretrain `checkpoint`; "" = fresh decoder
    text_preset: str = ""  # 02_text_pretrain `preset`; "" = the model preset's decoder
    model_preset: str = "afm_vl_tiny"  # multimodal preset supplying the adapter and mode table
    synthetic_pairs: int = field(default=2000, metadata={"min": 16})  # standalone only: generated pairs
    # --- what trains [2nd: all three jointly] ---
    train_vision: bool = True  # update the image encoder
    train_adapter: bool = True  # update the vision-language adapter
    train_text: bool = True  # update the decoder
    # --- resolution ---
    mode: str = field(default="balanced", metadata={"choices": MODES})  # resolution mode trained and evaluated [2nd: balanced 672]
    image_size: int = field(default=64, metadata={"min": 0})  # side of one view in `mode`; 0 = preset's [paper: 672; tiny: 64 = data stage]
    image_tokens: int = field(default=16, metadata={"min": 0})  # tokens per view in `mode` (a square); 0 = preset's [paper: 144]
    max_caption_tokens: int = field(default=40, metadata={"min": 4})  # caption tokens kept (EOS included)
    # --- optimisation ---
    # (schedule, grad_accum_steps, grad_clip, precision, log_every: the trainer's defaults, TrainSettings)
    max_steps: int = setting("max_steps", 1000)  # optimizer steps
    batch_size: int = field(default=32, metadata={"min": 1})  # pairs per step
    lr: float = setting("lr", 2e-3)  # peak learning rate [open]
    warmup_steps: int = setting("warmup_steps", 30)  # linear warm-up
    min_lr_ratio: float = setting("min_lr_ratio", 0.1)  # final LR / peak (cosine) [open]
    weight_decay: float = setting("weight_decay", 0.05)  # AdamW decoupled decay [open]
    parallel: str = setting("parallel", "none", choices=("none",))  # one process: the stage has not been run under torchrun yet
    num_workers: int = field(default=0, metadata={"min": 0})  # DataLoader processes (2-core machine: 0)
    eval_every: int = setting("eval_every", 250)  # steps between held-out perplexity checks (64 pairs); 0 = end only
    ckpt_every: int = setting("ckpt_every", 500)  # resumable checkpoint cadence (0 = end only)
    # --- evaluation ---
    eval_pairs: int = field(default=128, metadata={"min": 2})  # held-out pairs (the first N of the val split)
    num_candidates: int = field(default=4, metadata={"min": 2})  # captions per image in "pick the right caption"
    show_images: int = field(default=8, metadata={"min": 1})  # held-out images shown with generated captions
    max_new_tokens: int = field(default=24, metadata={"min": 1})  # generated caption length limit


# ------------------------------------------------------------------------------------- data
# a caption row is `<s> <image> caption </s>` (mmafm.eval.captions.caption_ids), batched by
# collate_captions: the layout the held-out scoring uses too
class CaptionBatches:
    """Re-iterable batches of the training shards; one iteration = one epoch (reproducible)."""

    def __init__(self, dataset: Any, batch_size: int, pad_id: int, num_workers: int = 0):
        self.dataset, self.batch_size, self.pad_id, self.num_workers = dataset, batch_size, pad_id, num_workers

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, num_workers=self.num_workers, drop_last=True,
            collate_fn=lambda samples: collate_captions(samples, self.pad_id),
        )
        return iter(loader)


def _standalone_data(cfg: VLAlignmentConfig, root: Path) -> tuple[str, str]:
    """Synthetic pair shards and a small tokenizer trained on their captions (no upstream stage)."""
    from mmafm.data.shards import PairShardWriter
    from mmafm.data.synthetic import generate_pairs
    from mmafm.tokenizer import train_tokenizer

    pairs_dir = root / "data" / "pairs"
    captions = []
    with PairShardWriter(pairs_dir, val_fraction=0.1, shard_size=1000, seed=cfg.seed) as writer:
        for pair in generate_pairs(cfg.synthetic_pairs, cfg.seed, image_size=64):  # the data stage's size
            writer.write(pair)
            captions.append(pair.caption)
    tokenizer = train_tokenizer(captions, root / "data" / "tokenizer", vocab_size=384, seed=cfg.seed)
    return str(pairs_dir), str(tokenizer.path)


# ------------------------------------------------------------------------------------- model
def check_tower_inputs(cfg: Any, stage: str = STAGE) -> None:
    """Each upstream checkpoint comes with its preset (the CLIP and text stages output both).

    Args:
        cfg: a config with ``image_tower`` / ``image_preset`` / ``text_checkpoint`` /
            ``text_preset`` (this stage's, or another that builds the same model).
        stage: names the stage in the message.
    """
    if cfg.image_tower and not cfg.image_preset:
        raise ConfigError(f"{stage}: image_tower is set but image_preset is empty; pass both CLIP outputs")
    if cfg.text_checkpoint and not cfg.text_preset:
        raise ConfigError(f"{stage}: text_checkpoint is set but text_preset is empty; pass both text outputs")


def build_model(cfg: VLAlignmentConfig, tokenizer: Any, stage: str = STAGE) -> MultimodalModel:
    """The multimodal model of ``cfg``, towers initialised from the upstream checkpoints, the
    adapter fresh.

    Args:
        cfg: this stage's config, or any config with the same tower fields (``model_preset``,
            ``image_preset``, ``text_preset``, ``image_tower``, ``text_checkpoint``,
            ``tokenizer``, ``mode``, ``image_size``, ``image_tokens``, ``train_vision`` /
            ``train_adapter`` / ``train_text``): ``06_multimodal_adaptation`` builds its model here.
        tokenizer: its vocabulary size and ``<image>`` / ``<pad>`` ids go into the model.
        stage: names the stage in error messages.
    """
    from mmafm.registry import TEXT_FAMILIES, get_config

    if model_family(cfg.model_preset) != "multimodal":
        raise ConfigError(f"{stage}: model_preset {cfg.model_preset!r} is not a multimodal preset (e.g. afm_vl_tiny)")
    # the flat stage parameters become MultimodalConfig's nested tower overrides, on top of the
    # model preset's own
    preset_config = get_config(cfg.model_preset)
    vision_overrides: dict[str, Any] = dict(preset_config.vision)
    text_overrides: dict[str, Any] = {**preset_config.text, "vocab_size": tokenizer.vocab_size}
    overrides: dict[str, Any] = {
        "image_token_id": tokenizer.image_id, "pad_token_id": tokenizer.pad_id, "default_mode": cfg.mode,
    }
    if cfg.image_preset:
        if model_family(cfg.image_preset) not in ("vit", "vitdet"):
            raise ConfigError(f"{stage}: image_preset {cfg.image_preset!r} is not a vision (vit/vitdet) preset")
        overrides["vision_preset"] = cfg.image_preset
    if cfg.text_preset:
        if model_family(cfg.text_preset) not in ("text", "ptmoe"):
            raise ConfigError(f"{stage}: text_preset {cfg.text_preset!r} is not a text (text/ptmoe) preset")
        overrides["text_preset"] = cfg.text_preset
    size_field, tokens_field = {
        "rapid": ("rapid_size", "rapid_image_tokens"),
        "balanced": ("balanced_size", "num_image_tokens"),
        "high_res": ("balanced_size", "num_image_tokens"),
    }[cfg.mode]
    if cfg.image_size:
        overrides[size_field] = cfg.image_size
    if cfg.image_tokens:
        overrides[tokens_field] = cfg.image_tokens

    text_model = None
    if cfg.text_checkpoint:
        text_model = load_model(cfg.text_checkpoint, family=TEXT_FAMILIES)
        vocab = text_model.config.vocab_size
        if vocab != tokenizer.vocab_size:
            raise ConfigError(
                f"{stage}: text_checkpoint {cfg.text_checkpoint} has a vocabulary of {vocab} but the "
                f"tokenizer {cfg.tokenizer or '(standalone)'} has {tokenizer.vocab_size}; pass the "
                "tokenizer the text stage was trained with"
            )
        checkpoint_overrides = dict(text_model.model_spec.overrides)
        checkpoint_overrides.pop("vocab_size", None)  # the tokenizer's, checked above
        text_overrides.update(checkpoint_overrides)  # validated against the text preset's config
    if cfg.image_tower:
        tower = load_model(cfg.image_tower, family=("vit", "vitdet"))
        tower_preset = tower.model_spec.preset
        if tower_preset != cfg.image_preset:
            raise ConfigError(
                f"{stage}: image_tower {cfg.image_tower} was trained from preset {tower_preset!r}, "
                f"but image_preset is {cfg.image_preset!r}; pass the CLIP stage's image_preset output"
            )
        if "img_size" in {f.name for f in dataclasses.fields(tower.config)}:
            vision_overrides["img_size"] = tower.config.img_size

    model = create_model(cfg.model_preset, vision=vision_overrides, text=text_overrides, **overrides)
    if cfg.image_tower:
        model.vision.load_state_dict(tower.state_dict(), strict=True)
    if text_model is not None:
        try:
            model.text.load_state_dict(text_model.state_dict(), strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"{cfg.text_checkpoint} does not fit text preset {model.config.text_preset!r}: {err}"
            ) from err
    model.set_trainable(vision=cfg.train_vision, adapter=cfg.train_adapter, text=cfg.train_text)
    if not any(model.trainable_parts().values()):
        raise ConfigError(f"{stage}: train_vision, train_adapter and train_text are all false: nothing to train")
    return model


# ------------------------------------------------------------------------------------- task
class CaptionTask:
    """The shared trainer's task: captioning loss on a batch; held-out perplexity as evaluation."""

    def __init__(self, model: MultimodalModel, mode: str, held_out: dict[str, Any] | None = None):
        self.model = model  # the trainer may swap in a DDP wrapper
        self.plain = model
        self.mode = mode
        self.held_out = held_out

    def training_forward(self, batch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        images, ids, labels = batch
        out = self.model(ids, images, mode=self.mode, labels=labels)
        return {"caption": out.loss}, out.metrics

    def count_items(self, batch) -> int:
        return int((batch[2] != IGNORE_INDEX).sum())  # caption tokens

    def evaluate(self) -> dict[str, float]:
        if not self.held_out:
            return {}
        sums, counts = caption_log_likelihoods(
            self.plain, self.held_out["images"], self.held_out["ids"], self.mode
        )
        return {"val_caption_ppl": caption_perplexity(sums, counts)}


# ----------------------------------------------------------------------------------- figures
def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:4])


def _figures(stage_dir: StageDir, records: list[dict], shown: list[tuple[Any, str, str]], metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "ce" in r]
    evals = [r for r in records if "eval/val_caption_ppl" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot([r["step"] for r in train], [r["ce"] for r in train], label="train")
    axes[0].set(title="captioning loss (cross-entropy per caption token)", xlabel="step")
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["eval/val_caption_ppl"] for r in evals], marker="o", label="during training (first <= 64 held-out)")
    axes[1].axhline(metrics["caption_ppl"], ls=":", c="grey", label=f"final, {int(metrics['eval_pairs'])} held-out")
    axes[1].legend(fontsize=7)
    axes[1].set(title=f"held-out caption perplexity (final {metrics['caption_ppl']:.2f})", xlabel="step", yscale="log")
    names = ["its image", "wrong image", "chance"]
    values = [metrics["choice_accuracy"], metrics["choice_accuracy_wrong_image"], metrics["choice_chance"]]
    axes[2].bar(names, values, color=["tab:blue", "tab:orange", "grey"])
    axes[2].set(title="pick the right caption (held out)", ylim=(0, 1), ylabel="accuracy")
    for x, value in enumerate(values):
        axes[2].text(x, value + 0.02, f"{value:.0%}", ha="center")
    stage_dir.save_figure(fig, "curves")
    plt.close(fig)

    cols = len(shown)
    fig, axes = plt.subplots(1, cols, figsize=(2.4 * cols, 3.6), squeeze=False)
    for ax, (image, truth, generated) in zip(axes[0], shown):
        ax.imshow(image)
        ax.set_title(_wrap(f"model: {generated}", 28), fontsize=7, loc="left")
        ax.set_xlabel(_wrap(f"true: {truth}", 28), fontsize=6.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("held-out images: generated caption (above), true caption (below)")
    stage_dir.save_figure(fig, "captions")
    plt.close(fig)


# ---------------------------------------------------------------------------------------- run
def run(cfg: VLAlignmentConfig) -> dict[str, str]:
    """Train, evaluate, plot and write the checkpoint later stages start from."""
    from mmafm.data.shards import ImageTextShards, expand_shards, image_to_tensor, load_pairs
    from mmafm.tokenizer import Tokenizer
    from mmafm.train import Trainer, seed_everything
    from mmafm.train.distributed import sum_counts_over_ranks

    stage_dir = StageDir(cfg.out_dir, STAGE)
    seed_everything(cfg.seed)
    if bool(cfg.pairs_dir) != bool(cfg.tokenizer):
        raise ConfigError(
            f"{STAGE}: pass both pairs_dir and tokenizer (the 00_data outputs) or neither (standalone); "
            f"got pairs_dir={cfg.pairs_dir!r}, tokenizer={cfg.tokenizer!r}"
        )
    check_tower_inputs(cfg)
    pairs_dir, tokenizer_path = cfg.pairs_dir, cfg.tokenizer
    if not pairs_dir:
        pairs_dir, tokenizer_path = _standalone_data(cfg, stage_dir.root)
    tokenizer = Tokenizer.load(tokenizer_path)
    model = build_model(cfg, tokenizer)
    resolution = model.resolution_mode(cfg.mode)

    held_pairs = load_pairs(pairs_dir, "val", limit=cfg.eval_pairs)
    if len(held_pairs) < cfg.num_candidates:
        raise ValueError(f"{pairs_dir}: {len(held_pairs)} held-out pairs, fewer than num_candidates={cfg.num_candidates}")
    held_images = torch.stack([image_to_tensor(image, resolution.image_size) for image, _ in held_pairs])
    held_captions = [caption for _, caption in held_pairs]
    perplexity_subset = {
        "images": held_images[:64],
        "ids": [caption_ids(tokenizer, c, cfg.max_caption_tokens) for c in held_captions[:64]],
    }

    dataset = ImageTextShards(
        expand_shards(pairs_dir, "train"), resolution.image_size, train=True, seed=cfg.seed,
        tokenize=lambda caption: caption_ids(tokenizer, caption, cfg.max_caption_tokens),
    )
    batches = CaptionBatches(dataset, cfg.batch_size, tokenizer.pad_id, cfg.num_workers)
    train_config = cfg.train_config()
    task = CaptionTask(model, cfg.mode, perplexity_subset)
    trainer = Trainer(task, batches, train_config, stage_dir)
    records = trainer.fit()
    model = trainer.model
    skipped = sum_counts_over_ranks(dataset.skipped)  # each rank reads its own shards

    metrics = evaluate_captions(
        model, tokenizer, held_images, held_captions, cfg.mode, cfg.num_candidates,
        cfg.max_caption_tokens, cfg.seed,
    )
    shown_count = min(cfg.show_images, len(held_pairs))
    generated = generate_captions(model, tokenizer, held_images[:shown_count], cfg.mode, cfg.max_new_tokens)
    shown = [(held_pairs[i][0], held_captions[i], generated[i]) for i in range(shown_count)]
    stage_dir.log({"step": trainer.step, **{f"final/{k}": v for k, v in metrics.items()}})
    _figures(stage_dir, records, shown, metrics)

    checkpoint = save_model(
        stage_dir.root / "vl_model", model,
        {"tokenizer": str(tokenizer_path), "step": trainer.step, "mode": cfg.mode, "metrics": metrics},
    )
    outputs = {
        "checkpoint": str(checkpoint),
        "preset": cfg.model_preset,
        "tokenizer": str(tokenizer_path),
        "mode": cfg.mode,
        "metrics": str(stage_dir.metrics_path),
    }
    summary = {
        **{k: round(v, 4) for k, v in metrics.items()},
        "image_tokens": model.num_image_tokens(cfg.mode),
        "trainable": model.trainable_parts(),
        "skipped_samples": skipped,  # training samples dropped, by reason, over all workers and ranks
        "examples": [{"true": t, "generated": g} for _, t, g in shown],
    }
    stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


register_stage(STAGE, VLAlignmentConfig, run)
