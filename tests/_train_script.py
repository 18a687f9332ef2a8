"""A tiny training task for the trainer tests, also run as a script in subprocesses.

    python tests/_train_script.py resume OUT_DIR --kill-at 5     # SIGKILLs itself after step 5
    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/_train_script.py dist OUT_DIR                      # DDP and FSDP2, with a resume

The same functions build the one-process reference inside pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mmafm.stages.base import StageDir
from mmafm.train import TrainConfig, Trainer, get_rank, get_world_size, seed_everything

DIM_IN, DIM, DIM_OUT = 6, 16, 3


class TinyNet(nn.Module):
    """Input projection, two residual MLP blocks (the FSDP units), a head."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(DIM_IN, DIM)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * DIM, DIM)
            )
            for _ in range(2)
        )
        self.head = nn.Linear(DIM, DIM_OUT)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs)  # (B, D)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(hidden)  # (B, DIM_OUT)


class RegressionTask:
    """Mean-squared error on (inputs, targets) batches; logs the mean absolute error too."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.eval_inputs = torch.linspace(-1, 1, 4 * DIM_IN).reshape(4, DIM_IN)
        self.autocast_dtypes: list[torch.dtype | None] = []

    def training_forward(self, batch: dict) -> tuple[dict, dict]:
        prediction = self.model(batch["inputs"])
        enabled = torch.is_autocast_enabled(prediction.device.type)
        self.autocast_dtypes.append(torch.get_autocast_dtype(prediction.device.type) if enabled else None)
        mse = F.mse_loss(prediction.float(), batch["targets"])
        return {"mse": mse}, {"mae": (prediction.float() - batch["targets"]).abs().mean().item()}

    def evaluate(self) -> dict:
        return {"output_mean": self.model(self.eval_inputs).float().mean().item()}


def make_task(dropout: float = 0.0, seed: int = 0) -> RegressionTask:
    seed_everything(seed)
    return RegressionTask(TinyNet(dropout))


def global_batches(n_batches: int, batch_size: int, seed: int = 1) -> list[dict]:
    """Synthetic regression batches, the same in every process."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(DIM_IN, DIM_OUT, generator=generator)
    batches = []
    for _ in range(n_batches):
        inputs = torch.randn(batch_size, DIM_IN, generator=generator)
        batches.append({"inputs": inputs, "targets": torch.tanh(inputs @ weight)})
    return batches


def rank_share(batches: list[dict], rank: int, world_size: int) -> list[dict]:
    """This rank's contiguous slice of every global batch."""
    share = []
    for batch in batches:
        size = batch["inputs"].shape[0] // world_size
        share.append({k: v[rank * size : (rank + 1) * size] for k, v in batch.items()})
    return share


def shuffled_loader(n_samples: int = 40, batch_size: int = 8) -> DataLoader:
    """A shuffling DataLoader (order drawn from torch's global RNG at each epoch)."""
    full = global_batches(1, n_samples, seed=2)[0]

    def collate(rows):
        inputs, targets = zip(*rows)
        return {"inputs": torch.stack(inputs), "targets": torch.stack(targets)}

    dataset = TensorDataset(full["inputs"], full["targets"])
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate)


RESUME_CONFIG = dict(max_steps=9, lr=1e-2, warmup_steps=2, log_every=1, ckpt_every=3, eval_every=4, seed=3)


class KilledTrainer(Trainer):
    """Dies by SIGKILL right after logging the training record of step ``kill_at``."""

    kill_at = -1

    def log(self, record: dict) -> None:
        super().log(record)
        if record["step"] == self.kill_at and "loss" in record:
            os.kill(os.getpid(), signal.SIGKILL)


class Interrupted(Exception):
    pass


class InterruptedTrainer(Trainer):
    """Raises (on every rank) right after the checkpoint of step ``stop_at``."""

    stop_at = -1

    def save_checkpoint(self):
        path = super().save_checkpoint()
        if self.step == self.stop_at:
            raise Interrupted
        return path


def resume_run(out_dir: str, trainer_cls: type = Trainer) -> list[dict]:
    """The resume test's run: dropout on, shuffled loader crossing epochs."""
    task = make_task(dropout=0.1)
    config = TrainConfig(**RESUME_CONFIG)
    return trainer_cls(task, shuffled_loader(), config, StageDir(out_dir, "resume")).fit()


DIST_MODES = {"ddp": dict(grad_accum_steps=1), "fsdp": dict(grad_accum_steps=2)}
DIST_COMMON = dict(max_steps=6, lr=2e-2, warmup_steps=1, log_every=1, seed=0, grad_clip=0.5)


def dist_run(mode: str, out_dir: str | None, parallel: str, stop_at: int | None = None) -> list[dict]:
    """One run of the 2-process test (parallel='none' gives the 1-process reference)."""
    rank, world_size = (get_rank(), get_world_size()) if parallel != "none" else (0, 1)
    accum = DIST_MODES[mode]["grad_accum_steps"]
    batches = rank_share(global_batches(4 * accum, 8), rank, world_size)
    config = TrainConfig(**DIST_COMMON, **DIST_MODES[mode], parallel=parallel, ckpt_every=3)
    stage_dir = StageDir(out_dir, mode) if out_dir else None
    if stop_at is not None:
        interrupted = InterruptedTrainer(make_task(), batches, config, stage_dir)
        interrupted.stop_at = stop_at
        try:
            interrupted.fit()
        except Interrupted:
            pass
    trainer = Trainer(make_task(), batches, config, stage_dir)
    records = trainer.fit()
    WRAPPING[mode] = describe_wrapping(trainer)
    return records


WRAPPING: dict[str, str] = {}


def describe_wrapping(trainer: Trainer) -> str:
    """What the trainer made of the model: wrapper class and parameter type (DTensor = sharded)."""
    param = next(trainer.model.parameters())
    return f"{type(trainer.task.model).__name__}:{type(param).__name__}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("resume", "dist"))
    parser.add_argument("out_dir")
    parser.add_argument("--kill-at", type=int, default=-1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the tests' own process; the models are tiny
    if args.what == "resume":
        KilledTrainer.kill_at = args.kill_at
        resume_run(args.out_dir, KilledTrainer)
        return
    results = {}
    for mode in DIST_MODES:
        full = dist_run(mode, str(Path(args.out_dir) / mode / "full"), mode)
        resumed = dist_run(mode, str(Path(args.out_dir) / mode / "resumed"), mode, stop_at=3)
        results[mode] = {"full": full, "resumed": resumed, "wrapping": WRAPPING[mode]}
    if get_rank() == 0:
        (Path(args.out_dir) / "results.json").write_text(json.dumps(results))
    from mmafm.train import cleanup_distributed

    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
