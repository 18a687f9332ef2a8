"""Adapter files: safetensors + JSON, written atomically, bound to the base they were trained on.

An adapter ``NAME`` is two files, like a model checkpoint (:mod:`mmafm.checkpoint`):

- ``NAME.safetensors``: ``"<module>.lora_A"`` (r, in) and ``"<module>.lora_B"`` (out, r) per
  LoRA module, at the adapter's own rank (slot padding is not stored);
- ``NAME.json`` (written last)::

    {"format": "mmafm-lora", "version": 1, "name": "date_place", "rank": 32, "alpha": 16.0,
     "dropout": 0.0, "targets": [...patterns...], "modules": [...module names...],
     "dtype": "float32", "parameters": 1234,
     "base": {"family": "text", "preset": "afm_2024_device_tiny", "weights_sha256": "..."},
     "metadata": {...the caller's: training summary, feature, ...}}

The base fingerprint is the preset plus a SHA-256 of the base's parameters (names, shapes and
values rounded to bfloat16, so a float32 base and its bf16 copy agree); an :class:`Adapters`
handle takes it once, before any merge (a merge and unmerge leaves float32 rounding behind). An
adapter is only meaningful on the weights it was trained on, so
:func:`load_adapter` refuses a file whose fingerprint differs from the model's, naming both.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmafm.checkpoint import checkpoint_paths
from mmafm.io import atomic_path, atomic_write_json

if TYPE_CHECKING:
    from mmafm.lora.adapters import AdapterInfo, Adapters

__all__ = [
    "FORMAT",
    "AdapterFileError",
    "BaseMismatchError",
    "adapter_paths",
    "base_fingerprint",
    "read_adapter",
    "check_base_record",
    "save_adapter",
    "load_adapter",
]

FORMAT, VERSION = "mmafm-lora", 1
_LORA_SUFFIXES = (".lora_A", ".lora_B")


class AdapterFileError(RuntimeError):
    """A missing, corrupt or foreign adapter file; the message names it."""


class BaseMismatchError(ValueError):
    """An adapter file made on another base model than the one it is loaded onto."""


def adapter_paths(path: str | Path) -> tuple[Path, Path]:
    """``(tensors, record)`` paths of an adapter given with or without its suffix: the same
    two-file layout as a model checkpoint."""
    return checkpoint_paths(path)


@torch.no_grad()
def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """``{"family", "preset", "weights_sha256"}`` of ``model``'s base (LoRA tensors excluded).

    The hash covers every parameter's name, shape and values rounded to bfloat16, in name order.
    """
    spec = getattr(model, "model_spec", None)
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if name.endswith(_LORA_SUFFIXES):
            continue
        if param.is_meta:
            raise ValueError(f"base_fingerprint: parameter {name!r} is on the meta device (no values to hash)")
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        values = param.detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(values.view(torch.int16).numpy().tobytes())
    return {
        "family": getattr(spec, "family", None),
        "preset": getattr(spec, "preset", None),
        "weights_sha256": digest.hexdigest(),
    }


def save_adapter(adapters: "Adapters", path: str | Path, name: str | None, dtype: torch.dtype | None = None,
                 metadata: dict | None = None) -> Path:
    """Write adapter ``name`` of ``adapters`` (tensors in ``dtype``, default the model's; the
    reports ship 16-bit adapters: ``torch.bfloat16``); returns the ``.safetensors`` path."""
    if name is None:
        raise ValueError("save_adapter: no adapter named and none active")
    info = adapters.info(name)
    tensors = {key: value.to("cpu", dtype or value.dtype).contiguous() for key, value in adapters.state(name).items()}
    tensors_path, record_path = adapter_paths(path)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "name": info.name,
        "rank": info.rank,
        "alpha": info.alpha,
        "dropout": adapters.dropout,
        "targets": list(info.targets),
        "modules": list(info.modules),
        "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        "parameters": adapters.num_parameters(name),
        "base": adapters.fingerprint(),
        "metadata": {**info.metadata, **(metadata or {})},
    }
    with atomic_path(tensors_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    atomic_write_json(record_path, record)  # last: its presence marks a complete adapter
    return tensors_path


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, record)`` of an adapter file.

    Raises:
        AdapterFileError: a missing file, unreadable JSON or tensors, another format, or tensors
            the record does not announce.
    """
    tensors_path, record_path = adapter_paths(path)
    for file in (tensors_path, record_path):
        if not file.is_file():
            raise AdapterFileError(f"adapter file not found: {file}")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"corrupt adapter record {record_path}: {err}") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise AdapterFileError(f"{record_path} is not an mmafm LoRA adapter (format {FORMAT!r}); "
                               f"for a peft adapter folder use mmafm.lora.peft.from_peft")
    missing = [key for key in ("name", "rank", "alpha", "modules", "base") if key not in record]
    if missing:
        raise AdapterFileError(f"adapter record {record_path} lacks {missing}")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"corrupt adapter tensors {tensors_path}: {err}") from err
    expected = {f"{module}{suffix}" for module in record["modules"] for suffix in _LORA_SUFFIXES}
    if set(tensors) != expected:
        raise AdapterFileError(f"{tensors_path}: tensors {sorted(set(tensors) ^ expected)[:4]} differ from the "
                               f"modules its record {record_path.name} lists")
    return tensors, record


def check_base_record(record: dict, fingerprint: dict, source: str) -> None:
    """Raise :class:`BaseMismatchError` unless ``record``'s base is the one ``fingerprint`` describes."""
    base = record.get("base") or {}
    if base.get("weights_sha256") != fingerprint["weights_sha256"] or base.get("preset") != fingerprint["preset"]:
        raise BaseMismatchError(
            f"adapter {source} was trained on base preset {base.get('preset')!r} with weights sha256 "
            f"{str(base.get('weights_sha256'))[:12]}..., but this model is preset {fingerprint['preset']!r} with "
            f"weights sha256 {fingerprint['weights_sha256'][:12]}...; load it onto the base it was trained on "
            f"(or pass check_base=False to load it anyway)"
        )


def load_adapter(adapters: "Adapters", path: str | Path, name: str | None = None,
                 check_base: bool = True) -> "AdapterInfo":
    """Read an adapter file into ``adapters`` under ``name`` (default the file's own name).

    Raises:
        AdapterFileError: see :func:`read_adapter`.
        BaseMismatchError: the file was made on another base (unless ``check_base=False``).
        ValueError: its modules or shapes do not fit the LoRA modules attached here.
    """
    tensors, record = read_adapter(path)
    if check_base:
        check_base_record(record, adapters.fingerprint(), str(adapter_paths(path)[0]))
    reference = next(iter(adapters.modules.values())).lora_A
    tensors = {key: value.to(reference.device, reference.dtype) for key, value in tensors.items()}
    return adapters.put(name or record["name"], tensors, int(record["rank"]), float(record["alpha"]),
                        record.get("targets"), record.get("metadata"))
