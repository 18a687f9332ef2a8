"""Checkpoints: safetensors weights plus a JSON metadata file, both written atomically.

A checkpoint ``NAME`` is two files: ``NAME.safetensors`` (tensors only) and ``NAME.json``
(metadata: model preset and config, step, anything JSON-serialisable). The JSON is written last,
so its presence marks a complete checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmafm.io import atomic_path, atomic_write_json

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_into", "checkpoint_paths", "read_metadata"]


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatched checkpoint; the message names the file."""


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(weights, metadata)`` paths for a checkpoint given with or without its suffix."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Write ``tensors`` and ``metadata``; returns the ``.safetensors`` path."""
    weights_path, meta_path = checkpoint_paths(path)
    # safetensors refuses shared/non-contiguous storage; tied weights are saved once per name
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(weights_path) as tmp:
        save_file(plain, str(tmp), metadata={"format": "pt"})
    atomic_write_json(meta_path, metadata or {})
    return weights_path


def read_metadata(path: str | Path) -> dict:
    """A checkpoint's metadata without reading its tensors ({} when it has none); a missing
    weights file or unreadable metadata is a :class:`CheckpointError`."""
    weights_path, meta_path = checkpoint_paths(path)
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint not found: {weights_path}")
    metadata: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {err}") from err
    return metadata


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint; a missing or unreadable file is a :class:`CheckpointError`."""
    metadata = read_metadata(path)
    weights_path, _ = checkpoint_paths(path)
    try:
        tensors = load_file(str(weights_path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"corrupt checkpoint {weights_path}: {err}") from err
    return tensors, metadata


def load_into(model: nn.Module, path: str | Path, strict: bool = True, prefix: str = "") -> dict:
    """Load a checkpoint into ``model``; shape or key mismatches raise naming the tensors.

    Args:
        prefix: only tensors under this key prefix are loaded (the prefix is stripped), e.g.
            ``"visual."`` to load the image tower out of a full CLIP checkpoint.

    Returns:
        The checkpoint's metadata.
    """
    tensors, metadata = load_checkpoint(path)
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not tensors:
            raise CheckpointError(f"{path}: no tensors under prefix {prefix!r}")
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__} "
            f"(was it saved from another preset?): " + "; ".join(mismatched[:5])
        )
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(tensors, strict=False)
    return metadata
