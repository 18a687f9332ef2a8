"""The one training loop every mmafm stage uses.

A stage brings a *task*, its data and a :class:`TrainConfig`:

- ``task.model``: the ``nn.Module`` being trained (and checkpointed). The trainer moves it to the
  device and may replace ``task.model`` by a ``DistributedDataParallel`` wrapper, so the task
  must always call ``self.model(...)``.
- ``task.training_forward(batch) -> (losses, metrics)``: ``losses`` a dict of scalar tensors,
  summed for the backward pass; ``metrics`` a dict of floats (or scalar tensors) to log.
- optionally ``task.evaluate() -> dict[str, float]`` (called on every rank, under ``no_grad``,
  every ``eval_every`` steps and at the end), and ``task.count_items(batch) -> int`` (tokens or
  samples, for the throughput column; default: the leading dimension of the first tensor).

Recipe (2024 AFM report, section 3 "Pre-training", see REFERENCE.md): decoupled weight decay,
linear warm-up then cosine decay to ``min_lr_ratio`` of the peak, global grad-norm clipping at
1.0 before the update. Everything else (gradient accumulation, bf16 autocast, checkpoints with
exact resume, DDP/FSDP2 under torchrun) is standard practice as in nanoGPT and torchtitan.

Checkpoints live in ``stage_dir.checkpoint_dir``: ``step_<8-digit step>.safetensors`` (model weights,
optimizer tensors, RNG states) + ``step_<8-digit step>.json`` (step, data position, scheduler, optimizer
hyper-parameters, Python/NumPy RNG, the config), ``latest.json`` naming the newest one, and the
final weights as ``final.safetensors``. A trainer started on a stage dir holding a checkpoint
resumes from it exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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

from mmafm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mmafm.config import ConfigError, coerce_fields, to_dict
from mmafm.io import atomic_path, atomic_write_json, read_jsonl
from mmafm.train.distributed import (
    PARALLEL_MODES,
    barrier,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    launched_with_torchrun,
    parallelize,
)
from mmafm.train.optim import build_optimizer
from mmafm.train.schedule import build_scheduler

__all__ = ["TrainConfig", "Trainer", "seed_everything", "move_to", "count_items"]

LATEST = "latest.json"
FINAL = "final"
# names the trainer writes into every metrics record itself
RESERVED_NAMES = ("step", "lr", "grad_norm", "tokens_or_samples_per_s")


@dataclass
class TrainConfig:
    """How to train: optimizer, schedule, precision, logging, checkpoints, parallelism."""

    # optimizer steps in total (a step = grad_accum_steps micro-batches on every rank)
    max_steps: int = field(default=100, metadata={"min": 1})
    # peak learning rate [open per stage; 2024 AFM pre-training used 1e-2 with mu-param]
    lr: float = field(default=3e-4, metadata={"min": 0.0})
    # decoupled (AdamW) weight decay, not applied to norms, biases, embeddings, no_weight_decay()
    # [open: 2024 AFM used 3.16e-4 with its own optimizer; 0.1 is the usual AdamW value]
    weight_decay: float = field(default=0.1, metadata={"min": 0.0})
    # AdamW betas, each in [0, 1) [open: (0.9, 0.95) as in nanoGPT/LLaMA]
    betas: tuple[float, float] = (0.9, 0.95)
    # AdamW epsilon (> 0)
    eps: float = field(default=1e-8, metadata={"min": 0.0})
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
    # "fp32", or "bf16" = torch.autocast(bfloat16) around the forward (weights stay fp32)
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "bf16")})
    # write a metrics record every this many steps (and at the last step)
    log_every: int = field(default=10, metadata={"min": 1})
    # call task.evaluate() every this many steps; 0 = only at the end
    eval_every: int = field(default=0, metadata={"min": 0})
    # save a resumable checkpoint every this many steps; 0 = only at the end
    ckpt_every: int = field(default=0, metadata={"min": 0})
    # how many step checkpoints to keep (older ones are deleted; final weights always kept)
    keep_checkpoints: int = field(default=2, metadata={"min": 1})
    # seeds Python, NumPy and torch (rank r uses seed + r) and the per-epoch data order
    seed: int = field(default=0, metadata={"min": 0})
    # torch.use_deterministic_algorithms(warn_only) during fit() on CPU
    deterministic: bool = True
    # "none" (one process), "ddp" or "fsdp" (FSDP2 fully_shard); the last two need torchrun
    parallel: str = field(default="none", metadata={"choices": PARALLEL_MODES})
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


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten_optimizer(optim_state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict (keyed by parameter name) -> safetensors tensors + JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for param_name, param_state in optim_state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{param_name}/{key}"] = value
            else:
                plain.setdefault(str(param_name), {})[key] = value
    groups = []
    for group in optim_state["param_groups"]:
        groups.append({
            k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in group.items()
        })
    return tensors, {"param_groups": groups, "state": plain}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    state: dict[str, dict] = {name: dict(values) for name, values in meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            param_name, entry = key[len("optim/"):].rsplit("/", 1)
            state.setdefault(param_name, {})[entry] = value
    groups = []
    for group in meta["param_groups"]:
        # JSON turned tuples (AdamW's betas) into lists
        groups.append({k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in group.items()})
    return {"state": state, "param_groups": groups}


class Trainer:
    """Trains ``task.model`` on ``train_data`` as ``config`` says; see the module docstring.

    Args:
        task: object with ``model`` and ``training_forward(batch)``; optionally ``evaluate()``
            and ``count_items(batch)``.
        train_data: an iterable of batches (this rank's share under torchrun), iterated again
            for every epoch. For exact resume it must give the same batches for a given epoch
            each time: fixed lists, or shuffling drawn from torch/NumPy/Python's global RNG at
            ``iter()`` or first batch (``DataLoader(shuffle=True)``), which the trainer seeds
            per epoch; ``set_epoch(epoch)`` is called when the source has it.
        config: the training settings.
        stage_dir: where metrics, checkpoints and the final weights go (a ``StageDir``); ``None``
            keeps everything in memory (no checkpoints, no resume).
        optimizer_factory: ``(model, config) -> Optimizer``; default AdamW (:mod:`.optim`).
        scheduler_factory: ``(optimizer, config) -> LRScheduler``; default warm-up + cosine or
            constant (:mod:`.schedule`).
    """

    def __init__(
        self,
        task: Any,
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
                "expected 'ddp' or 'fsdp', got 'none'"
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
        """The model's full (unsharded) weights on CPU; a collective under FSDP2 (call on all ranks)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self._model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

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
        if self.parallel == "fsdp":
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
        params = [p for p in self._model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums, items, grad_norm

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
        if not np.isfinite(record["loss"]):
            raise FloatingPointError(
                f"loss is {record['loss']} at step {self.step}; lower lr or use precision='fp32'"
            )
        record["lr"] = lr
        record["grad_norm"] = float(grad_norm)
        record["tokens_or_samples_per_s"] = numbers[-1] / max(seconds, 1e-9)
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

    def _state_dicts(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(self._model, self.optimizer, options=options)

    def save_checkpoint(self) -> Path | None:
        """Save everything needed to resume at ``self.step`` (collective; rank 0 writes).

        Returns:
            The ``.safetensors`` path on rank 0, else ``None`` (also without a stage dir).
        """
        if self.stage_dir is None:
            return None
        model_state, optim_state = self._state_dicts()
        rng_states = [_rng_state()]
        if self.world_size > 1:
            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        path = None
        if self.rank == 0:
            path = self._write_checkpoint(model_state, optim_state, rng_states)
        barrier()
        return path

    def _write_checkpoint(self, model_state: dict, optim_state: dict, rng_states: list[dict]) -> Path:
        tensors = {f"model/{k}": v for k, v in model_state.items()}
        optim_tensors, optim_meta = _flatten_optimizer(optim_state)
        tensors.update(optim_tensors)
        rng_meta = {}
        for rank, state in enumerate(rng_states):
            tensors[f"rng/{rank}/torch"] = state["torch"]
            for index, cuda_state in enumerate(state.get("cuda", [])):
                tensors[f"rng/{rank}/cuda/{index}"] = cuda_state
            kind, keys, pos, has_gauss, cached = state["numpy"]
            rng_meta[str(rank)] = {
                "python": [state["python"][0], list(state["python"][1]), state["python"][2]],
                "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
                "cuda_devices": len(state.get("cuda", [])),
            }
        scheduler_state = dict(self.scheduler.state_dict())
        if "lr_lambdas" in scheduler_state:  # the schedule comes from the config, not the file
            scheduler_state["lr_lambdas"] = [None] * len(scheduler_state["lr_lambdas"])
        metadata = {
            "kind": "mmafm.train checkpoint",
            "step": self.step,
            "data": self._cursor.state(),
            "world_size": self.world_size,
            "parallel": self.parallel,
            "optimizer": optim_meta,
            "scheduler": scheduler_state,
            "rng": rng_meta,
            "train_config": to_dict(self.config),
        }
        name = f"step_{self.step:08d}"
        path = save_checkpoint(self.checkpoint_dir / name, tensors, metadata)
        atomic_write_json(self.checkpoint_dir / LATEST, {"step": self.step, "checkpoint": name})
        self._prune_checkpoints(keep=name)
        return path

    def _prune_checkpoints(self, keep: str) -> None:
        steps = sorted(p.with_suffix("") for p in self.checkpoint_dir.glob("step_*.json"))
        for old in steps[: -self.config.keep_checkpoints]:
            if old.name == keep:
                continue
            old.with_suffix(".json").unlink(missing_ok=True)  # JSON first: marks it incomplete
            old.with_suffix(".safetensors").unlink(missing_ok=True)

    def _save_final(self) -> None:
        if self.stage_dir is None:
            return
        weights = self.full_state_dict()
        if self.rank == 0:
            save_checkpoint(
                self.checkpoint_dir / FINAL, weights,
                {"kind": "mmafm.train final weights", "step": self.step, "train_config": to_dict(self.config)},
            )
        barrier()

    def _resume(self) -> bool:
        """Load the latest checkpoint of the stage dir if there is one; True if resumed."""
        if self.stage_dir is None:
            return False
        latest = self.checkpoint_dir / LATEST
        if not latest.is_file():
            return False
        try:
            name = json.loads(latest.read_text())["checkpoint"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"corrupt {latest}: {err}") from err
        tensors, meta = load_checkpoint(self.checkpoint_dir / name)
        if meta.get("kind") != "mmafm.train checkpoint":
            raise CheckpointError(f"{self.checkpoint_dir / name}: not a trainer checkpoint (no metadata?)")
        step = int(meta["step"])
        if step > self.config.max_steps:
            raise CheckpointError(
                f"{self.checkpoint_dir / name} is at step {step}, past max_steps={self.config.max_steps}"
            )
        saved_cfg = meta.get("train_config", {})
        same_accum = saved_cfg.get("grad_accum_steps") == self.config.grad_accum_steps
        if meta.get("world_size") != self.world_size or not same_accum:
            warnings.warn(
                f"resuming {name} saved with world_size={meta.get('world_size')}, grad_accum_steps="
                f"{saved_cfg.get('grad_accum_steps')} under world_size={self.world_size}, grad_accum_steps="
                f"{self.config.grad_accum_steps}: the data position is not the same any more",
                stacklevel=3,
            )

        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        optim_state = _unflatten_optimizer(tensors, meta["optimizer"])
        set_state_dict(
            self._model, self.optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True),
        )
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step = step
        self._cursor.fast_forward(meta["data"])
        # RNG last: fast-forwarding the data may draw random numbers
        rank_key = str(self.rank) if str(self.rank) in meta["rng"] else "0"
        rng = dict(meta["rng"][rank_key])
        rng["torch"] = tensors[f"rng/{rank_key}/torch"]
        if rng.get("cuda_devices"):
            rng["cuda"] = [tensors[f"rng/{rank_key}/cuda/{i}"] for i in range(rng["cuda_devices"])]
        _set_rng_state(rng)
        self.records = self._truncate_metrics(step)
        return True

    def _truncate_metrics(self, step: int) -> list[dict]:
        """Drop records logged after ``step`` (a killed run's tail) so no step appears twice."""
        if self.stage_dir is None:
            return []
        path = Path(self.stage_dir.metrics_path)
        records = read_jsonl(path)
        kept = [r for r in records if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
        barrier()  # every rank has read before rank 0 rewrites
        if self.rank == 0 and len(kept) != len(records):
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in kept))
        barrier()
        return [r for r in kept if "step" in r]
