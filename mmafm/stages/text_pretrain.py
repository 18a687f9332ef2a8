"""Stage 02: core pretraining of an AFM text model on the data stage's token shards.

The 2024 AFM report (section 3 "Pre-training"; REFERENCE.md "2024 pretraining") pretrains in
three steps: *core* pretraining, *continued* pretraining at sequence length 8192 with a lower peak
LR, and *context lengthening* at 32768 with the RoPE base raised from 500k to 6,315,089. This
stage is the core step at tiny scale: next-token cross-entropy plus the model config's z-loss
(1e-6 in the AFM presets), linear warm-up then cosine decay to ``min_lr_ratio`` of the peak,
global grad-norm clipping, on the shared trainer (:mod:`mmafm.train`, so it checkpoints and resumes).
It reports held-out perplexity against the uniform-vocabulary level, plots loss and perplexity
curves, writes sample generations, and saves the weights with the preset and config that rebuild
them (:func:`mmafm.save_model`; :func:`mmafm.load_model` reads them back).

How the rest of the recipe slots in (a later issue):

- continued pretraining and context lengthening are stages of their own,
  ``04_continued_pretrain`` (:mod:`mmafm.stages.continued_pretrain`: a source mixture with more
  math and code, twice the ``seq_len``) and ``05_long_context`` (:mod:`mmafm.stages.long_context`:
  the RoPE base raised by :func:`mmafm.layers.rope.rope_base_for_context`, long-context tasks);
  both reuse this stage's task on the same trainer;
- the AFM optimizer (RMSProp-style with update momentum and per-block update clipping, mu-param,
  the grad-norm skip guard) is this stage's default (``optimizer="afm"``,
  :mod:`mmafm.train.optim`); ``optimizer="adamw"`` (with ``weight_decay=0.1``) is the baseline;
- distillation (``distill_from``, ``distill_weight``, ...): the 2024 target, 0.9 x the teacher's
  top-1 + 0.1 x the true label, from a teacher-label cache written once into this stage's
  ``<out_dir>/teacher_cache/<teacher fingerprint>`` (the data stage's tokens are only read),
  or forward KL (:mod:`mmafm.train.distill`); pruning trains masks on the same task (``12_prune``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mmafm.checkpoint import load_into, save_model
from mmafm.config import ConfigError, to_dict
from mmafm.eval.perplexity import held_out_perplexity, perplexity
from mmafm.io import atomic_write_json
from mmafm.registry import create_model, get_config, list_models, model_family
from mmafm.stages import register_stage
from mmafm.stages.base import StageDir, TrainStageConfig, require_inputs
from mmafm.train.trainer import setting

__all__ = [
    "TextPretrainConfig",
    "TextPretrainTask",
    "build_text_model",
    "held_out_batches",
    "train_text_model",
    "run",
]

STAGE = "02_text_pretrain"
TEXT_FAMILIES = ("text", "ptmoe")


@dataclass
class TextPretrainConfig(TrainStageConfig):
    """Core text pretraining. Defaults: the tiny CPU pipeline (about a minute on 2 idle cores).

    The trainer's settings (``max_steps``, ``lr``, ``schedule``, ``grad_accum_steps``,
    ``grad_clip``, ``precision``, ``parallel``, ``log_every``, ...) come from
    :class:`~mmafm.train.trainer.TrainSettings`; re-declared below are those with this stage's own
    default or source.
    """

    # --- model
    preset: str = "afm_2024_device_tiny"  # any text preset (mmafm.list_models("afm_*")); vocab_size is set from the tokenizer
    init_checkpoint: str = field(default="", metadata={"path": "checkpoint"})  # start from these weights (a text-pretrain `checkpoint` output) instead of random init; "" = random
    rope_theta: float = field(default=0.0, metadata={"min": 0.0})  # RoPE base override; 0 = the preset's (500k); 6,315,089 for context lengthening [paper]
    # --- data (outputs of the 00_data stage)
    tokens_dir: str = field(default="", metadata={"path": "dir"})  # the data stage's `tokens_dir` (train.bin, val.bin, meta.json)
    tokenizer: str = field(default="", metadata={"path": "file"})  # the data stage's `tokenizer` (tokenizer.model); decodes the samples
    seq_len: int = field(default=128, metadata={"min": 2})  # tokens per training row [paper: 4096 core, 8192 continued, 32768 long-context]
    batch_size: int = field(default=8, metadata={"min": 1})  # rows per step per rank [paper: 4096 x 4096 tokens]
    # --- optimization (shared trainer: the AFM optimizer, warm-up + cosine; docs/training.md, "The AFM
    # pretraining recipe"); "fsdp" = FSDP2, one unit per layer
    # "track" (afm_2025_server* presets, under torchrun): each rank holds some of the PT-MoE tracks,
    # one all-reduce per track block, FSDP2 over the ranks left (mmafm.train.parallel, docs/distributed.md)
    parallel: str = setting("parallel", "none")
    max_steps: int = setting("max_steps", 150)  # optimizer steps
    optimizer: str = setting("optimizer", "afm")  # "afm" = AdaStar + mu-param [code: axlearn adastar, paper]; "adamw" = the AdamW baseline
    lr: float = setting("lr", 1e-2)  # peak LR [paper + code: 1e-2 at full size with mu-param; open: 1e-2 at tiny size, measured (docs/training.md); AdamW: 3e-3]
    warmup_steps: int = setting("warmup_steps", 20)  # linear warm-up [paper + code: 5k of 750k steps; open: 20 at tiny size]
    min_lr_ratio: float = setting("min_lr_ratio", 0.005)  # cosine floor / peak [paper + code: 0.005 core (alpha 1/200), 0.001 continued]
    weight_decay: float = setting("weight_decay", 3.16e-4)  # afm: times the schedule, not the peak LR, every parameter [paper + code: 3.16e-4]; adamw: times the LR (0.1 is the usual value) [open]
    grad_skip: float = setting("grad_skip", 100.0)  # skip a step with global grad norm >= this or non-finite [code: drop_norm=100]; then clip to grad_clip (1.0) [code + paper]
    # --- evaluation, checkpoints, samples
    eval_every: int = setting("eval_every", 50)  # steps between held-out evaluations (and always at the end); 0 = end only
    eval_batches: int = field(default=4, metadata={"min": 1})  # held-out batches per evaluation (the first N of val.bin)
    eval_tasks: str = "mmafm_cloze,mmafm_wordnet,mmafm_arith"  # lm-eval tasks scored after training, into the summary (mmafm.eval.tasks, docs/evaluation.md); "" = none
    eval_task_size: int = field(default=20, metadata={"min": 1})  # test items per task: small, so the tiny stage stays fast (~10 s); 200+ for comparisons
    ckpt_every: int = setting("ckpt_every", 50)  # resumable checkpoint cadence; 0 = end only
    sample_prompts: str = "The|A computer is|In the beginning"  # "|"-separated prompts continued after training
    sample_tokens: int = field(default=32, metadata={"min": 1})  # tokens generated per prompt
    sample_temperature: float = field(default=0.0, metadata={"min": 0.0})  # 0 = greedy; > 0 samples (seeded by `seed`)
    # --- distillation (mmafm.train.distill, docs/distillation.md); "" = none, plain next-token loss
    distill_from: str = field(default="", metadata={"path": "model"})  # teacher: a text checkpoint or stage folder (same tokenizer); "" = no distillation
    distill_weight: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})  # teacher share of the target [paper: 0.9 x teacher top-1 + 0.1 x label]
    distill_loss: str = field(default="top1", metadata={"choices": ("top1", "kl")})  # "top1" = the 2024 target [paper]; "kl" = forward KL on teacher distributions [open]
    distill_temperature: float = field(default=1.0, metadata={"min": 1e-6})  # softmax temperature of the "kl" loss (scaled by its square) [open]
    distill_top_k: int = field(default=0, metadata={"min": 0})  # "kl": 0 = full teacher distributions, teacher run online; k = its cached top-k logits (6 bytes per logit per token)


# ---------------------------------------------------------------------------------- the task
class TextPretrainTask:
    """Next-token prediction on ``(input_ids, targets)`` batches, for the shared trainer.

    Args:
        model: a text decoder (``forward(ids) -> logits``, ``loss(logits, targets)``).
        val_batches: held-out ``(input_ids, targets)`` batches for :meth:`evaluate`.
    """

    def __init__(self, model: nn.Module, val_batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.model = model
        self.val_batches = val_batches

    @property
    def decoder(self) -> nn.Module:
        """The model itself, also when the trainer has wrapped it (DDP)."""
        return getattr(self.model, "module", self.model)

    def compute_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss and metrics: the model's CE + z-loss (override for distillation)."""
        return self.decoder.loss(logits, targets)

    def training_forward(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        input_ids, targets = batch  # (B, T), (B, T)
        logits = self.model(input_ids)  # (B, T, V)
        loss, metrics = self.compute_loss(logits, targets)
        return {"lm": loss}, metrics

    def count_items(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        """Tokens per batch, so the trainer's throughput column is tokens/s."""
        return batch[0].numel()

    def evaluate(self) -> dict[str, float]:
        """Held-out token-level cross-entropy (no z-loss) and its perplexity
        (:func:`mmafm.eval.perplexity.held_out_perplexity`)."""
        device = next(self.decoder.parameters()).device
        return held_out_perplexity(self.model, self.val_batches, device)


# --------------------------------------------------------------------------------- building
def _check_preset(name: str) -> None:
    if name not in list_models():
        raise ConfigError(f"{STAGE}: preset {name!r} is not a registered model; text presets: "
                          f"{', '.join(n for n in list_models() if model_family(n) in TEXT_FAMILIES)}")
    if model_family(name) not in TEXT_FAMILIES:
        raise ConfigError(f"{STAGE}: preset {name!r} is a {model_family(name)} model, expected a text preset")


def _check_parallel(cfg: TextPretrainConfig) -> None:
    if cfg.parallel == "track" and model_family(cfg.preset) != "ptmoe":
        raise ConfigError(
            f"{STAGE}: parallel='track' splits the tracks of a PT-MoE model; preset {cfg.preset!r} has "
            f"none (use afm_2025_server or afm_2025_server_tiny, or parallel='fsdp')"
        )


def build_text_model(cfg: TextPretrainConfig, vocab_size: int) -> tuple[nn.Module, dict[str, Any]]:
    """The model the config describes and the overrides applied to its preset.

    The preset's vocabulary becomes the tokenizer's, its context grows to ``seq_len`` when
    shorter, and ``rope_theta`` replaces the base when set; ``init_checkpoint`` weights are loaded
    (a checkpoint of another shape is a :class:`~mmafm.checkpoint.CheckpointError`).
    """
    _check_preset(cfg.preset)
    preset_config = get_config(cfg.preset)
    overrides: dict[str, Any] = {"vocab_size": vocab_size}
    if cfg.seq_len > preset_config.max_seq_len:
        overrides["max_seq_len"] = cfg.seq_len
    if cfg.rope_theta:
        overrides["rope_theta"] = cfg.rope_theta
    model = create_model(cfg.preset, **overrides)
    if cfg.init_checkpoint:
        load_into(model, cfg.init_checkpoint)
    return model, overrides


def held_out_batches(tokens_dir: str | Path, seq_len: int, batch_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches of ``val.bin`` (fewer rows per batch if the split is small)."""
    from mmafm.data.shards import TokenShards, read_token_meta

    val_tokens = int(read_token_meta(tokens_dir)["count"]["val"])
    windows = max(0, (val_tokens - 1) // seq_len)
    if windows == 0:
        raise ValueError(
            f"{tokens_dir}: val.bin holds {val_tokens} tokens, not one window of seq_len={seq_len} (+1); "
            "lower seq_len or raise the data stage's val_fraction"
        )
    shards = TokenShards(tokens_dir, seq_len, min(batch_size, windows), seed=0, split="val", shard_by_rank=False)
    batches = []
    for batch in shards:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def train_text_model(
    cfg: TextPretrainConfig,
    model: nn.Module,
    stage_dir: StageDir,
    optimizer_factory: Callable | None = None,
    scheduler_factory: Callable | None = None,
    task_cls: type[TextPretrainTask] = TextPretrainTask,
    train_data: Any = None,
):
    """Train ``model`` on ``cfg.tokens_dir`` with the shared trainer; returns ``(trainer, records)``.

    ``train_data`` replaces the token shards (e.g. :class:`mmafm.train.distill.TeacherLabelShards`,
    the same batches with cached teacher labels)."""
    from mmafm.data.shards import TokenShards
    from mmafm.train import Trainer

    if train_data is None and cfg.parallel == "track":  # the ranks of a track group share a batch: split by dp rank only
        from mmafm.train.parallel import TrackDataShare

        shards = TokenShards(cfg.tokens_dir, cfg.seq_len, cfg.batch_size, seed=cfg.seed, split="train",
                             shard_by_rank=False)
        train_data = TrackDataShare(shards, model.config.num_tracks)
    elif train_data is None:
        train_data = TokenShards(cfg.tokens_dir, cfg.seq_len, cfg.batch_size, seed=cfg.seed, split="train")
    task = task_cls(model, held_out_batches(cfg.tokens_dir, cfg.seq_len, cfg.batch_size, cfg.eval_batches))
    train_config = cfg.train_config()
    trainer = Trainer(task, train_data, train_config, stage_dir, optimizer_factory, scheduler_factory)
    return trainer, trainer.fit()


# --------------------------------------------------------------------------- samples, figures
def _check_eval_tasks(text: str) -> None:
    """Unknown names in ``eval_tasks`` stop the run before training, listing the known ones."""
    from mmafm.eval.tasks import check_task_names

    names = [name.strip() for name in text.split(",") if name.strip()]
    if names:
        try:
            check_task_names(names)
        except ValueError as err:
            raise ConfigError(f"{STAGE}: eval_tasks: {err}") from err


def _prompts(text: str) -> list[str]:
    prompts = [p for p in text.split("|") if p.strip()]
    if not prompts:
        raise ConfigError(f"{STAGE}: sample_prompts {text!r} holds no prompt; expected e.g. 'The|Once upon a time'")
    return prompts


@torch.no_grad()
def _samples(model: nn.Module, tokenizer: Any, cfg: TextPretrainConfig) -> list[dict]:
    from mmafm.inference import generate_text

    prompts = _prompts(cfg.sample_prompts)
    room = model.config.max_seq_len - max(len(tokenizer.encode(prompt)) for prompt in prompts)
    return generate_text(model, tokenizer, prompts, max(0, min(cfg.sample_tokens, room)),
                         temperature=cfg.sample_temperature, seed=cfg.seed if cfg.sample_temperature > 0 else None)


def _figures(stage_dir: StageDir, records: list[dict], uniform_ppl: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "ce" in r]
    evals = [r for r in records if "eval/val_loss" in r]
    steps, ce = [r["step"] for r in train], [r["ce"] for r in train]
    eval_steps = [r["step"] for r in evals]

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, ce, label="train cross-entropy")
    ax.plot(eval_steps, [r["eval/val_loss"] for r in evals], "o-", label="held-out cross-entropy")
    ax.axhline(math.log(uniform_ppl), ls="--", c="grey", label=f"uniform over {int(uniform_ppl)} tokens")
    ax.set(xlabel="step", ylabel="nats / token", title="text pretraining loss")
    ax.legend()
    stage_dir.save_figure(fig, "loss")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, [perplexity(v) for v in ce], label="train")
    ax.plot(eval_steps, [r["eval/val_ppl"] for r in evals], "o-", label="held-out")
    ax.axhline(uniform_ppl, ls="--", c="grey", label="uniform (vocab size)")
    ax.set(xlabel="step", ylabel="perplexity", yscale="log", title="perplexity")
    ax.legend()
    stage_dir.save_figure(fig, "perplexity")
    plt.close(fig)


# ---------------------------------------------------------------------------------------- run
def run(cfg: TextPretrainConfig) -> dict[str, str]:
    """Train, evaluate, sample, plot and save the text model; returns the stage outputs."""
    from mmafm.data.shards import read_token_meta
    from mmafm.tokenizer import Tokenizer
    from mmafm.train import seed_everything
    from mmafm.train.distill import distill_training_kwargs

    require_inputs(cfg, STAGE, {name: f"the 00_data stage's `{name}` output" for name in ("tokens_dir", "tokenizer")})
    _check_preset(cfg.preset)
    _check_parallel(cfg)
    if cfg.distill_from and cfg.parallel == "track":
        raise ConfigError(f"{STAGE}: distill_from is not supported with parallel='track'")
    _prompts(cfg.sample_prompts)
    _check_eval_tasks(cfg.eval_tasks)
    start = time.time()
    stage_dir = StageDir(cfg.out_dir, STAGE)
    seed_everything(cfg.seed)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    meta = read_token_meta(cfg.tokens_dir)
    if int(meta["vocab_size"]) != tokenizer.vocab_size:
        raise ConfigError(
            f"{STAGE}: tokens in {cfg.tokens_dir} were made with a {meta['vocab_size']}-token vocabulary, "
            f"tokenizer {cfg.tokenizer} has {tokenizer.vocab_size}; pass the matching pair"
        )
    model, overrides = build_text_model(cfg, tokenizer.vocab_size)
    trainer, records = train_text_model(cfg, model, stage_dir,
                                       **distill_training_kwargs(cfg, cache_root=stage_dir.root / "teacher_cache"))
    weights = trainer.full_state_dict()  # a collective under FSDP: every rank takes part
    if trainer.rank != 0:
        return {}

    # a plain (unwrapped, unsharded) copy for sampling and saving, whatever `parallel` was
    model = create_model(cfg.preset, **overrides)
    model.load_state_dict(weights)
    final = [r for r in records if "eval/val_ppl" in r][-1]
    samples = _samples(model, tokenizer, cfg)
    samples_path = stage_dir.root / "samples.json"
    atomic_write_json(samples_path, samples)
    uniform_ppl = float(tokenizer.vocab_size)
    _figures(stage_dir, records, uniform_ppl)
    from mmafm.eval.harness import stage_task_scores

    task_scores = stage_task_scores(model, tokenizer, stage_dir.root / "lm_eval", cfg.eval_tasks, cfg.eval_task_size,
                                    seed=cfg.seed)
    summary = {
        "val_loss": round(final["eval/val_loss"], 4),
        "val_ppl": round(final["eval/val_ppl"], 3),
        "uniform_ppl": uniform_ppl,
        "steps": trainer.step,
        # the ranks of a track group share one batch
        "train_tokens": trainer.step * cfg.batch_size * cfg.seq_len * cfg.grad_accum_steps * trainer.world_size
        // getattr(trainer.model, "track_degree", 1),
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        # the grad-norm guard's counts (grad_skip > 0): steps skipped, steps clipped
        **({"skipped_steps": trainer.skipped_steps, "clipped_steps": trainer.clipped_steps} if cfg.grad_skip > 0 else {}),
        "seconds": round(time.time() - start, 1),
    }
    summary.update(task_scores)  # cloze_acc, wordnet_acc, arith_exact_match, ... (mmafm.eval.harness.summary_key)
    checkpoint = save_model(
        stage_dir.checkpoint_dir / "text_model",
        model,
        {
            "stage": STAGE,
            "tokenizer": cfg.tokenizer,
            "step": trainer.step,
            "summary": summary,
            "stage_config": to_dict(cfg),
        },
    )
    outputs = {
        "checkpoint": str(checkpoint),
        "preset": cfg.preset,
        "tokenizer": cfg.tokenizer,
        "samples": str(samples_path),
        "metrics": str(stage_dir.metrics_path),
    }
    stage_dir.write_manifest(outputs, cfg, summary)
    return outputs


register_stage(STAGE, TextPretrainConfig, run)
