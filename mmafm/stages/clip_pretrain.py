"""Stage 01: CLIP-style contrastive pretraining of an image tower (2025 report, vision encoders).

The 2025 report pretrains its image encoders contrastively on image-text pairs before they meet
the language model (REFERENCE.md, "Vision encoders": CLIP-style loss at 448x448; FLIP masking for
ViT-g). This stage trains :class:`mmafm.models.clip.CLIP` -- any registered vision preset plus a
causal text tower -- on the data stage's WebDataset pair shards with open_clip's losses
(``ClipLoss``, or ``SigLipLoss`` for the sigmoid variant), gathering features across ranks when run
under torchrun. It runs on the shared trainer (:mod:`mmafm.train`), so it resumes from its latest
checkpoint, and evaluates once per epoch and at the end:

- zero-shot classification of held-out Fashion-MNIST (prompt templates over its 10 class names),
- image<->text retrieval recall@1/@5 on the held-out (``val``) pairs,

each with its chance level (:mod:`mmafm.eval.clip`). Outputs: the image tower checkpoint the
vision-language stage starts from (``image_tower``, with ``image_preset`` / ``image_size``) and the
full CLIP checkpoint (``clip_checkpoint``), both read back by :func:`mmafm.load_model` (a stage
folder loads the CLIP; ``output="image_tower"`` the tower).
"""

from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mmafm.checkpoint import save_model
from mmafm.config import ConfigError
from mmafm.eval.clip import FASHION_MNIST_PROMPT_NAMES, evaluate_clip, fashion_mnist_tensor
from mmafm.models.clip import (
    CLIP,
    TEXT_TOWERS,
    CLIPConfig,
    save_image_tower,
    text_tower_config,
)
from mmafm.registry import list_models, model_family
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig
from mmafm.train.trainer import setting
from mmafm.tokenizer import CaptionTokenizer, load_caption_tokenizer

__all__ = ["ClipPretrainConfig", "ClipTask", "ClipBatches", "count_pairs", "random_grayscale", "build_model", "run"]

STAGE = "01_clip_pretrain"
log = logging.getLogger(__name__)


@dataclass
class ClipPretrainConfig(TrainStageConfig):
    """Contrastive pretraining. Defaults: the tiny CPU pipeline (minutes on 2 cores)."""

    # --- model
    image_preset: str = "vit_base_patch16_tiny"  # any registered vision preset [paper: vit_giant_patch14 server, vitdet_large_patch16_rw device]
    image_size: int = field(default=64, metadata={"min": 8})  # training resolution [paper: 448; tiny: 64]
    mask_ratio: float = field(default=0.0, metadata={"min": 0.0, "max": 0.95})  # FLIP patch masking, plain ViT presets only [2nd: ViT-g; open: FLIP's 0.5]
    text_preset: str = field(default="tiny", metadata={"choices": tuple(TEXT_TOWERS)})  # text tower shape [open]: tiny / base / large / giant
    text_width: int = field(default=0, metadata={"min": 0})  # override the preset's text width (0 = keep; MLP = 4 x width)
    text_ffn: str = field(default="gelu", metadata={"choices": ("gelu", "swiglu")})  # CLIP GELU MLP or AFM SwiGLU [open]
    context_length: int = field(default=32, metadata={"min": 4})  # caption tokens incl. start/end (CLIP: 77; our captions are short)
    embed_dim: int = field(default=64, metadata={"min": 1})  # shared embedding width [open]
    loss: str = field(default="clip", metadata={"choices": ("clip", "siglip")})  # open_clip ClipLoss (softmax) or SigLipLoss (sigmoid)
    # --- data
    pairs_dir: str = field(default="", metadata={"path": "dir"})  # the data stage's `pairs_dir` (pairs-{train,val}-NNNNNN.tar)
    tokenizer: str = field(default="", metadata={"path": "file", "keywords": ("openclip",)})  # the data stage's `tokenizer` file, or "openclip" (open_clip's bundled BPE)
    fashion_mnist: str = field(default="", metadata={"path": "dir"})  # the data stage's `fashion_mnist` folder; "" = /usr/share/datasets/fashion-mnist
    batch_size: int = field(default=128, metadata={"min": 2})  # pairs per step per rank (negatives come from the batch)
    num_workers: int = field(default=1, metadata={"min": 0})  # DataLoader processes decoding/augmenting (2-core machine: 1)
    threads: int = field(default=0, metadata={"min": 0})  # torch compute threads; 0 = CPU cores minus num_workers (>= 1), so the loader keeps its own core
    grayscale_prob: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})  # share of training images turned grey (on top of the reader's crop + flip) [open]
    # --- optimization
    # (AdamW betas (0.9, 0.98), eps 1e-6 as CLIP's are fixed; schedule, grad_accum_steps, grad_clip,
    # precision, log_every: the trainer's defaults, see TrainSettings)
    max_steps: int = setting("max_steps", 600)  # optimizer steps
    lr: float = setting("lr", 2e-3)  # peak learning rate [open; CLIP ViT-B: 5e-4 at batch 32k]
    warmup_steps: int = setting("warmup_steps", 50)  # linear warm-up
    min_lr_ratio: float = setting("min_lr_ratio", 0.05)  # final LR / peak (cosine) [open]
    weight_decay: float = setting("weight_decay", 0.1)  # AdamW decoupled decay [open; CLIP: 0.2]
    parallel: str = setting("parallel", "none", choices=("none", "ddp", "fsdp"))  # under torchrun: "ddp", or "fsdp" (FSDP2 on every tower block, for ViT-g); the loss gathers features across ranks
    # --- evaluation and checkpoints
    eval_every: int = setting("eval_every", 0)  # steps between evaluations; 0 = once per epoch (and always at the end)
    eval_pairs: int = field(default=500, metadata={"min": 2})  # held-out pairs for retrieval (the first N of the val shards)
    fmnist_images: int = field(default=1000, metadata={"min": 10})  # Fashion-MNIST test images for zero-shot
    fmnist_invert: bool = True  # dark garment on white like the training pictures [open, label-free]
    ckpt_every: int = setting("ckpt_every", 200)  # resumable checkpoint cadence (0 = end only)


# ------------------------------------------------------------------------------------- data
def count_pairs(shards: list[str]) -> int:
    """Pairs (``.txt`` members) in the shards, from the tar headers only."""
    total = 0
    for shard in shards:
        try:
            with tarfile.open(shard, "r|*") as tar:
                total += sum(1 for member in tar if member.isfile() and member.name.endswith(".txt"))
        except (tarfile.TarError, OSError, EOFError) as err:
            log.warning("cannot count %s (%s): it will be skipped while training", shard, err)
    return total


class ClipBatches:
    """Re-iterable ``(images (B, 3, S, S), tokens (B, T))`` batches of the training shards.

    Each iteration is one epoch: the shard reader is told the epoch (the trainer calls
    :meth:`set_epoch`), so every epoch has its own, reproducible shuffle and augmentation, and a
    resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, dataset, batch_size: int, num_workers: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, num_workers=self.num_workers, drop_last=True,
            persistent_workers=False, prefetch_factor=4 if self.num_workers else None,
        )
        return iter(loader)


def _cpu_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _tokenize_one(tokenizer: CaptionTokenizer):
    return lambda caption: tokenizer([caption])[0]


# ------------------------------------------------------------------------------------- task
def random_grayscale(images: torch.Tensor, prob: float) -> torch.Tensor:  # (B, 3, H, W)
    """Turn a random ``prob`` share of normalized images grey (ITU-R 601 luma, torchvision's
    ``RandomGrayscale`` coefficients), so grey held-out pictures are not out of distribution."""
    from mmafm.data.shards import IMAGE_MEAN, IMAGE_STD

    mean = images.new_tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGE_STD).view(1, 3, 1, 1)
    pixels = images * std + mean
    luma = (pixels * images.new_tensor((0.2989, 0.587, 0.114)).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    grey = (luma.expand_as(pixels) - mean) / std
    chosen = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < prob
    return torch.where(chosen, grey, images)


class ClipTask:
    """The shared trainer's task: contrastive loss on a batch, zero-shot + retrieval evaluation."""

    def __init__(self, model: CLIP, loss: str, held_out: dict[str, Any], grayscale_prob: float = 0.0):
        self.model = model  # the trainer may swap in a DDP wrapper
        self.clip = model  # the plain module, for evaluation
        self.loss_name = loss
        self.held_out = held_out
        self.grayscale_prob = grayscale_prob
        self.set_distributed(rank=0, world_size=1)

    def set_distributed(self, rank: int, world_size: int) -> None:
        """open_clip's loss with its cross-rank feature gathering (local loss, gather with grad)."""
        from open_clip.loss import ClipLoss, SigLipLoss

        if self.loss_name == "siglip":
            self.loss_fn = SigLipLoss(rank=rank, world_size=world_size)
        else:
            self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)

    def training_forward(self, batch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        images, tokens = batch
        if self.grayscale_prob > 0:
            images = random_grayscale(images, self.grayscale_prob)
        out = self.model(images, tokens)
        loss = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
        metrics = {"logit_scale": out["logit_scale"].detach().reshape(())}  # (1,) under FSDP2: scalars_as_vectors
        if "logit_bias" in out:
            metrics["logit_bias"] = out["logit_bias"].detach().reshape(())
        return {"contrastive": loss}, metrics

    def evaluate(self) -> dict[str, float]:
        """Zero-shot Fashion-MNIST and held-out retrieval (:func:`mmafm.eval.clip.evaluate_clip`)."""
        return evaluate_clip(self.clip, self.held_out)[0]


def scalars_as_vectors(model: nn.Module) -> list[str]:
    """Turn every 0-dim parameter (CLIP's ``logit_scale``, SigLIP's ``logit_bias``) into a
    1-element vector in place, values kept: FSDP2's ``fully_shard`` refuses scalar parameters.
    The loss broadcasts either shape; saved weights are reshaped back to the model's own.
    Returns the names changed."""
    changed = []
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(module, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
                changed.append(f"{module_name}.{name}" if module_name else name)
    return changed


def _held_out(cfg: ClipPretrainConfig, tokenizer: CaptionTokenizer) -> dict[str, Any]:
    from mmafm.data import fashion_mnist
    from mmafm.data.shards import IMAGE_MEAN, IMAGE_STD, image_to_tensor, load_pairs

    pairs = load_pairs(cfg.pairs_dir, "val", limit=cfg.eval_pairs)
    if len(pairs) < 2:
        raise ValueError(
            f"{cfg.pairs_dir}: {len(pairs)} usable held-out (val) pairs; retrieval needs at least 2 "
            "(raise the data stage's val fraction or its number of pairs)"
        )
    data_dir = cfg.fashion_mnist or fashion_mnist.DATA_DIR
    images, labels, class_names = fashion_mnist.load("test", limit=cfg.fmnist_images, data_dir=data_dir)
    return {
        "val_pil": [image for image, _ in pairs],
        "val_captions": [caption for _, caption in pairs],
        "val_images": torch.stack([image_to_tensor(image, cfg.image_size) for image, _ in pairs]),
        "val_tokens": tokenizer([caption for _, caption in pairs]),
        "fmnist_raw": images,
        "fmnist_images": fashion_mnist_tensor(images, cfg.image_size, IMAGE_MEAN, IMAGE_STD, invert=cfg.fmnist_invert),
        "fmnist_labels": torch.as_tensor(labels),
        "fmnist_classes": class_names,
        "fmnist_prompts": [FASHION_MNIST_PROMPT_NAMES.get(name, name.lower()) for name in class_names],
        "tokenize": tokenizer,
    }


def build_model(cfg: ClipPretrainConfig, tokenizer: CaptionTokenizer) -> CLIP:
    """The CLIP the config describes, its text tower sized to the tokenizer."""
    if model_family(cfg.image_preset) not in ("vit", "vitdet"):
        vision = [n for n in list_models() if model_family(n) in ("vit", "vitdet")]
        raise ConfigError(f"image_preset {cfg.image_preset!r} is not a vision preset; choose one of {vision}")
    overrides: dict[str, Any] = {"context_length": cfg.context_length, "ffn": cfg.text_ffn}
    if cfg.text_width:
        heads = TEXT_TOWERS[cfg.text_preset]["num_heads"]
        overrides.update(width=cfg.text_width, mlp_dim=4 * cfg.text_width, num_heads=heads)
    text = tokenizer.text_config(text_tower_config(cfg.text_preset, **overrides))
    config = CLIPConfig(
        image_preset=cfg.image_preset, image_size=cfg.image_size, mask_ratio=cfg.mask_ratio,
        embed_dim=cfg.embed_dim, text=text, loss=cfg.loss,
    )
    model = CLIP(config)
    model.tokenizer = tokenizer
    return model


# ----------------------------------------------------------------------------------- figures
def _figures(stage_dir: StageDir, records: list[dict], details: dict, held_out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/fmnist_top1" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(title="contrastive loss", xlabel="step")
    axes[1].plot([r["step"] for r in train], [r["logit_scale"] for r in train])
    axes[1].set(title="logit scale exp(t)", xlabel="step")
    if evals:
        steps = [r["step"] for r in evals]
        for key, label in (("eval/i2t_R@1", "image->text R@1"), ("eval/t2i_R@1", "text->image R@1"),
                           ("eval/i2t_R@5", "image->text R@5"), ("eval/fmnist_top1", "Fashion-MNIST top-1")):
            axes[2].plot(steps, [r[key] for r in evals], marker="o", label=label)
        axes[2].axhline(evals[-1]["eval/chance_i2t_R@1"], ls=":", c="grey", label="chance R@1")
        axes[2].axhline(evals[-1]["eval/fmnist_chance"], ls="--", c="grey", label="chance top-1")
        axes[2].legend(fontsize=7)
    axes[2].set(title="held-out evaluation", xlabel="step", ylim=(0, 1))
    stage_dir.save_figure(fig, "curves")
    plt.close(fig)

    # Retrieval grid: held-out images with their three most similar held-out captions.
    similarity, captions = details["similarity"], held_out["val_captions"]
    shown = min(8, len(captions))
    fig, axes = plt.subplots(2, shown, figsize=(2.3 * shown, 5.2), squeeze=False,
                             gridspec_kw={"height_ratios": [1.2, 1]})
    for col in range(shown):
        axes[0, col].imshow(held_out["val_pil"][col])
        axes[0, col].set_title(_wrap(captions[col], 26), fontsize=6.5)
        top = similarity[col].topk(min(3, len(captions))).indices.tolist()
        lines = [("* " if captions[j] == captions[col] else "  ") + _wrap(captions[j], 28) for j in top]
        axes[1, col].text(0, 1, "\n".join(f"{i + 1}. {line}" for i, line in enumerate(lines)),
                          va="top", fontsize=6, family="monospace")
        for ax in axes[:, col]:
            ax.axis("off")
    fig.suptitle("held-out retrieval: image (true caption above), top-3 captions below (* = correct)")
    stage_dir.save_figure(fig, "retrieval_grid")
    plt.close(fig)

    # Zero-shot: confusion matrix and per-class accuracy.
    result, classes = details["zero_shot"], held_out["fmnist_classes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.imshow(result.confusion, cmap="Blues")
    left.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
             title=f"Fashion-MNIST zero-shot, top-1 {result.top1:.1%} (chance {result.chance:.0%})")
    left.set_xticklabels(classes, rotation=60, fontsize=7)
    left.set_yticklabels(classes, fontsize=7)
    right.bar(range(len(classes)), np.nan_to_num(result.per_class))
    right.axhline(result.chance, ls="--", c="grey", label="chance")
    right.set_xticks(range(len(classes)))
    right.set_xticklabels(classes, rotation=60, fontsize=7)
    right.set(ylim=(0, 1), title="per-class accuracy")
    right.legend()
    stage_dir.save_figure(fig, "zero_shot")
    plt.close(fig)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3])


# ---------------------------------------------------------------------------------------- run
def run(cfg: ClipPretrainConfig) -> dict[str, str]:
    """Train, evaluate, plot and write the checkpoints; returns the stage outputs."""
    from mmafm.train import seed_everything

    if not cfg.pairs_dir:
        raise ConfigError(f"{STAGE}: pairs_dir is empty; pass the 00_data stage's `pairs_dir` output")
    if not cfg.tokenizer:
        raise ConfigError(f"{STAGE}: tokenizer is empty; pass the 00_data stage's `tokenizer` output or 'openclip'")
    stage_dir = StageDir(cfg.out_dir, STAGE)
    seed_everything(cfg.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or max(1, _cpu_cores() - cfg.num_workers))
    try:
        return _run(cfg, stage_dir)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: ClipPretrainConfig, stage_dir: StageDir) -> dict[str, str]:
    from mmafm.data.shards import ImageTextShards, expand_shards
    from mmafm.train import Trainer
    from mmafm.train.distributed import sum_counts_over_ranks

    tokenizer = load_caption_tokenizer(cfg.tokenizer, cfg.context_length)
    shards = expand_shards(cfg.pairs_dir, "train")
    num_train = count_pairs(shards)
    if num_train < cfg.batch_size:
        raise ValueError(
            f"{cfg.pairs_dir}: {num_train} training pairs, fewer than one batch of {cfg.batch_size}; "
            "lower batch_size or make more pairs in the data stage"
        )
    steps_per_epoch = max(1, num_train // cfg.batch_size)
    dataset = ImageTextShards(shards, cfg.image_size, train=True, tokenize=_tokenize_one(tokenizer), seed=cfg.seed)
    batches = ClipBatches(dataset, cfg.batch_size, cfg.num_workers)
    held_out = _held_out(cfg, tokenizer)
    model = build_model(cfg, tokenizer)

    # CLIP's AdamW betas/eps (Radford et al. 2021); evaluation once per epoch unless asked otherwise
    train_config = cfg.train_config(betas=(0.9, 0.98), eps=1e-6, eval_every=cfg.eval_every or steps_per_epoch)
    if train_config.parallel == "fsdp":
        scalars_as_vectors(model)
    task = ClipTask(model, cfg.loss, held_out, grayscale_prob=cfg.grayscale_prob)
    trainer = Trainer(task, batches, train_config, stage_dir)
    task.set_distributed(trainer.rank, trainer.world_size)
    sharded = train_config.parallel == "fsdp" and trainer.world_size > 1
    if sharded:  # evaluation calls the towers' encoders, not forward: FSDP2 must gather for them too
        from torch.distributed.fsdp import register_fsdp_forward_method

        for method in ("encode_image", "encode_text"):
            register_fsdp_forward_method(model, method)
    records = trainer.fit()
    if sharded:  # the full weights (a collective; rank 0 gets them) in a plain copy to evaluate and save
        weights = trainer.full_state_dict()
        if trainer.rank == 0:  # only rank 0 evaluates and saves: the others build no copy
            task.clip = build_model(cfg, tokenizer)
            shapes = {name: tensor.shape for name, tensor in task.clip.state_dict().items()}
            task.clip.load_state_dict({name: tensor.reshape(shapes[name]) for name, tensor in weights.items()})

    skipped = sum_counts_over_ranks(dataset.skipped)  # each rank reads its own shards
    outputs: dict[str, str] = {}
    if trainer.rank == 0:
        metrics, details = evaluate_clip(task.clip, held_out)
        clip_path = save_model(stage_dir.root / "clip", task.clip, {"step": trainer.step, "metrics": metrics})
        tower_path = save_image_tower(task.clip, stage_dir.root / "image_tower")
        _figures(stage_dir, records, details, held_out)
        outputs = {
            "clip_checkpoint": str(clip_path),
            "image_tower": str(tower_path),
            "image_preset": cfg.image_preset,
            "image_size": str(cfg.image_size),
            "tokenizer": tokenizer.spec,
            "metrics": str(stage_dir.metrics_path),
        }
        summary = {
            **{k: round(v, 4) for k, v in metrics.items()},
            "train_pairs": num_train,
            "held_out_pairs": len(held_out["val_captions"]),
            "fmnist_images": len(held_out["fmnist_labels"]),
            "steps": trainer.step,
            "epochs": round(trainer.step * cfg.batch_size / num_train, 2),
            "params_M": round(sum(p.numel() for p in task.clip.parameters()) / 1e6, 3),
            "skipped_samples": skipped,
        }
        stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


register_stage(STAGE, ClipPretrainConfig, run)
