"""The shared trainer: one loop for every stage (see :mod:`mmafm.train.trainer` and docs/training.md).

    from mmafm.train import Trainer, TrainConfig
    records = Trainer(task, batches, TrainConfig(max_steps=100), stage_dir).fit()

``task`` follows :class:`TrainingTask` (:mod:`mmafm.train.task`); checkpoints and exact resume
are :mod:`mmafm.train.checkpointing`; the torchrun entry point is :mod:`mmafm.launch`.
"""

from mmafm.train.distributed import (
    cleanup_distributed,
    fsdp_units,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    parallelize,
)
from mmafm.train.optim import build_optimizer, param_groups
from mmafm.train.schedule import WarmupConstant, WarmupCosine, build_scheduler, constant_schedule, cosine_schedule
from mmafm.train.task import CountingTask, EvaluatingTask, TrainingTask
from mmafm.train.trainer import TrainConfig, Trainer, TrainSettings, count_items, move_to, seed_everything, setting

__all__ = [
    "Trainer",
    "TrainConfig",
    "TrainSettings",
    "setting",
    "TrainingTask",
    "EvaluatingTask",
    "CountingTask",
    "seed_everything",
    "move_to",
    "count_items",
    "build_optimizer",
    "param_groups",
    "build_scheduler",
    "cosine_schedule",
    "constant_schedule",
    "WarmupCosine",
    "WarmupConstant",
    "init_distributed",
    "cleanup_distributed",
    "parallelize",
    "fsdp_units",
    "get_rank",
    "get_local_rank",
    "get_world_size",
    "is_main_process",
]
