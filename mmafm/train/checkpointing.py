"""Resumable training checkpoints: what the trainer writes and reads back to continue exactly.

A stage directory's ``checkpoints/`` holds

- ``step_<8-digit step>.safetensors``: the model weights (``model/<name>``), the optimizer's
  tensors (``optim/<param name>/<key>``) and each rank's torch / CUDA RNG states
  (``rng/<rank>/torch``, ``rng/<rank>/cuda/<device>``);
- ``step_<8-digit step>.json``: step, data position (epoch, batches into it), world size,
  parallel mode, the optimizer's hyper-parameters and non-tensor state, the scheduler's state,
  each rank's Python and NumPy RNG states, and the train config;
- ``latest.json``: ``{"step", "checkpoint"}`` naming the newest complete checkpoint (written after
  it, atomically, so a run killed mid-write resumes from the one before);
- ``final.safetensors`` / ``final.json``: the final weights alone.

A writer killed mid-checkpoint leaves at most a temp file
(``.step_<step>.safetensors.<8 random characters>.tmp``, :mod:`mmafm.io`) or a ``step_<step>.safetensors`` whose JSON was never written (or whose JSON
pruning had already deleted); ``latest.json`` never names either. :func:`remove_incomplete_checkpoints`
deletes them when the stage starts or resumes (:class:`mmafm.stages.base.StageDir` calls it).

Model and optimizer state are full (unsharded) state dicts keyed by parameter name, gathered
with ``torch.distributed.checkpoint.state_dict`` (a collective under FSDP2), so a checkpoint
resumes on any world size and parallel mode. Only ``keep`` step checkpoints are kept.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from mmafm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mmafm.io import atomic_path, atomic_write_json, read_jsonl, remove_temp_files
from mmafm.train.distributed import barrier

__all__ = [
    "LATEST",
    "FINAL",
    "TRAIN_CHECKPOINT_KIND",
    "FINAL_WEIGHTS_KIND",
    "rng_state",
    "set_rng_state",
    "flatten_optimizer",
    "unflatten_optimizer",
    "gather_train_state",
    "load_train_state",
    "write_train_checkpoint",
    "read_latest_checkpoint",
    "rank_rng_state",
    "prune_checkpoints",
    "remove_incomplete_checkpoints",
    "write_final_weights",
    "truncate_metrics",
]

LATEST = "latest.json"
FINAL = "final"
TRAIN_CHECKPOINT_KIND = "mmafm.train checkpoint"
FINAL_WEIGHTS_KIND = "mmafm.train final weights"


# ------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's Python, NumPy, torch CPU and (when initialised) CUDA RNG states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`'s states, also after a JSON round trip (lists for tuples)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_checkpoint(rng_states: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """Each rank's RNG states -> safetensors tensors (torch, CUDA) + JSON metadata (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for rank, state in enumerate(rng_states):
        tensors[f"rng/{rank}/torch"] = state["torch"]
        for index, cuda_state in enumerate(state.get("cuda", [])):
            tensors[f"rng/{rank}/cuda/{index}"] = cuda_state
        kind, keys, pos, has_gauss, cached = state["numpy"]
        meta[str(rank)] = {
            "python": [state["python"][0], list(state["python"][1]), state["python"][2]],
            "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
            "cuda_devices": len(state.get("cuda", [])),
        }
    return tensors, meta


def rank_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], rank: int) -> dict:
    """The RNG states a checkpoint holds for ``rank`` (rank 0's when it was saved with fewer
    ranks), ready for :func:`set_rng_state`."""
    rank_key = str(rank) if str(rank) in meta["rng"] else "0"
    state = dict(meta["rng"][rank_key])
    state["torch"] = tensors[f"rng/{rank_key}/torch"]
    if state.get("cuda_devices"):
        state["cuda"] = [tensors[f"rng/{rank_key}/cuda/{i}"] for i in range(state["cuda_devices"])]
    return state


# ------------------------------------------------------------------------------- optimizer
def flatten_optimizer(optim_state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
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


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    """The inverse of :func:`flatten_optimizer`: an optimizer state dict keyed by parameter name."""
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


# --------------------------------------------------------------------- model + optimizer
def gather_train_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts on CPU, keyed by parameter name; a
    collective under FSDP2 and track parallelism (call on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from mmafm.train.parallel import gather_track_state, is_track_parallel

    if is_track_parallel(model):  # the plain model's names: resumes in one process and back
        return gather_track_state(model, optimizer)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def load_train_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    """Load a checkpoint's model weights and optimizer state into ``model`` / ``optimizer``
    (sharding them again under FSDP2; a track-parallel rank takes its tracks and the shared weights)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from mmafm.train.parallel import is_track_parallel, load_track_state

    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    optim_state = unflatten_optimizer(tensors, meta["optimizer"])
    if is_track_parallel(model):
        load_track_state(model, optimizer, model_state, optim_state)
        return
    set_state_dict(
        model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True),
    )


# ------------------------------------------------------------------------------ the files
def write_train_checkpoint(
    checkpoint_dir: Path,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    optim_state: Mapping[str, Any],
    rng_states: list[dict],
    metadata: Mapping[str, Any],
    keep: int,
) -> Path:
    """Write ``step_<step>`` (tensors, then JSON), point ``latest.json`` at it, prune old ones.

    Args:
        checkpoint_dir: The stage's ``checkpoints/`` folder.
        step: Optimizer steps taken.
        model_state: Full model state dict.
        optim_state: Full optimizer state dict keyed by parameter name.
        rng_states: :func:`rng_state` of every rank, in rank order.
        metadata: The rest of the JSON metadata (data position, scheduler, config, ...).
        keep: How many step checkpoints to keep.

    Returns:
        The ``.safetensors`` path.
    """
    tensors = {f"model/{k}": v for k, v in model_state.items()}
    optim_tensors, optim_meta = flatten_optimizer(optim_state)
    tensors.update(optim_tensors)
    rng_tensors, rng_meta = _rng_to_checkpoint(rng_states)
    tensors.update(rng_tensors)
    full_meta = {
        "kind": TRAIN_CHECKPOINT_KIND, "step": step, **metadata, "optimizer": optim_meta, "rng": rng_meta,
    }
    name = f"step_{step:08d}"
    path = save_checkpoint(checkpoint_dir / name, tensors, full_meta)
    atomic_write_json(checkpoint_dir / LATEST, {"step": step, "checkpoint": name})
    prune_checkpoints(checkpoint_dir, keep, keep_name=name)
    return path


def read_latest_checkpoint(checkpoint_dir: Path) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """``(path, tensors, metadata)`` of the checkpoint ``latest.json`` names, or None without one.

    Raises:
        CheckpointError: A corrupt ``latest.json`` or checkpoint, or a file that is not a
            trainer checkpoint; the message names the file.
    """
    latest = checkpoint_dir / LATEST
    if not latest.is_file():
        return None
    try:
        name = json.loads(latest.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"corrupt {latest}: {err}") from err
    tensors, meta = load_checkpoint(checkpoint_dir / name)
    if meta.get("kind") != TRAIN_CHECKPOINT_KIND:
        raise CheckpointError(f"{checkpoint_dir / name}: not a trainer checkpoint (no metadata?)")
    return checkpoint_dir / name, tensors, meta


def prune_checkpoints(checkpoint_dir: Path, keep: int, keep_name: str) -> None:
    """Delete all but the newest ``keep`` step checkpoints (never ``keep_name``)."""
    steps = sorted(p.with_suffix("") for p in checkpoint_dir.glob("step_*.json"))
    for old in steps[:-keep]:
        if old.name == keep_name:
            continue
        old.with_suffix(".json").unlink(missing_ok=True)  # JSON first: marks it incomplete
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def remove_incomplete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Delete what a killed writer left in ``checkpoint_dir``: temp files and step checkpoints
    without their JSON (the JSON is written last, so only complete ones have it). Call it before
    the trainer writes (rank 0); ``latest.json`` never names a file this removes.

    Returns:
        The paths removed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    removed = remove_temp_files(checkpoint_dir)
    for weights in sorted(checkpoint_dir.glob("step_*.safetensors")):
        if not weights.with_suffix(".json").is_file():
            weights.unlink(missing_ok=True)
            removed.append(weights)
    return removed


def write_final_weights(checkpoint_dir: Path, weights: Mapping[str, torch.Tensor], step: int, train_config: dict) -> Path:
    """``final.safetensors`` + ``final.json`` (step and train config): the trained weights alone."""
    return save_checkpoint(
        checkpoint_dir / FINAL, dict(weights),
        {"kind": FINAL_WEIGHTS_KIND, "step": step, "train_config": train_config},
    )


def truncate_metrics(metrics_path: Path, step: int, rank: int) -> list[dict]:
    """Drop records logged after ``step`` (a killed run's tail) so no step appears twice.

    Every rank reads the file; rank 0 rewrites it atomically between two barriers.

    Returns:
        The records kept that carry a ``step``.
    """
    records = read_jsonl(metrics_path)
    kept = [r for r in records if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
    barrier()  # every rank has read before rank 0 rewrites
    if rank == 0 and len(kept) != len(records):
        with atomic_path(metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in kept))
    barrier()
    return [r for r in kept if "step" in r]
