"""The one training loop every mmafm stage uses.

A stage brings a *task* (the contract is :class:`mmafm.train.task.TrainingTask`), its data and a
:class:`TrainConfig`:

- ``task.model``: the ``nn.Module`` being trained (and checkpointed). The trainer moves it to the
  device and may replace ``task.model`` by a ``DistributedDataParallel`` wrapper, so the task
  must always call ``self.model(...)``.
- ``task.training_forward(batch) -> (losses, metrics)``: ``losses`` a dict of scalar tensors,
  summed for the backward pass; ``metrics`` a dict of floats (or scalar tensors) to log.
- optionally ``task.evaluate() -> dict[str, float]`` (:class:`~mmafm.train.task.EvaluatingTask`:
  called on every rank, under ``no_grad``, every ``eval_every`` steps and at the end), and
  ``task.count_items(batch) -> int`` (:class:`~mmafm.train.task.CountingTask`: tokens or samples,
  for the throughput column; default: the leading dimension of the first tensor).

Recipe (2024 AFM report, section 3 "Pre-training", see REFERENCE.md): decoupled weight decay,
linear warm-up then cosine decay to ``min_lr_ratio`` of the peak, global grad-norm clipping at
1.0 before the update; with ``grad_skip`` > 0 a step whose grad norm reaches it (or is not
finite) is skipped and counted (``skipped_steps`` / ``clipped_steps`` in the metrics), as the
AFM config's ``skip_and_clip_by_global_norm(drop_norm=100, max_norm=1)`` [code: axlearn].
``optimizer`` picks AdamW or the AFM optimizer (:mod:`mmafm.train.optim`). Everything else
(gradient accumulation, bf16 autocast, checkpoints with exact resume, DDP/FSDP2 under torchrun)
is standard practice as in nanoGPT and torchtitan.

Checkpoints live in ``stage_dir.checkpoint_dir`` (layout: :mod:`mmafm.train.checkpointing`):
``step_<8-digit step>`` files holding everything needed to continue, ``latest.json`` naming the
newest one, and the final weights as ``final.safetensors``. A trainer started on a stage dir
holding a checkpoint resumes from it exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from mmafm.checkpoint import CheckpointError
from mmafm.config import ConfigError, coerce_fields, to_dict
from mmafm.train.checkpointing import (
    FINAL,
    gather_train_state,
    load_train_state,
    rank_rng_state,
    read_latest_checkpoint,
    rng_state,
    set_rng_state,
    truncate_metrics,
    write_final_weights,
    write_train_checkpoint,
)
from mmafm.train.distributed import (
    PARALLEL_MODES,
    barrier,
    clip_grad_norm,
    full_model_state_dict,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    launched_with_torchrun,
    parallelize,
)
from mmafm.train.optim import build_optimizer
from mmafm.train.schedule import build_scheduler
from mmafm.train.task import TrainingTask

__all__ = ["TrainSettings", "TrainConfig", "setting", "Trainer", "seed_everything", "move_to", "count_items"]

# names the trainer writes into every metrics record itself
RESERVED_NAMES = ("step", "lr", "grad_norm", "tokens_or_samples_per_s", "skipped_steps", "clipped_steps")


@dataclass
class TrainSettings:
    """The trainer settings every training stage exposes as its own flat parameters.

    One name per concept: a training stage's config inherits these fields
    (:class:`mmafm.stages.base.TrainStageConfig`), so ``max_steps`` means the same thing in every
    stage, notebook, ``-p`` override, the torchrun launcher and :class:`TrainConfig`. A stage that
    wants another default (or fewer choices) re-declares the field with :func:`setting`, with its
    comment and sources next to it.
    """

    # optimizer steps in total (a step = grad_accum_steps micro-batches on every rank)
    max_steps: int = field(default=100, metadata={"min": 1})
    # "adamw": torch.optim.AdamW; "afm": the AFM optimizer (mmafm.train.optim.AdaStar: RMS-clipped
    # RMSProp-style update with update momentum, mu-param) [code: axlearn adastar, 2024 AFM]
    optimizer: str = field(default="adamw", metadata={"choices": ("adamw", "afm")})
    # peak learning rate [open per stage; 2024 AFM pre-training used 1e-2 with mu-param]
    lr: float = field(default=3e-4, metadata={"min": 0.0})
    # decoupled weight decay. adamw: p -= lr * wd * p, not on norms, biases, embeddings,
    # no_weight_decay(); afm: p -= (lr / peak lr) * wd * p (NOT multiplied by the peak LR), on every
    # parameter [open: 0.1 is the usual AdamW value; AFM 3.16e-4, code + paper]
    weight_decay: float = field(default=0.1, metadata={"min": 0.0})
    # "cosine": warm-up then cosine to min_lr_ratio [paper, pre-training]; "constant": warm-up
    # then flat [paper, SFT]
    schedule: str = field(default="cosine", metadata={"choices": ("cosine", "constant")})
    # linear warm-up steps (0 = none) [paper: 5k of the 2024 pre-training]
    warmup_steps: int = field(default=0, metadata={"min": 0})
    # final LR as a fraction of the peak, in [0, 1] [paper: 0.005 for the 2024 pre-training]
    min_lr_ratio: float = field(default=0.005, metadata={"min": 0.0, "max": 1.0})
    # micro-batches whose gradients are summed (averaged) into one optimizer step (>= 1)
    grad_accum_steps: int = field(default=1, metadata={"min": 1})
    # global grad-norm clip before the update, 0 disables [paper: 1.0]
    grad_clip: float = field(default=1.0, metadata={"min": 0.0})
    # optimizer="afm": decay of the EMA of the normalised, clipped updates (0 = off: the raw
    # RMS-clipped update is applied) [code: axlearn adastar update_ema_decay 0.95 in the AFM config]
    afm_update_ema: float = field(default=0.95, metadata={"min": 0.0, "max": 0.999})
    # skip a step whose global grad norm is >= this or non-finite (parameters and optimizer state
    # unchanged, counted in metrics.jsonl); 0 disables [code: axlearn skip_and_clip_by_global_norm,
    # drop_norm=100 in the AFM config]
    grad_skip: float = field(default=0.0, metadata={"min": 0.0})
    # "fp32", or "bf16" = torch.autocast(bfloat16) around the forward (weights stay fp32)
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "bf16")})
    # "none" (one process), "ddp", "fsdp" (FSDP2 fully_shard) or "track" (PT-MoE tracks split over
    # ranks, FSDP2 over the rest: mmafm.train.parallel); all but "none" need torchrun
    parallel: str = field(default="none", metadata={"choices": PARALLEL_MODES})
    # write a metrics record every this many steps (and at the last step)
    log_every: int = field(default=10, metadata={"min": 1})
    # call task.evaluate() every this many steps; 0 = only at the end
    eval_every: int = field(default=0, metadata={"min": 0})
    # save a resumable checkpoint every this many steps; 0 = only at the end
    ckpt_every: int = field(default=0, metadata={"min": 0})


def setting(name: str, default: Any, choices: tuple | None = None) -> Any:
    """A :class:`TrainSettings` field with a stage's own default (and optionally fewer choices).

    The bounds (``min``/``max``) stay those of :class:`TrainSettings`, so a stage cannot loosen
    them; ``choices`` may only narrow the allowed values.
    """
    base = TrainSettings.__dataclass_fields__[name]
    metadata = dict(base.metadata)
    if choices is not None:
        if not set(choices) <= set(metadata.get("choices", choices)):
            raise ValueError(f"setting {name!r}: choices {choices} are not a subset of {metadata['choices']}")
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig(TrainSettings):
    """How to train: the stage-facing :class:`TrainSettings` plus what stages fix themselves."""

    # AdamW betas, each in [0, 1) [open: (0.9, 0.95) as in nanoGPT/LLaMA]
    betas: tuple[float, float] = (0.9, 0.95)
    # AdamW epsilon (> 0)
    eps: float = field(default=1e-8, metadata={"min": 0.0})
    # optimizer="afm": mu-param base width, update scale min(mup_base_width / d_model, 1) on the
    # attention and FFN matrices [code: axlearn honeycrisp.py, 768]
    mup_base_width: int = field(default=768, metadata={"min": 1})
    # how many step checkpoints to keep (older ones are deleted; final weights always kept)
    keep_checkpoints: int = field(default=2, metadata={"min": 1})
    # seeds Python, NumPy and torch (rank r uses seed + r) and the per-epoch data order
    seed: int = field(default=0, metadata={"min": 0})
    # torch.use_deterministic_algorithms(warn_only) during fit() on CPU
    deterministic: bool = True
    # "auto" = cuda:LOCAL_RANK when a GPU is visible, else cpu
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in coerce_fields(type(self), values, source="TrainConfig").items():
            object.__setattr__(self, name, value)
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(f"TrainConfig: key 'betas': expected two values in [0, 1), got {self.betas!r}")
        if self.eps <= 0.0:
            raise ConfigError(f"TrainConfig: key 'eps': expected > 0, got {self.eps!r}")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (inside dicts, lists, tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def count_items(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor (1 if it has none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        if isinstance(value, (torch.Tensor, Mapping, list, tuple)):
            return count_items(value)
    return 1


class _DataCursor:
    """Walks a re-iterable data source epoch after epoch and knows its position.

    Each epoch's iterator is created (and its first batch drawn) under RNG seeded by
    ``(seed, epoch)`` so that shuffling sources such as ``DataLoader(shuffle=True)`` give the same
    order on a resumed run; ``data.set_epoch(epoch)`` is called when the source has it.
    """

    def __init__(self, data: Iterable, seed: int):
        self.data = data
        self.seed = seed
        self.epoch = 0
        self.index = 0  # batches taken from the current epoch
        self._iterator: Iterator | None = None
        self._pending: list = []

    def _start_epoch(self) -> None:
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(self.epoch)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            epoch_seed = self.seed * 1_000_003 + self.epoch
            seed_everything(epoch_seed)
            self._iterator = iter(self.data)
            self._pending = [next(self._iterator, _END)]
        random.setstate(py_state)
        np.random.set_state(np_state)

    def next(self) -> Any:
        if self._iterator is None:
            self._start_epoch()
        batch = self._pending.pop() if self._pending else next(self._iterator, _END)
        if batch is _END:
            if self.index == 0:
                raise ValueError(f"train_data yielded no batches in epoch {self.epoch}")
            self.epoch += 1
            self.index = 0
            self._start_epoch()
            batch = self._pending.pop()
            if batch is _END:
                raise ValueError(f"train_data yielded no batches in epoch {self.epoch}")
        self.index += 1
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: Mapping[str, int], source_state: Any) -> bool:
        """Go to ``state`` without iterating the source, when the source restores its own
        position (``load_state_dict(source_state)``, saved from its ``state_dict()``); False
        (nothing done) for a source without them or a checkpoint without its state."""
        loader = getattr(self.data, "load_state_dict", None)
        if source_state is None or not callable(loader):
            return False
        loader(source_state)
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._iterator, self._pending = None, []  # the next batch comes from the restored source
        return True

    def source_state(self) -> Any:
        """The source's own position (``state_dict()``), or None: without one, or when it is not
        JSON-able (a warning; the resumed run then iterates the source again, as for any source)."""
        saver = getattr(self.data, "state_dict", None)
        if not callable(saver):
            return None
        state = saver()
        try:
            json.dumps(state)
        except (TypeError, ValueError) as error:
            warnings.warn(f"train_data.state_dict() is not JSON-able ({error}); a resumed run iterates the "
                          "source again to its position", stacklevel=3)
            return None
        return state

    def fast_forward(self, state: Mapping[str, int]) -> None:
        """Skip to ``state`` (epoch, batches into it) by iterating the source again."""
        self.epoch, target = int(state["epoch"]), int(state["index"])
        self.index = 0
        self._start_epoch()
        for _ in range(target):
            batch = self._pending.pop() if self._pending else next(self._iterator, _END)
            if batch is _END:
                raise CheckpointError(
                    f"cannot resume: train_data has fewer than {target} batches in epoch "
                    f"{self.epoch} (did the data change since the checkpoint?)"
                )
            self.index += 1


_END = object()


class Trainer:
    """Trains ``task.model`` on ``train_data`` as ``config`` says; see the module docstring.

    Args:
        task: a :class:`~mmafm.train.task.TrainingTask` (``model`` and
            ``training_forward(batch)``); optionally ``evaluate()`` and ``count_items(batch)``.
        train_data: an iterable of batches (this rank's share under torchrun), iterated again
            for every epoch. For exact resume it must give the same batches for a given epoch
            each time: fixed lists, or shuffling drawn from torch/NumPy/Python's global RNG at
            ``iter()`` or first batch (``DataLoader(shuffle=True)``), which the trainer seeds
            per epoch; ``set_epoch(epoch)`` is called when the source has it. A source with
            ``state_dict()`` (JSON-able) and ``load_state_dict(state)`` keeps its own position:
            checkpoints hold it and a resumed run restores it instead of iterating the source
            again (:class:`~mmafm.posttrain.rl.RolloutSource`, whose batches are sampled from
            the policy being trained).
        config: the training settings.
        stage_dir: where metrics, checkpoints and the final weights go (a ``StageDir``); ``None``
            keeps everything in memory (no checkpoints, no resume).
        optimizer_factory: ``(model, config) -> Optimizer``; default AdamW (:mod:`.optim`).
        scheduler_factory: ``(optimizer, config) -> LRScheduler``; default warm-up + cosine or
            constant (:mod:`.schedule`).
    """

    def __init__(
        self,
        task: TrainingTask,
        train_data: Iterable,
        config: TrainConfig,
        stage_dir: Any = None,
        optimizer_factory: Callable[[nn.Module, Any], torch.optim.Optimizer] | None = None,
        scheduler_factory: Callable[[torch.optim.Optimizer, Any], Any] | None = None,
    ):
        if not isinstance(getattr(task, "model", None), nn.Module):
            raise TypeError(f"task {type(task).__name__} needs a `model` attribute holding an nn.Module")
        if not callable(getattr(task, "training_forward", None)):
            raise TypeError(f"task {type(task).__name__} needs a `training_forward(batch)` method")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        self.task = task
        self.train_data = train_data
        self.config = config
        self.stage_dir = stage_dir
        self.records: list[dict] = []
        self.step = 0
        # the grad-norm guard's counters (grad_skip > 0): steps skipped, steps clipped, so far
        self.skipped_steps = 0
        self.clipped_steps = 0

        if config.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("TrainConfig: key 'device': 'cuda' requested but no GPU is visible")
        if config.device == "cpu":
            self.device = torch.device("cpu")
        elif config.device == "cuda" or torch.cuda.is_available():
            self.device = torch.device("cuda", get_local_rank())
        else:
            self.device = torch.device("cpu")
        parallel = config.parallel
        if parallel == "none" and launched_with_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ConfigError(
                "TrainConfig: key 'parallel': launched by torchrun with several processes, "
                "expected 'ddp', 'fsdp' or 'track', got 'none'"
            )
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if parallel != "none" and not init_distributed(backend):
            warnings.warn(f"parallel={parallel!r} without torchrun: training in one process", stacklevel=2)
            parallel = "none"
        self.parallel = parallel
        self.rank, self.world_size = get_rank(), get_world_size()

        model = task.model.to(self.device)
        self._model = model
        task.model = parallelize(model, parallel, self.device)
        self.optimizer = (optimizer_factory or build_optimizer)(self._model, config)
        self.scheduler = (scheduler_factory or build_scheduler)(self.optimizer, config)
        self._cursor = _DataCursor(train_data, config.seed)

    # ------------------------------------------------------------------ public helpers

    @property
    def model(self) -> nn.Module:
        """The unwrapped model (for FSDP2 its parameters are shards: use :meth:`full_state_dict`)."""
        return self._model

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full (unsharded) weights on CPU; a collective under FSDP2 and track
        parallelism (call on all ranks)."""
        return full_model_state_dict(self._model)

    @property
    def checkpoint_dir(self) -> Path | None:
        return Path(self.stage_dir.checkpoint_dir) if self.stage_dir is not None else None

    @property
    def final_path(self) -> Path | None:
        """Where the final weights go: ``checkpoints/final.safetensors``."""
        return self.checkpoint_dir / f"{FINAL}.safetensors" if self.stage_dir is not None else None

    def log(self, record: dict) -> None:
        """Keep ``record`` and append it to ``metrics.jsonl`` (rank 0)."""
        self.records.append(record)
        if self.stage_dir is not None and self.rank == 0:
            self.stage_dir.log(record)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> list[dict]:
        """Train to ``max_steps`` (resuming from the stage dir's latest checkpoint if any).

        Returns:
            Every metrics/eval record of the run, earlier ones of a resumed run included.
        """
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        if self.config.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return self._fit()
        finally:
            torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)

    def _fit(self) -> list[dict]:
        cfg = self.config
        if not self._resume():
            seed_everything(cfg.seed + self.rank)
            self._truncate_metrics(0)
        self.task.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        desc = getattr(self.stage_dir, "stage", None) or "train"
        progress = tqdm(
            total=cfg.max_steps, initial=self.step, desc=desc, mininterval=5, disable=self.rank != 0,
            file=sys.stderr, dynamic_ncols=True,
        )
        window_items, window_seconds = 0, 0.0  # throughput counts training steps only
        while self.step < cfg.max_steps:
            lr = self.optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            values, items, grad_norm = self._train_step()
            if self.device.type == "cuda":  # kernels run asynchronously: time the work, not its launch
                torch.cuda.synchronize(self.device)
            window_seconds += time.perf_counter() - started
            self.step += 1
            window_items += items
            progress.update(1)
            last = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or last:
                record = self._metrics_record(values, grad_norm, lr, window_items, window_seconds)
                self.log(record)
                progress.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{lr:.3g}", refresh=False)
                window_items, window_seconds = 0, 0.0
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                self._evaluate()
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                self.save_checkpoint()
        progress.close()
        self._save_final()
        return self.records

    def _grad_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
        wrapped = self.task.model
        if self.parallel == "ddp" and not sync:
            return wrapped.no_sync()
        if hasattr(self._model, "set_requires_gradient_sync"):  # FSDP2 ("fsdp", or "track" over dp)
            self._model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def _train_step(self) -> tuple[dict[str, torch.Tensor], int, torch.Tensor]:
        """One optimizer step over ``grad_accum_steps`` micro-batches.

        Returns:
            (per-step means of the losses and metrics, samples/tokens seen, grad norm before
            clipping).
        """
        accum = self.config.grad_accum_steps
        sums: dict[str, torch.Tensor] = {}
        items = 0

        def add(name: str, value: Any) -> None:
            if name in RESERVED_NAMES:
                raise ValueError(
                    f"{type(self.task).__name__}.training_forward returned a loss or metric named "
                    f"{name!r}; the trainer logs that name itself, rename it"
                )
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            sums[name] = sums.get(name, 0.0) + value.to(self.device) / accum

        for micro in range(accum):
            batch = self._cursor.next()
            counter = getattr(self.task, "count_items", None)
            items += int(counter(batch)) if callable(counter) else count_items(batch)
            batch = move_to(batch, self.device)
            with self._grad_sync(micro == accum - 1):
                with self._autocast():
                    losses, metrics = self.task.training_forward(batch)
                if not losses:
                    raise ValueError(f"{type(self.task).__name__}.training_forward returned no losses")
                total = sum(loss.float() for loss in losses.values())
                (total / accum).backward()
            add("loss", total)
            for name, loss in losses.items():
                if name != "loss":
                    add(name, loss)
            for name, value in (metrics or {}).items():
                add(name, value)

        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self._model, max_norm)
        if self._guarded_step(float(grad_norm) if self.config.grad_skip > 0 else 0.0, max_norm):
            self.optimizer.step()
        with warnings.catch_warnings():  # a skipped first step: "scheduler.step() before optimizer.step()"
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums, items, grad_norm

    def _guarded_step(self, grad_norm: float, max_norm: float) -> bool:
        """The grad-norm guard (``grad_skip`` > 0): whether to apply this step, and its counters.

        A step whose global grad norm (the same number on every rank) is >= ``grad_skip`` or not
        finite is skipped: no ``optimizer.step()``, so parameters and optimizer state (its step
        count and bias correction included) stay as they were. The LR scheduler still advances:
        the schedule follows the trainer's step, so the cosine still ends at ``max_steps`` (axlearn,
        whose schedule count lives in the skipped optimizer state, would not advance it).
        """
        if self.config.grad_skip <= 0:
            return True
        if not math.isfinite(grad_norm) or grad_norm >= self.config.grad_skip:
            self.skipped_steps += 1
            return False
        if grad_norm > max_norm:
            self.clipped_steps += 1
        return True

    def _metrics_record(
        self, values: dict[str, torch.Tensor], grad_norm: torch.Tensor, lr: float, items: int, seconds: float
    ) -> dict:
        names = list(values)
        stacked = torch.stack([values[n] for n in names] + [torch.tensor(float(items), device=self.device)])
        if self.world_size > 1:
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
            stacked[:-1] /= self.world_size
        numbers = stacked.tolist()
        record: dict[str, Any] = {"step": self.step}
        record.update({name: numbers[i] for i, name in enumerate(names)})
        if not np.isfinite(record["loss"]) and self.config.grad_skip <= 0:  # the guard skips such steps
            raise FloatingPointError(
                f"loss is {record['loss']} at step {self.step}; lower lr or use precision='fp32'"
            )
        record["lr"] = lr
        record["grad_norm"] = float(grad_norm)
        replicas = getattr(self._model, "track_degree", 1)  # the ranks of a track group share one batch
        record["tokens_or_samples_per_s"] = numbers[-1] / replicas / max(seconds, 1e-9)
        if self.config.grad_skip > 0:
            record["skipped_steps"] = self.skipped_steps
            record["clipped_steps"] = self.clipped_steps
        return record

    def _evaluate(self) -> None:
        evaluate = getattr(self.task, "evaluate", None)
        if not callable(evaluate):
            return
        self.task.model.eval()
        with torch.no_grad(), self._autocast():
            results = evaluate() or {}
        self.task.model.train()
        record: dict[str, Any] = {"step": self.step}
        for name, value in results.items():
            key = name if name.startswith("eval/") else f"eval/{name}"
            record[key] = float(value)
        self.log(record)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """Save everything needed to resume at ``self.step`` (collective; rank 0 writes).

        Returns:
            The ``.safetensors`` path on rank 0, else ``None`` (also without a stage dir).
        """
        if self.stage_dir is None:
            return None
        model_state, optim_state = gather_train_state(self._model, self.optimizer)
        rng_states = [rng_state()]
        if self.world_size > 1:
            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        path = None
        if self.rank == 0:
            scheduler_state = dict(self.scheduler.state_dict())
            if "lr_lambdas" in scheduler_state:  # the schedule comes from the config, not the file
                scheduler_state["lr_lambdas"] = [None] * len(scheduler_state["lr_lambdas"])
            metadata = {
                "data": self._cursor.state(),
                "data_source": self._cursor.source_state(),
                "world_size": self.world_size,
                "parallel": self.parallel,
                "scheduler": scheduler_state,
                "guard": {"skipped_steps": self.skipped_steps, "clipped_steps": self.clipped_steps},
                "train_config": to_dict(self.config),
            }
            path = write_train_checkpoint(
                self.checkpoint_dir, self.step, model_state, optim_state, rng_states, metadata,
                keep=self.config.keep_checkpoints,
            )
        barrier()
        return path

    def _save_final(self) -> None:
        if self.stage_dir is None:
            return
        weights = self.full_state_dict()
        if self.rank == 0:
            write_final_weights(self.checkpoint_dir, weights, self.step, to_dict(self.config))
        barrier()

    def _resume(self) -> bool:
        """Load the latest checkpoint of the stage dir if there is one; True if resumed."""
        if self.stage_dir is None:
            return False
        found = read_latest_checkpoint(self.checkpoint_dir)
        if found is None:
            return False
        path, tensors, meta = found
        step = int(meta["step"])
        if step > self.config.max_steps:
            raise CheckpointError(f"{path} is at step {step}, past max_steps={self.config.max_steps}")
        saved_cfg = meta.get("train_config", {})
        same_accum = saved_cfg.get("grad_accum_steps") == self.config.grad_accum_steps
        if meta.get("world_size") != self.world_size or not same_accum:
            warnings.warn(
                f"resuming {path.name} saved with world_size={meta.get('world_size')}, grad_accum_steps="
                f"{saved_cfg.get('grad_accum_steps')} under world_size={self.world_size}, grad_accum_steps="
                f"{self.config.grad_accum_steps}: the data position is not the same any more",
                stacklevel=3,
            )
        load_train_state(self._model, self.optimizer, tensors, meta)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step = step
        guard = meta.get("guard", {})
        self.skipped_steps = int(guard.get("skipped_steps", 0))
        self.clipped_steps = int(guard.get("clipped_steps", 0))
        if not self._cursor.restore(meta["data"], meta.get("data_source")):
            self._cursor.fast_forward(meta["data"])
        # RNG last: fast-forwarding the data may draw random numbers
        set_rng_state(rank_rng_state(tensors, meta, self.rank))
        self.records = self._truncate_metrics(step)
        return True

    def _truncate_metrics(self, step: int) -> list[dict]:
        """Drop records logged after ``step`` (a killed run's tail) so no step appears twice."""
        if self.stage_dir is None:
            return []
        return truncate_metrics(Path(self.stage_dir.metrics_path), step, self.rank)
