"""Stage 12: structural pruning of a trained text model with Soft-Top-K masks, then distillation.

The 2024 on-device model is initialised from a larger model pruned on its FFN hidden units only,
with Soft-Top-K masks learned on the core pretraining mixture while the model trains (188B tokens
in the report), and is then pretrained with a distillation target (0.9 x the teacher's top-1 +
0.1 x the true label) [paper; WAVE2.md "Distillation and pruning"]. At tiny scale this stage:

1. loads 02_text_pretrain's model (the larger model, also the teacher) and scores it on the
   held-out tokens;
2. for reference, prunes it by weight magnitude alone (each layer's top-``k`` units by
   :func:`~mmafm.train.prune.ffn_importance`, materialized) and scores that;
3. attaches learnable masks (:func:`~mmafm.train.prune.attach_ffn_masks`, ``k = keep_ratio x
   ffn_dim`` units per layer, scores initialised from the same magnitude importance) and trains
   masks and weights together on the pretraining tokens for ``max_steps`` steps (the token budget
   is ``max_steps x batch_size x seq_len``), the temperature annealing from ``temperature`` to
   ``final_temperature``;
4. materializes the dense smaller model (the source preset with ``ffn_dim=k``) and scores it;
5. distils it from the unpruned model for ``distill_steps`` steps with the 2024 top-1 target
   (the teacher runs online: a short run reads each window about once, so a cache would not pay;
   ``02_text_pretrain``'s ``distill_from`` uses the cache) and scores it again;
6. plots the mask evolution (units swapped relative to the magnitude choice, per layer; the
   final masks) and the held-out losses, and saves both models.

Outputs: ``checkpoint`` (pruned + distilled), ``pruned_model`` (materialized, before
distillation), ``teacher_model`` (the input), ``preset``, ``tokenizer``.
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
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig, require_inputs
from mmafm.stages.text_pretrain import TextPretrainTask, held_out_batches
from mmafm.train.trainer import setting

__all__ = ["PruneStageConfig", "MaskLearningTask", "mask_optimizer_factory", "run", "TABLE6_VARIANTS",
           "TABLE6_TASKS", "train_student", "reproduce_table6", "table6_task_metrics", "table6_summary",
           "table6_figure", "train_loss_curve", "cost_to_reach", "curve_crossings", "TeacherArm",
           "teacher_cost_curves", "compare_teacher_costs", "teacher_cost_figure"]

STAGE = "12_prune"


@dataclass
class PruneStageConfig(TrainStageConfig):
    """Soft-Top-K FFN pruning of 02's model, then distillation from it. Defaults: the tiny pipeline
    (well under a minute on 2 idle cores). ``max_steps`` etc. are the mask-learning run's."""

    # --- inputs (a pipeline wires them)
    checkpoint: str = field(default="", metadata={"path": "model"})  # the larger model: 02_text_pretrain's `checkpoint` (or its stage folder)
    tokens_dir: str = field(default="", metadata={"path": "dir"})  # 00_data's `tokens_dir`: the pretraining mixture
    tokenizer: str = field(default="", metadata={"path": "file"})  # 00_data's `tokenizer` (recorded with the checkpoints)
    # --- pruning
    keep_ratio: float = field(default=0.35, metadata={"min": 0.0, "max": 1.0})  # FFN units kept per layer [derived: 6.4B -> 3B by FFN only keeps ~35%]
    temperature: float = field(default=1.0, metadata={"min": 1e-6})  # Soft-Top-K entropy weight at the start (scores are standardised) [open]
    final_temperature: float = field(default=0.005, metadata={"min": 1e-6})  # reached at the last mask-learning step (near-hard masks) [open]
    mask_lr: float = field(default=0.05, metadata={"min": 0.0})  # AdamW LR of the mask scores (weights use `lr`) [open]
    train_weights: bool = True  # train the model with its masks [paper: masks learned while training]; False = scores only
    seq_len: int = field(default=128, metadata={"min": 2})  # tokens per row
    batch_size: int = field(default=8, metadata={"min": 1})  # rows per step
    # --- distillation of the pruned model from the unpruned one
    distill_steps: int = field(default=60, metadata={"min": 0})  # steps after materializing; 0 = none
    distill_weight: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})  # teacher top-1 share of the target [paper: 0.9]
    distill_lr: float = field(default=1e-3, metadata={"min": 0.0})  # peak LR of the distillation run (warm-up + cosine as set below) [open]
    eval_batches: int = field(default=4, metadata={"min": 1})  # held-out batches scored (the first N of val.bin)
    # --- the trainer's settings for mask learning
    max_steps: int = setting("max_steps", 60)  # mask-learning steps: the token budget with batch_size x seq_len [paper: 188B tokens]
    lr: float = setting("lr", 5e-4)  # LR of the model weights while the masks learn [open]
    warmup_steps: int = setting("warmup_steps", 5)
    min_lr_ratio: float = setting("min_lr_ratio", 0.1)
    log_every: int = setting("log_every", 5)
    ckpt_every: int = setting("ckpt_every", 0)  # end only: the stage takes well under a minute


# ----------------------------------------------------------------------------------- the task
class MaskLearningTask(TextPretrainTask):
    """Next-token loss through the masked model, plus mask metrics: the temperature, the mean gap
    between soft and hard masks, and per layer the fraction of kept units that differ from the
    magnitude-pruning choice (``mask_swapped/L<i>``)."""

    def __init__(self, model: nn.Module, val_batches: list, initial_kept: torch.Tensor):
        super().__init__(model, val_batches)
        self.initial_kept = initial_kept  # (layers, keep)

    def training_forward(self, batch):
        losses, metrics = super().training_forward(batch)
        masks = self.decoder.masks
        with torch.no_grad():
            soft = masks.masks()  # (layers, width)
            hard = torch.stack([torch.zeros(masks.width).index_fill_(0, kept.cpu(), 1.0) for kept in masks.kept()])
            metrics["temperature"] = masks.current_temperature()
            metrics["mask_gap"] = (soft.cpu() - hard).abs().mean().item()
            for layer, kept in enumerate(masks.kept()):
                same = torch.isin(kept.cpu(), self.initial_kept[layer]).sum().item()
                metrics[f"mask_swapped/L{layer}"] = 1.0 - same / masks.keep
        return losses, metrics


def mask_optimizer_factory(mask_lr: float):
    """``(model, config) -> AdamW``: the model's usual decay groups at ``config.lr`` (none when
    its weights are frozen) and the mask scores at ``mask_lr`` without decay."""
    from mmafm.train.optim import param_groups

    def build(model: nn.Module, config: Any) -> torch.optim.Optimizer:
        groups = []
        if any(p.requires_grad for p in model.model.parameters()):
            groups = param_groups(model.model, config.weight_decay)
        groups.append({"params": list(model.masks.parameters()), "weight_decay": 0.0, "lr": mask_lr, "name": "masks"})
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)

    return build


# ----------------------------------------------------------------------------------- helpers
@torch.no_grad()
def _held_out_loss(model: nn.Module, batches: list) -> float:
    from mmafm.eval.perplexity import token_nll

    model.eval()
    total, count = token_nll(model, batches)
    return total / count


@torch.no_grad()
def _held_out_accuracy(model: nn.Module, batches: list) -> float:
    """Fraction of held-out next tokens that are the model's argmax (greedy top-1 accuracy)."""
    model.eval()
    device = next(model.parameters()).device
    hits = sum(int((model(ids.to(device)).argmax(-1) == targets.to(device)).sum()) for ids, targets in batches)
    return hits / sum(targets.numel() for _, targets in batches)


def _key(name: str) -> str:
    return name.replace(" + ", "_").replace(" ", "_")


def _swapped(records: list[dict], layers: int) -> float:
    """Mean over layers of the last logged fraction of kept units not in the magnitude choice."""
    logged = [r for r in records if "mask_swapped/L0" in r]
    return round(sum(logged[-1][f"mask_swapped/L{i}"] for i in range(layers)) / layers, 4) if logged else 0.0


def _figures(stage_dir: StageDir, records: list[dict], distill_records: list[dict], final_masks: torch.Tensor,
             initial_order: torch.Tensor, losses: dict[str, float], accuracy: dict[str, float], keep: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "mask_gap" in r]
    layers = final_masks.shape[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for layer in range(layers):
        left.plot([r["step"] for r in train], [r[f"mask_swapped/L{layer}"] for r in train], label=f"layer {layer}")
    left.plot([r["step"] for r in train], [r["mask_gap"] for r in train], "k--", label="mean |soft - hard|")
    left.set(xlabel="mask-learning step", ylabel="fraction", ylim=(0, 1),
             title=f"kept units swapped vs magnitude choice (k={keep})")
    left.legend(fontsize=7)
    # units ordered by their initial (magnitude) importance: the learned masks move off the diagonal
    ordered = torch.stack([final_masks[layer, initial_order[layer]] for layer in range(layers)])
    image = right.imshow(ordered.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    right.set_yticks(range(layers))
    right.set(xlabel="FFN unit (by initial magnitude importance, high -> low)", ylabel="layer",
              title=f"final masks: {keep} of {final_masks.shape[1]} units kept per layer")
    fig.colorbar(image, ax=right, fraction=0.04)
    stage_dir.save_figure(fig, "masks")
    plt.close(fig)

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 3.6))
    names = list(losses)
    colors = ["grey", "tab:red", "tab:orange", "tab:blue", "tab:green"][: len(names)]
    for axis, values, label, fmt in ((left, losses, "held-out nats / token", "%.3f"),
                                     (middle, accuracy, "held-out next-token accuracy", "%.3f")):
        bars = axis.bar(range(len(names)), [values[n] for n in names], color=colors)
        axis.bar_label(bars, fmt=fmt, fontsize=7)
        axis.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names], fontsize=7)
        axis.set(ylabel=label)
    left.set(title="held-out loss (lower is better)")
    middle.set(title="greedy top-1 accuracy (higher is better)")
    ce = [r for r in records if "ce" in r]
    right.plot([r["step"] for r in ce], [r["ce"] for r in ce], label="mask learning (masked model)")
    offset = records[-1]["step"] if records else 0
    dist = [r for r in distill_records if "ce" in r]
    right.plot([offset + r["step"] for r in dist], [r["ce"] for r in dist], label="distillation (pruned model), CE")
    right.plot([offset + r["step"] for r in dist], [r["distill"] for r in dist], label="distillation, teacher top-1 CE")
    right.set(xlabel="step", ylabel="nats / token", title="training loss")
    right.legend(fontsize=7)
    stage_dir.save_figure(fig, "loss")
    plt.close(fig)


# ----------------------------------------------------------------------------------- run
def run(cfg: PruneStageConfig) -> dict[str, str]:
    """Learn masks, materialize, distil, evaluate, plot and save; returns the stage outputs."""
    from mmafm.checkpoint import load_model, save_model
    from mmafm.data.shards import TokenShards, read_token_meta
    from mmafm.train import Trainer, seed_everything
    from mmafm.train.distill import DistillTask
    from mmafm.train.prune import attach_ffn_masks, ffn_importance, masked_ffns, materialize

    require_inputs(cfg, STAGE, dict.fromkeys(("checkpoint", "tokens_dir", "tokenizer"),
                                             "02_text_pretrain's `checkpoint` and 00_data's `tokens_dir` and "
                                             "`tokenizer` (configs/pipelines/tiny.yaml wires them)"))
    if cfg.parallel != "none":
        raise ConfigError(f"{STAGE}: parallel={cfg.parallel!r}; the tiny pruning stage runs in one process")
    if getattr(cfg, "optimizer", "adamw") != "adamw":
        raise ConfigError(f"{STAGE}: optimizer={cfg.optimizer!r}; mask learning uses AdamW (optimizer='adamw')")
    start = time.time()
    stage_dir = StageDir(cfg.out_dir, STAGE)
    seed_everything(cfg.seed)
    teacher = load_model(cfg.checkpoint, family="text", dtype=torch.float32)
    vocab = int(read_token_meta(cfg.tokens_dir)["vocab_size"])
    if teacher.config.vocab_size != vocab:
        raise ConfigError(f"{STAGE}: the model has a {teacher.config.vocab_size}-token vocabulary, the tokens in "
                          f"{cfg.tokens_dir} {vocab}; pass the data the model was trained on")
    width = teacher.config.ffn_dim
    keep = max(1, round(cfg.keep_ratio * width))
    val_batches = held_out_batches(cfg.tokens_dir, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    losses = {"original": _held_out_loss(teacher, val_batches)}
    accuracy = {"original": _held_out_accuracy(teacher, val_batches)}

    # the magnitude-only baseline: the same importance the masks start from, hard top-k
    student = load_model(cfg.checkpoint, family="text", dtype=torch.float32)
    baseline = attach_ffn_masks(student, keep)
    baseline.masks.hard = True
    magnitude_pruned = materialize(baseline)
    losses["magnitude prune"] = _held_out_loss(magnitude_pruned, val_batches)
    accuracy["magnitude prune"] = _held_out_accuracy(magnitude_pruned, val_batches)
    initial_kept = baseline.masks.kept()  # (layers, keep)
    initial_order = torch.stack([ffn_importance(f).argsort(descending=True) for f in masked_ffns(baseline.remove()).values()])

    # 1. masks learned while the model trains
    student = load_model(cfg.checkpoint, family="text", dtype=torch.float32)
    masked = attach_ffn_masks(student, keep, cfg.temperature, cfg.final_temperature,
                              anneal_steps=cfg.max_steps * cfg.grad_accum_steps)
    if not cfg.train_weights:
        masked.model.requires_grad_(False)
    task = MaskLearningTask(masked, val_batches, initial_kept)
    shards = TokenShards(cfg.tokens_dir, cfg.seq_len, cfg.batch_size, seed=cfg.seed, split="train")
    trainer = Trainer(task, shards, cfg.train_config(), stage_dir, mask_optimizer_factory(cfg.mask_lr))
    records = trainer.fit()
    masked.eval()
    losses["soft masks"] = _held_out_loss(masked, val_batches)
    accuracy["soft masks"] = _held_out_accuracy(masked, val_batches)
    final_masks = masked.masks.masks().cpu()

    # 2. the dense smaller model
    pruned = materialize(masked)
    losses["learned prune"] = _held_out_loss(pruned, val_batches)
    accuracy["learned prune"] = _held_out_accuracy(pruned, val_batches)
    metadata = {"stage": STAGE, "tokenizer": cfg.tokenizer, "source": str(cfg.checkpoint), "keep": keep,
                "width": width, "stage_config": to_dict(cfg)}
    pruned_path = save_model(stage_dir.checkpoint_dir / "pruned_model", pruned, {**metadata, "distilled": False})

    # 3. distillation from the unpruned model (2024 top-1 target, teacher online)
    distill_records: list[dict] = []
    if cfg.distill_steps:
        seed_everything(cfg.seed)
        task = DistillTask(pruned.train(), val_batches, teacher=teacher, weight=cfg.distill_weight, loss="top1")
        distill_dir = StageDir(stage_dir.root / "distill", f"{STAGE}/distill")
        distill_config = cfg.train_config(max_steps=cfg.distill_steps, lr=cfg.distill_lr,
                                          warmup_steps=min(cfg.warmup_steps, cfg.distill_steps - 1))
        distill_trainer = Trainer(task, TokenShards(cfg.tokens_dir, cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1),
                                  distill_config, distill_dir)
        distill_records = distill_trainer.fit()
        losses["pruned + distilled"] = _held_out_loss(pruned, val_batches)
        accuracy["pruned + distilled"] = _held_out_accuracy(pruned, val_batches)
    final_path = save_model(stage_dir.checkpoint_dir / "text_model", pruned.eval(),
                            {**metadata, "distilled": bool(cfg.distill_steps)})

    _figures(stage_dir, records, distill_records, final_masks, initial_order, losses, accuracy, keep)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum_steps
    summary = {
        **{f"val_loss_{_key(name)}": round(value, 4) for name, value in losses.items()},
        **{f"val_acc_{_key(name)}": round(value, 4) for name, value in accuracy.items()},
        "val_ppl_original": round(math.exp(losses["original"]), 3),
        "val_ppl_final": round(math.exp(list(losses.values())[-1]), 3),
        "ffn_dim": width, "ffn_dim_pruned": keep,
        "params_M": round(teacher.num_params() / 1e6, 4), "params_M_pruned": round(pruned.num_params() / 1e6, 4),
        "mask_tokens": trainer.step * tokens_per_step, "distill_tokens": cfg.distill_steps * tokens_per_step,
        "units_swapped_vs_magnitude": _swapped(records, len(initial_kept)),
        "seconds": round(time.time() - start, 1),
    }
    outputs = {
        "checkpoint": str(final_path),
        "pruned_model": str(pruned_path),
        "teacher_model": str(cfg.checkpoint),
        "preset": pruned.model_spec.preset,
        "tokenizer": cfg.tokenizer,
        "metrics": str(stage_dir.metrics_path),
    }
    stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


# ----------------------------------------------------------------------- Table 6 at small scale
TABLE6_VARIANTS = ("baseline", "pruned init", "distillation", "pruned + distillation")
TABLE6_TASKS = ("mmafm_cloze", "mmafm_wordnet", "mmafm_arith")  # the text tasks of every row (mmafm.eval.tasks)


def train_student(model: nn.Module, tokens_dir: str, val_batches: list, steps: int, *, seq_len: int,
                  batch_size: int, lr: float, seed: int, teacher: nn.Module | None = None,
                  distill_weight: float = 0.9) -> dict[str, float]:
    """Pretrain ``model`` for ``steps`` steps (plain next-token loss, or the 2024 top-1 target from
    ``teacher``), in memory; returns its held-out loss and greedy top-1 accuracy, tokens, seconds
    and training FLOPs (the student's; a teacher's forward passes are not counted)."""
    from mmafm.data.shards import TokenShards
    from mmafm.train import Trainer, TrainConfig, seed_everything
    from mmafm.train.distill import DistillTask, train_flops_per_token

    seed_everything(seed)
    if teacher is None:
        task = TextPretrainTask(model.train(), val_batches)
    else:
        task = DistillTask(model.train(), val_batches, teacher=teacher, weight=distill_weight, loss="top1")
    config = TrainConfig(max_steps=steps, lr=lr, warmup_steps=min(10, steps - 1), min_lr_ratio=0.1, seed=seed,
                         log_every=max(1, steps // 4))
    start = time.time()
    Trainer(task, TokenShards(tokens_dir, seq_len, batch_size, seed=seed), config).fit()
    seconds = time.time() - start
    tokens = steps * batch_size * seq_len
    return {"val_loss": _held_out_loss(model, val_batches), "val_acc": _held_out_accuracy(model, val_batches),
            "train_tokens": tokens, "seconds": round(seconds, 2),
            "train_flops": train_flops_per_token(model, seq_len) * tokens}


def _table6_tokenizer(checkpoint: str, tokens_dir: str, tokenizer: Any, vocab_size: int) -> Any:
    """The tokenizer the text tasks need: ``tokenizer`` if given, else the one the checkpoint
    names, else the one the token folder's ``meta.json`` names."""
    from mmafm.checkpoint import load_tokenizer_for
    from mmafm.data.shards import read_token_meta
    from mmafm.tokenizer import Tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    if tokenizer:
        return Tokenizer.load(tokenizer)
    try:
        return load_tokenizer_for(checkpoint, None, vocab_size=vocab_size)
    except (ConfigError, FileNotFoundError, ValueError, KeyError):
        named = read_token_meta(tokens_dir).get("tokenizer")
        if not named:
            raise ValueError(f"reproduce_table6: no tokenizer for the text tasks: pass tokenizer=, or eval_tasks='' "
                             f"(neither {checkpoint} nor {tokens_dir}/meta.json names one)") from None
        return Tokenizer.load(named)


def reproduce_table6(checkpoint: str, tokens_dir: str, seeds: tuple[int, ...] = (0, 1, 2), steps: int = 100,
                     keep_ratio: float = 0.35, mask_steps: int = 60, seq_len: int = 128, batch_size: int = 8,
                     lr: float = 2e-3, eval_batches: int = 4, teacher: nn.Module | None = None,
                     variants: tuple[str, ...] = TABLE6_VARIANTS, eval_tasks: str = ",".join(TABLE6_TASKS),
                     eval_task_size: int = 20, tokenizer: Any = None,
                     tasks_out_dir: str | Path | None = None) -> list[dict]:
    """The 2024 report's Table 6 ablation at tiny scale: students of the pruned shape (02's preset
    with ``ffn_dim = keep_ratio x ffn_dim``) pretrained for the same ``steps`` (equal tokens) from
    a random init or the learned-pruned 02 model, without or with distillation from 02's model
    (or ``teacher``). The pruned init is learned once (``mask_steps``, seed 0) and shared by the
    seeds; its tokens are not counted in the students' budget (as the report's 188B pruning
    tokens are apart from its pretraining). ``variants``: a subset of :data:`TABLE6_VARIANTS`.

    Every student is also scored on the text tasks ``eval_tasks`` (lm-eval, local tasks of
    :mod:`mmafm.eval.tasks`; ``eval_task_size`` items each, the same items for every variant and
    seed: data seed 0), their scores in the row under :func:`mmafm.eval.harness.summary_key`
    names (``cloze_acc``, ``wordnet_acc``, ``arith_exact_match``, ...); lm-eval's results go to
    ``tasks_out_dir/<variant>-seed<seed>/`` (default a temporary folder). ``eval_tasks=""``: none.
    ``tokenizer``: a Tokenizer or path; default the one the checkpoint (or the tokens) names.
    Returns one row per (variant, seed)."""
    import tempfile

    from mmafm.checkpoint import load_model
    from mmafm.data.shards import TokenShards
    from mmafm.eval.harness import stage_task_scores
    from mmafm.registry import create_model
    from mmafm.train import Trainer, seed_everything
    from mmafm.train.prune import attach_ffn_masks, materialize

    unknown = set(variants) - set(TABLE6_VARIANTS)
    if unknown:
        raise ValueError(f"unknown Table 6 variants {sorted(unknown)}; known: {TABLE6_VARIANTS}")
    if eval_tasks.strip():
        from mmafm.eval.tasks import check_task_names

        check_task_names([name.strip() for name in eval_tasks.split(",") if name.strip()])
    dense = load_model(checkpoint, family="text", dtype=torch.float32)
    teacher = dense if teacher is None else teacher
    val_batches = held_out_batches(tokens_dir, seq_len, batch_size, eval_batches)
    keep = max(1, round(keep_ratio * dense.config.ffn_dim))
    # the pruned init: masks learned with the weights (as the 12_prune stage), then materialized
    seed_everything(0)
    masked = attach_ffn_masks(load_model(checkpoint, family="text", dtype=torch.float32), keep,
                              anneal_steps=mask_steps, final_temperature=0.02)
    config = PruneStageConfig(max_steps=mask_steps, seq_len=seq_len, batch_size=batch_size).train_config()
    Trainer(TextPretrainTask(masked, val_batches), TokenShards(tokens_dir, seq_len, batch_size, seed=0), config,
            None, mask_optimizer_factory(PruneStageConfig.mask_lr)).fit()
    pruned_state = materialize(masked).state_dict()
    spec = dense.model_spec
    tok = _table6_tokenizer(checkpoint, tokens_dir, tokenizer, dense.config.vocab_size) if eval_tasks.strip() else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="table6_tasks_") as scratch:
        task_root = Path(tasks_out_dir) if tasks_out_dir else Path(scratch)
        for seed in seeds:
            for variant in variants:
                torch.manual_seed(seed)
                student = create_model(spec.preset, **{**{k: getattr(dense.config, k) for k in spec.overrides},
                                                        "ffn_dim": keep})
                if variant.startswith("pruned"):
                    student.load_state_dict(pruned_state)
                result = train_student(student, tokens_dir, val_batches, steps, seq_len=seq_len, batch_size=batch_size,
                                       lr=lr, seed=seed, teacher=teacher if "distillation" in variant else None)
                scores = stage_task_scores(student.eval(), tok, task_root / f"{_key(variant)}-seed{seed}", eval_tasks,
                                           eval_task_size, seed=0) if tok is not None else {}
                rows.append({"variant": variant, "seed": seed, **result, "val_ppl": math.exp(result["val_loss"]),
                             **scores})
    return rows


TABLE6_METRICS = ("val_ppl", "val_loss", "val_acc")  # held-out perplexity, loss, greedy top-1 accuracy
_TABLE6_ROW_FIELDS = {"variant", "seed", "train_tokens", "seconds", "train_flops", "tasks_seconds"}


def table6_task_metrics(rows: list[dict]) -> list[str]:
    """The text-task score names in ``rows`` (``cloze_acc``, ``wordnet_acc``,
    ``arith_exact_match``, ...), in first-seen order: every numeric field that is neither a
    held-out metric nor bookkeeping."""
    names = [key for row in rows for key, value in row.items()
             if isinstance(value, (int, float)) and key not in _TABLE6_ROW_FIELDS and key not in TABLE6_METRICS]
    return list(dict.fromkeys(names))


def table6_summary(rows: list[dict]) -> list[dict]:
    """Per variant: mean and sample std over seeds of held-out perplexity, loss and accuracy and
    of every text-task score (:func:`table6_task_metrics`): ``<metric>_mean`` / ``<metric>_std``."""
    import statistics

    summary = []
    metrics = (*TABLE6_METRICS, *table6_task_metrics(rows))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        row = {"variant": variant, "seeds": sum(r["variant"] == variant for r in rows)}
        for metric in metrics:
            values = [r[metric] for r in rows if r["variant"] == variant and metric in r]
            if values:
                row[f"{metric}_mean"] = statistics.mean(values)
                row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def table6_figure(summary: list[dict], path: str) -> None:
    """Bars of mean held-out perplexity (and greedy top-1 accuracy) per variant, error bars one
    std over seeds; with text-task scores, a panel of grouped bars, one group per task score in
    [0, 1] (accuracy, exact match; a task's perplexity stays in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("val_ppl", "held-out perplexity (lower is better)", "%.1f")]
    if all("val_acc_mean" in r for r in summary):
        panels.append(("val_acc", "held-out top-1 accuracy (higher is better)", "%.3f"))
    tasks = [key[: -len("_mean")] for key in summary[0] if key.endswith("_mean")
             and key[: -len("_mean")] not in TABLE6_METRICS and "perplexity" not in key
             and all(key in r for r in summary)] if summary else []
    width = len(panels) + bool(tasks)
    fig, axes = plt.subplots(1, width, figsize=(6.5 * width, 3.8), squeeze=False)
    colors = ["grey", "tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:brown"][: len(summary)]
    labels = [r["variant"].replace(" + ", " +\n").replace(" (", "\n(") for r in summary]
    for ax, (metric, label, fmt) in zip(axes[0], panels):
        bars = ax.bar(range(len(summary)), [r[f"{metric}_mean"] for r in summary],
                      yerr=[r[f"{metric}_std"] for r in summary], capsize=4, color=colors)
        ax.bar_label(bars, fmt=fmt, fontsize=8)
        ax.set_xticks(range(len(summary)), labels, fontsize=7)
        ax.set(ylabel=label)
    if tasks:  # one group per task score, one bar per variant
        ax = axes[0][len(panels)]
        step = 0.8 / len(summary)
        for index, (row, color) in enumerate(zip(summary, colors)):
            ax.bar([t + (index - (len(summary) - 1) / 2) * step for t in range(len(tasks))],
                   [row[f"{task}_mean"] for task in tasks], step, yerr=[row[f"{task}_std"] for task in tasks],
                   capsize=2, color=color, label=row["variant"])
        ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
        ax.set(ylabel="score (higher is better)", ylim=(0, 1), title="text tasks (lm-eval, local)")
        ax.legend(fontsize=6)
    fig.suptitle("Table 6 at tiny scale: equal tokens, mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



# ------------------------------------------------------------ the 2025 teacher's cost (-90% claim)
def train_loss_curve(model: nn.Module, tokens_dir: str, val_batches: list, steps: int, *, eval_every: int,
                     seq_len: int, batch_size: int, lr: float, seed: int = 0, warmup_steps: int = 2,
                     schedule: str = "constant") -> list[dict]:
    """Train ``model`` (plain next-token loss, AdamW, warm-up then a constant LR, so a longer run
    is the same run continued; ``schedule="cosine"`` for a from-scratch run, decaying over
    ``steps`` as a pretraining run does) and return its held-out loss curve with the cost of getting there:
    ``[{"step", "tokens", "flops", "seconds", "val_loss"}]``, the first at step 0 (cost 0), then
    every ``eval_every`` steps and at the end. ``flops``: :func:`train_flops_per_token` x tokens;
    ``seconds``: measured training time only (the trainer's per-window throughput; evaluations
    excluded)."""
    from mmafm.data.shards import TokenShards
    from mmafm.train import Trainer, TrainConfig, seed_everything
    from mmafm.train.distill import train_flops_per_token

    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps and eval_every must be >= 1, got {steps} and {eval_every}")
    seed_everything(seed)
    curve = [{"step": 0, "tokens": 0, "flops": 0.0, "seconds": 0.0, "val_loss": _held_out_loss(model, val_batches)}]
    config = TrainConfig(max_steps=steps, lr=lr, schedule=schedule, warmup_steps=min(warmup_steps, steps - 1),
                         seed=seed, log_every=eval_every, eval_every=eval_every)
    records = Trainer(TextPretrainTask(model.train(), val_batches), TokenShards(tokens_dir, seq_len, batch_size,
                                                                                seed=seed), config).fit()
    per_token = train_flops_per_token(model, seq_len)
    seconds, last_step = 0.0, 0
    for record in records:
        if "tokens_or_samples_per_s" in record:  # the window since the last record
            seconds += (record["step"] - last_step) * batch_size * seq_len / record["tokens_or_samples_per_s"]
            last_step = record["step"]
        if "eval/val_loss" in record:
            tokens = record["step"] * batch_size * seq_len
            curve.append({"step": record["step"], "tokens": tokens, "flops": per_token * tokens, "seconds": seconds,
                          "val_loss": record["eval/val_loss"]})
    model.eval()
    return curve


def cost_to_reach(curve: list[dict], target: float) -> dict | None:
    """The cost at which a loss curve first reaches ``target`` (``val_loss <= target``), linearly
    interpolated between the two evaluations around it: ``{"step", "tokens", "flops", "seconds"}``;
    ``None`` when it never does."""
    for index, point in enumerate(curve):
        if point["val_loss"] <= target:
            if index == 0:
                return {key: point[key] for key in ("step", "tokens", "flops", "seconds")}
            before = curve[index - 1]
            share = (before["val_loss"] - target) / (before["val_loss"] - point["val_loss"])
            return {key: before[key] + share * (point[key] - before[key]) for key in ("step", "tokens", "flops", "seconds")}
    return None


def curve_crossings(first: list[dict], second: list[dict], axis: str = "flops") -> list[float]:
    """Where two loss curves (piecewise linear in ``axis``) cross, over the range both cover:
    the ``axis`` values at which their held-out losses are equal (sign changes of the gap)."""
    import numpy as np

    xs_a, ys_a = np.array([p[axis] for p in first], float), np.array([p["val_loss"] for p in first])
    xs_b, ys_b = np.array([p[axis] for p in second], float), np.array([p["val_loss"] for p in second])
    low, high = max(xs_a[0], xs_b[0]), min(xs_a[-1], xs_b[-1])
    grid = np.unique(np.concatenate([xs_a, xs_b]))
    grid = grid[(grid >= low) & (grid <= high)]
    gap = np.interp(grid, xs_a, ys_a) - np.interp(grid, xs_b, ys_b)
    crossings = [float(x) for x, g in zip(grid, gap) if g == 0]
    for i in range(len(grid) - 1):  # the gap is linear between grid points: its zero in between
        if gap[i] * gap[i + 1] < 0:
            crossings.append(float(grid[i] + gap[i] / (gap[i] - gap[i + 1]) * (grid[i + 1] - grid[i])))
    return sorted(crossings)


@dataclass
class TeacherArm:
    """One way to get a teacher, trained and priced by :func:`teacher_cost_curves`."""

    name: str  # label in the table and the figure
    model: nn.Module  # where this arm starts (trained in place)
    tokens_dir: str  # the token folder it trains on
    steps: int  # training steps: the most it may spend to reach the target
    lr: float  # peak LR
    schedule: str = "constant"  # "constant": a longer run is the same run continued; "cosine": a from-scratch pretraining run
    warmup_steps: int = 2
    # what its starting point already cost (FLOPs, seconds): the shared dense base's pretraining
    # for the arms that start from it, 0 for a run from scratch; priced only in the "with start" ratios
    start_flops: float = 0.0
    start_seconds: float = 0.0
    eval_every: int = 0  # held-out evaluations every this many steps; 0: the comparison's ``eval_every``


def teacher_cost_curves(arms: list[TeacherArm], val_batches: list, *, reference: str, eval_every: int, seq_len: int,
                        batch_size: int, seed: int = 0, target: float | None = None) -> dict:
    """Cost-to-target curves: train every arm (:func:`train_loss_curve`, the same held-out batches,
    batch and data seed) and price what each spends to reach a target held-out loss.

    The target defaults to the ``reference`` arm's best held-out loss over its run (for the 2025
    claim: the upcycled MoE's). Each arm's cost to reach it is read off its own curve
    (:func:`cost_to_reach`, linear between evaluations), in FLOPs (``train_flops_per_token x
    tokens``, i.e. ``6 N_active`` plus attention) and measured training seconds. Ratios are the
    reference's cost over the arm's: ``ratio_flops`` counting the training runs only (a shared
    starting point costs both the same), ``ratio_flops_with_start`` adding each arm's
    ``start_flops`` (a dense base pretrained for the purpose is paid by the arms that start from
    it, not by a run from scratch). An arm that never reaches the target within its steps has no
    ratio, only ``ratio_flops_bound``: the reference's cost over the arm's whole run, an upper bound
    on the true ratio (the arm would have had to spend more).

    Returns:
        ``{"target", "reference", "improved", "arms": [{"name", "curve", "cost", "reached",
        "flops_per_token", "params_M", "active_params_M", "start_flops", "start_seconds",
        "ratio_flops", "ratio_seconds", "ratio_flops_with_start", "ratio_seconds_with_start",
        "ratio_flops_bound", "ratio_seconds_bound"}]}``. ``improved`` is false when the reference
        never got below its start; then no cost is read (every arm's ``cost`` is ``None``).
    """
    from mmafm.train.distill import train_flops_per_token

    names = [arm.name for arm in arms]
    if reference not in names or len(set(names)) != len(names):
        raise ValueError(f"reference {reference!r} must name exactly one of the arms {names}")
    rows = []
    for arm in arms:
        curve = train_loss_curve(arm.model, arm.tokens_dir, val_batches, arm.steps, eval_every=arm.eval_every or eval_every,
                                 seq_len=seq_len, batch_size=batch_size, lr=arm.lr, seed=seed,
                                 warmup_steps=arm.warmup_steps, schedule=arm.schedule)
        rows.append({"name": arm.name, "curve": curve, "flops_per_token": train_flops_per_token(arm.model, seq_len),
                     "params_M": round(arm.model.num_params() / 1e6, 3),
                     "active_params_M": round(arm.model.num_active_params() / 1e6, 3),
                     "start_flops": float(arm.start_flops), "start_seconds": float(arm.start_seconds)})
    ref_curve = rows[names.index(reference)]["curve"]
    if target is None:
        target = min(point["val_loss"] for point in ref_curve[1:])
    improved = target < ref_curve[0]["val_loss"]  # else the reference never left its start: nothing to price
    for row in rows:
        row["cost"] = cost_to_reach(row["curve"], target) if improved else None
        row["reached"] = row["cost"] is not None
    ref = rows[names.index(reference)]
    for row in rows:
        for axis in ("flops", "seconds"):
            mine = ref["cost"][axis] if ref["cost"] is not None else None  # the reference's cost to the target
            theirs = row["cost"][axis] if row["cost"] is not None else None
            row[f"ratio_{axis}"] = _ratio(mine, theirs)
            row[f"ratio_{axis}_with_start"] = (_ratio(mine + ref[f"start_{axis}"], theirs + row[f"start_{axis}"])
                                               if mine is not None and theirs is not None else None)
            # not reached: it would have had to spend more than its whole run, so the ratio is below this
            row[f"ratio_{axis}_bound"] = (_ratio(mine, row["curve"][-1][axis])
                                          if mine is not None and theirs is None else None)
    return {"target": target, "reference": reference, "improved": improved, "arms": rows}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, ``None`` when either is missing or the denominator is not positive."""
    return numerator / denominator if numerator is not None and denominator is not None and denominator > 0 else None


def compare_teacher_costs(checkpoint: str, train_tokens_dir: str, val_tokens_dir: str, *, moe_steps: int,
                          dense_max_steps: int, eval_every: int, seq_len: int = 128, batch_size: int = 8,
                          lr: float = 2e-4, num_experts: int = 64, eval_batches: int = 4, seed: int = 0,
                          warmup_steps: int = 2, scratch_tokens_dir: str = "", scratch_steps: int = 0,
                          scratch_lr: float = 2e-3, scratch_ffn_multiplier: int = 4, scratch_warmup_steps: int = 50,
                          base_flops: float = 0.0, base_seconds: float = 0.0) -> tuple[dict, nn.Module]:
    """The 2025 teacher-cost claim (-90%) at small scale: what each way of getting a better
    teacher than the dense model ``checkpoint`` costs to reach the same held-out loss on
    ``val_tokens_dir``'s ``val.bin`` (:func:`teacher_cost_curves`; target: the MoE's best loss).

    The arms: (a) the dense model sparse-upcycled (``num_experts`` experts, top-2, every 2 layers)
    and trained ``moe_steps`` on ``train_tokens_dir`` (the quality slice), the report's recipe;
    (b) the dense model itself trained up to ``dense_max_steps`` more on the same slice, same LR,
    batch and order ("more steps"); (c) with ``scratch_steps``, a larger dense model (the same
    preset with ``scratch_ffn_multiplier x ffn_dim``, as the 2024 device model's larger parent
    differs from it in FFN width) trained from scratch for ``scratch_steps`` on
    ``scratch_tokens_dir`` (the whole pretraining pool: the slice is too small to pretrain on),
    warm-up then cosine at ``scratch_lr``: the conventional dense teacher. (a) and (b) start from
    the dense model, whose pretraining (``base_flops``, ``base_seconds``) enters only the "with
    start" ratios.

    Returns:
        ``(costs, the trained MoE teacher)``: ``costs`` is :func:`teacher_cost_curves`'s result
        plus, for the two-arm view, ``"moe"``, ``"dense"`` (curves), ``"moe_cost"``,
        ``"dense_cost"``, ``"flops_ratio"``, ``"seconds_ratio"`` (MoE / dense more steps, ``None``
        when not reached), ``"crossings_flops"``, ``"num_experts"``, ``"moe_params_M"``,
        ``"dense_params_M"``.
    """
    import dataclasses

    from mmafm.checkpoint import load_model
    from mmafm.models.text import TextModel
    from mmafm.train.distill import upcycled_teacher

    val_batches = held_out_batches(val_tokens_dir, seq_len, batch_size, eval_batches)
    moe = upcycled_teacher(load_model(checkpoint, family="text", dtype=torch.float32), num_experts=num_experts,
                           top_k=2, moe_every=2)
    dense = load_model(checkpoint, family="text", dtype=torch.float32)
    start = dict(start_flops=base_flops, start_seconds=base_seconds)
    arms = [TeacherArm("upcycled MoE", moe, train_tokens_dir, moe_steps, lr, warmup_steps=warmup_steps, **start),
            TeacherArm("dense, more steps", dense, train_tokens_dir, dense_max_steps, lr, warmup_steps=warmup_steps,
                       **start)]
    if scratch_steps:
        torch.manual_seed(seed)
        larger = TextModel(dataclasses.replace(dense.config, ffn_dim=scratch_ffn_multiplier * dense.config.ffn_dim))
        arms.append(TeacherArm(f"larger dense ({scratch_ffn_multiplier}x FFN), from scratch", larger,
                               scratch_tokens_dir or train_tokens_dir, scratch_steps, scratch_lr, schedule="cosine",
                               warmup_steps=scratch_warmup_steps,
                               eval_every=max(eval_every, scratch_steps // 15)))  # ~15 evaluations of a long run
    result = teacher_cost_curves(arms, val_batches, reference="upcycled MoE", eval_every=eval_every, seq_len=seq_len,
                                 batch_size=batch_size, seed=seed)
    moe_row, dense_row = result["arms"][0], result["arms"][1]
    result.update({"moe": moe_row["curve"], "dense": dense_row["curve"], "moe_cost": moe_row["cost"],
                   "dense_cost": dense_row["cost"], "flops_ratio": dense_row["ratio_flops"],
                   "seconds_ratio": dense_row["ratio_seconds"],
                   "crossings_flops": curve_crossings(moe_row["curve"], dense_row["curve"], "flops"),
                   "num_experts": num_experts, "moe_params_M": moe_row["params_M"],
                   "dense_params_M": dense_row["params_M"]})
    return result, moe


def teacher_cost_figure(result: dict, path: str) -> None:
    """Cost-to-target curves: held-out loss against cumulative training FLOPs (log scale: a run
    from scratch spends orders of magnitude more) and against measured seconds, one line per
    teacher (:func:`teacher_cost_curves`' arms), the target loss dashed and each arm's cost to
    reach it dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["tab:purple", "tab:grey", "tab:orange", "tab:green", "tab:blue"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, axis, label in ((axes[0], "flops", "cumulative training FLOPs"),
                            (axes[1], "seconds", "training seconds (measured)")):
        for row, color in zip(result["arms"], colors):
            points = [p for p in row["curve"] if p[axis] > 0]  # the start sits at 0: off a log axis
            ax.plot([p[axis] for p in points], [p["val_loss"] for p in points], "o-", color=color, ms=3,
                    label=f"{row['name']} ({row['active_params_M']}M active)")
            if row["cost"] is not None and row["cost"][axis] > 0:
                ax.axvline(row["cost"][axis], color=color, ls=":", lw=1)
        ax.axhline(result["target"], color="k", ls="--", lw=1, label=f"target {result['target']:.4f}: the MoE's best")
        # zoom on where the arms end up: a run from scratch starts nats above the others
        bests = [min(p["val_loss"] for p in row["curve"]) for row in result["arms"]]
        starts = [row["curve"][0]["val_loss"] for row in result["arms"] if row["start_flops"] > 0] or bests
        low, high = min(bests), max(max(bests), max(starts))
        ax.set_ylim(low - 0.1 * (high - low) - 1e-3, high + 0.3 * (high - low) + 1e-3)
        ax.set(xlabel=label, ylabel="held-out nats / token", xscale="log", title="zoomed on where the arms end")
        ax.legend(fontsize=7)
    verdicts = []
    for row in result["arms"][1:]:
        if row["ratio_flops"] is not None:
            verdicts.append(f"vs {row['name']}: {row['ratio_flops']:.2f}x FLOPs, {row['ratio_seconds']:.2f}x s")
        elif row["ratio_flops_bound"] is not None:
            verdicts.append(f"vs {row['name']}: < {row['ratio_flops_bound']:.3f}x FLOPs (not reached)")
    if not result["improved"]:
        verdicts = ["the MoE never got below its start: no cost to compare"]
    fig.suptitle("MoE teacher's cost to equal held-out loss; " + ";\n".join(verdicts), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


register_stage(STAGE, PruneStageConfig, run)
