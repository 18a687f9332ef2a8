"""torch.distributed plumbing for the trainer: process group from torchrun, DDP and FSDP2 wrapping.

mmafm writes no distribution of its own: a run launched with ``torchrun`` (which sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) joins the default process group
(``nccl`` on CUDA, ``gloo`` on CPU) and the model is wrapped by PyTorch itself:

- ``"ddp"``: :class:`torch.nn.parallel.DistributedDataParallel` (every rank holds the full model,
  gradients are all-reduced),
- ``"fsdp"``: FSDP2 :func:`torch.distributed.fsdp.fully_shard` on each transformer block, then on
  the root (parameters, gradients and optimizer state sharded across ranks), as in torchtitan;
- ``"track"``: the PT-MoE server model's tracks split over the ``track`` dimension of a
  ``("dp", "track")`` device mesh, one all-reduce per track block, FSDP2 over ``dp``
  (:mod:`mmafm.train.parallel`).

Without torchrun everything here degrades to one process (rank 0 of 1).
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "PARALLEL_MODES",
    "launched_with_torchrun",
    "init_distributed",
    "cleanup_distributed",
    "get_rank",
    "get_local_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "default_device",
    "fsdp_units",
    "parallelize",
    "clip_grad_norm",
    "sum_counts_over_ranks",
    "full_model_state_dict",
]

PARALLEL_MODES = ("none", "ddp", "fsdp", "track")
_BLOCK_LIST_NAMES = ("blocks", "layers")


def launched_with_torchrun() -> bool:
    """True when the torchrun environment variables are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def get_world_size() -> int:
    """Number of processes in the run (1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0: the process that writes files and shows progress."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sum_counts_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """``{key: count}`` summed over every rank (each rank reads its own shards, so a count
    such as skipped samples is per rank); the input itself in one process. A collective: every
    rank must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(counts)
    gathered: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for part in gathered:
        for key, value in (part or {}).items():
            total[key] = total.get(key, 0) + int(value)
    return dict(sorted(total.items()))


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when a GPU is visible, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> bool:
    """Join the torchrun process group if launched by torchrun and not joined yet.

    Args:
        backend: ``None`` picks ``nccl`` when CUDA is available, else ``gloo``.

    Returns:
        Whether a process group is initialized afterwards.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not launched_with_torchrun():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(get_local_rank())
    dist.init_process_group(backend=backend)
    return True


def cleanup_distributed() -> None:
    """Leave the process group (call once at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules FSDP2 shards one by one (each is gathered just for its own forward).

    ``model.fsdp_units()`` when the model defines it; otherwise every child of each
    ``nn.ModuleList`` called ``blocks`` or ``layers`` anywhere in the model (the outermost such
    lists; blocks nested inside an already chosen unit are left to it).
    """
    if hasattr(model, "fsdp_units"):
        return list(model.fsdp_units())
    units: list[nn.Module] = []
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES:
            for block in module:
                units.append(block)
                inside.update(id(sub) for sub in block.modules())
    return units


def _shard(units: Iterable[nn.Module], root: nn.Module, device: torch.device | None) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # an explicit 1-D mesh on the model's device type (the default would pick any visible GPU)
    device_type = device.type if device is not None else default_device().type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return root


def parallelize(model: nn.Module, mode: str, device: torch.device | None = None) -> nn.Module:
    """Wrap ``model`` for training across the process group.

    Args:
        model: the model, already on ``device``.
        mode: ``"none"`` (returned as is), ``"ddp"``, ``"fsdp"`` or ``"track"`` (a PT-MoE model).
        device: the model's device; for ``"ddp"`` on CUDA it names the GPU.

    Returns:
        The module to call in the training step: a ``DistributedDataParallel`` wrapper for
        ``"ddp"``; for ``"fsdp"`` the same ``model`` object, sharded in place; for ``"track"`` the
        same object holding only this rank's tracks
        (:class:`~mmafm.train.parallel.TrackParallelPTMoE`), FSDP2-sharded over ``dp``.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel: expected one of {list(PARALLEL_MODES)}, got {mode!r}")
    if mode == "none":
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"parallel={mode!r} needs a process group: launch with torchrun "
            "(python -m torch.distributed.run --nproc_per_node N ...) and call init_distributed()"
        )
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device is not None and device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if mode == "track":
        from mmafm.train.parallel import shard_tracks, track_mesh

        num_tracks = getattr(getattr(model, "config", None), "num_tracks", 1)
        device_type = device.type if device is not None else default_device().type
        return shard_tracks(model, track_mesh(num_tracks, device_type=device_type))
    return _shard(fsdp_units(model), model, device)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``model`` to a global norm of ``max_norm`` (``inf``: measure only).

    Returns:
        The global norm before clipping, a plain tensor: over every rank's shard under FSDP2, over
        every track (the replicated weights once) for a track-parallel model.
    """
    from mmafm.train.parallel import is_track_parallel

    if is_track_parallel(model):
        return model.clip_grad_norm_(max_norm)
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    grad_norm = total.full_tensor() if hasattr(total, "full_tensor") else total  # FSDP2: a replicated DTensor
    # torch.nn.utils.clip_grad_norm_ multiplies every gradient by min(1, max_norm / (norm + 1e-6))
    # even when that is 1 (no host sync on an accelerator). On the CPU the norm is already here, so
    # an unclipped step skips that read-and-write pass over the gradients (x 1.0: bit for bit the
    # same); a NaN coefficient (non-finite norm) is still applied, as torch does.
    if grad_norm.device.type != "cpu" or not float(max_norm / (grad_norm + 1e-6)) >= 1.0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return grad_norm


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded, one-process) weights on CPU; a collective under FSDP2 and for
    a track-parallel model (call on every rank; rank 0's answer is the complete one)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mmafm.train.parallel import gather_track_state, is_track_parallel

    if is_track_parallel(model):
        return gather_track_state(model)[0]
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
