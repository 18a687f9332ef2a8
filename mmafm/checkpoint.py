"""Checkpoints: safetensors weights plus a JSON metadata file, both written atomically.

A checkpoint ``NAME`` is two files: ``NAME.safetensors`` (tensors only) and ``NAME.json``
(metadata: model preset and config, step, anything JSON-serialisable). The JSON is written last,
so its presence marks a complete checkpoint.

A *model* checkpoint (:func:`save_model`) also records how to rebuild the model, under the
metadata key ``"model"``::

    {"model": {"family": "text", "preset": "afm_2024_device_tiny",
               "overrides": {"vocab_size": 2048}, "config": {...every TextConfig field...}},
     ...the caller's metadata (step, tokenizer, summary)...}

:func:`load_model` rebuilds any family (text, PT-MoE, multimodal, CLIP, image towers) from the
full ``config`` -- so models not built from a preset (upcycled, imported SmolLM2) rebuild too;
``preset`` and ``overrides`` say where the config came from. Like litgpt's
``Config.from_checkpoint``: one loader for every family.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmafm.io import atomic_path, atomic_write_json

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_into",
    "checkpoint_paths",
    "read_metadata",
    "MODEL_KEY",
    "save_model",
    "load_model",
    "model_outputs",
    "load_tokenizer_for",
]

MODEL_KEY = "model"  # metadata key of the record save_model writes and load_model reads


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


# --------------------------------------------------------------------------- model checkpoints
def _model_record(model: nn.Module, config: Any = None) -> dict[str, Any]:
    """``{"family", "preset", "overrides", "config"}`` of ``model`` as plain JSON values."""
    from mmafm.config import to_dict
    from mmafm.registry import ModelSpec, family_of

    family = family_of(model)
    if config is None:
        if not hasattr(model, "config"):
            raise TypeError(f"{type(model).__qualname__} has no .config to record")
        config = model.config
    elif type(config) is not type(model.config):
        raise TypeError(f"config is a {type(config).__name__}, the model's is a {type(model.config).__name__}")
    spec = getattr(model, "model_spec", None)
    preset, overrides = (spec.preset, spec.overrides) if isinstance(spec, ModelSpec) else (None, {})
    # the overrides as the recorded config holds them (a caller's config may reset one)
    overrides = {key: getattr(config, key, value) for key, value in overrides.items()}
    return {"family": family, "preset": preset, "overrides": to_dict(overrides), "config": to_dict(config)}


def save_model(path: str | Path, model: nn.Module, metadata: dict | None = None, *, config: Any = None) -> Path:
    """Write ``model``'s weights and the record that rebuilds it (atomically; see the module doc).

    A tokenizer attached to the model with a ``spec`` (a CLIP's caption tokenizer) is recorded as
    the metadata's ``"tokenizer"`` unless ``metadata`` names one.

    Args:
        path: ``NAME``, ``NAME.safetensors`` or ``NAME.json``.
        model: a model of a registered family (built by :func:`mmafm.create_model` or not).
        metadata: anything JSON-serialisable kept beside the record (step, tokenizer, metrics).
        config: record this config instead of ``model.config``; it must build the same tensors
            (e.g. the config with a training-only setting reset).

    Returns:
        The ``.safetensors`` path.
    """
    metadata = dict(metadata or {})
    if MODEL_KEY in metadata:
        raise ValueError(f"metadata key {MODEL_KEY!r} is reserved for the model record save_model writes")
    tokenizer_spec = getattr(getattr(model, "tokenizer", None), "spec", None)
    if isinstance(tokenizer_spec, str) and tokenizer_spec and "tokenizer" not in metadata:
        metadata["tokenizer"] = tokenizer_spec
    return save_checkpoint(path, model.state_dict(), {MODEL_KEY: _model_record(model, config), **metadata})


def _families(family: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if family is None:
        return None
    return (family,) if isinstance(family, str) else tuple(family)


def _model_family_in(path: str | Path) -> str | None:
    """The family a model checkpoint records, or None for anything else (no file, no record)."""
    weights_path, meta_path = checkpoint_paths(path)
    if Path(path).suffix not in ("", ".safetensors", ".json") or not weights_path.is_file() or not meta_path.is_file():
        return None
    try:
        record = json.loads(meta_path.read_text()).get(MODEL_KEY)
    except (json.JSONDecodeError, AttributeError):
        return None
    return record.get("family") if isinstance(record, dict) else None


def _manifest_outputs(stage_dir: Path) -> dict[str, str]:
    from mmafm.stages.base import ManifestError, read_manifest

    try:
        return read_manifest(stage_dir).get("outputs", {})
    except ManifestError as err:
        raise CheckpointError(str(err)) from err


def model_outputs(stage_dir: str | Path) -> dict[str, str]:
    """``{output name: family}`` of a finished stage's outputs that are model checkpoints."""
    return _model_families(_manifest_outputs(Path(stage_dir)))


def _model_families(outputs: dict[str, str]) -> dict[str, str]:
    return {name: family for name, family in ((n, _model_family_in(v)) for n, v in outputs.items()) if family}


def _stage_model_path(stage_dir: Path, output: str | None, families: tuple[str, ...] | None) -> Path:
    """The checkpoint a stage's manifest names: ``output``, else the one model output of the
    wanted families, else the main one (named ``checkpoint`` or ``*_checkpoint``)."""
    outputs = _manifest_outputs(stage_dir)
    found = _model_families(outputs)
    if output is not None:
        if output not in found:
            what = f"is {outputs[output]!r}, not a model checkpoint" if output in outputs else "is not in its manifest"
            raise CheckpointError(f"stage {stage_dir}: output {output!r} {what}; its model outputs: {found}")
        return Path(outputs[output])
    candidates = [name for name, family in found.items() if families is None or family in families]
    if len(candidates) > 1:
        main = [name for name in candidates if name == "checkpoint" or name.endswith("_checkpoint")]
        candidates = main if len(main) == 1 else candidates
    if len(candidates) != 1:
        wanted = f" of family {'/'.join(families)}" if families else ""
        raise CheckpointError(f"stage {stage_dir}: {len(candidates)} model outputs{wanted} in its manifest "
                              f"(model outputs: {found}); pick one with output=NAME")
    return Path(outputs[candidates[0]])


def _shape_report(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """One line per tensor that the model and the file disagree on (shape, missing, unexpected)."""
    own = model.state_dict()
    lines = [
        f"tensor {name!r}: expected shape {tuple(own[name].shape)}, found {tuple(tensor.shape)}"
        for name, tensor in tensors.items()
        if name in own and own[name].shape != tensor.shape
    ]
    lines += [f"tensor {name!r}: expected shape {tuple(own[name].shape)}, found none (missing)"
              for name in own if name not in tensors]
    lines += [f"tensor {name!r}: not in the model, found shape {tuple(tensor.shape)}"
              for name, tensor in tensors.items() if name not in own]
    return lines


def _stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The one floating dtype of a checkpoint's tensors, None if mixed or none."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _attach_caption_tokenizer(model: nn.Module, spec: str, path: Path) -> None:
    """A CLIP gets back the caption tokenizer it was trained with (so ``encode_text(["..."])``
    works); an unloadable spec is a warning and ``tokenizer = None`` (pass token ids then)."""
    from mmafm.tokenizer import load_caption_tokenizer

    try:
        model.tokenizer = load_caption_tokenizer(spec, model.config.text.context_length)
    except (OSError, ValueError, ImportError) as err:
        warnings.warn(f"CLIP {path}: tokenizer {spec!r} not loadable ({err}); pass token ids", stacklevel=3)


def load_model(
    source: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    family: str | Sequence[str] | None = None,
    output: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """Rebuild the model of a :func:`save_model` checkpoint (or a finished stage) with its weights.

    Args:
        source: a model checkpoint (``NAME``, ``NAME.safetensors`` or ``NAME.json``) or a finished
            stage directory. A stage's manifest may name several models (``01_clip_pretrain``:
            ``clip_checkpoint`` and ``image_tower``): ``output`` names the one to load; without
            it, the one model output of ``family`` when that singles one out, else the stage's
            main model -- the output called ``checkpoint`` or ``*_checkpoint`` (the full CLIP).
        device: where the model is built and the tensors are read to.
        dtype: floating dtype of the returned model; None = the dtype the weights were saved in.
        family: the family (or families, e.g. ``("text", "ptmoe")``) the caller expects; a
            checkpoint of another family is a :class:`CheckpointError`.
        output: the stage output to load (see ``source``).
        overrides: config fields replacing the saved ones before the weights load: settings that
            change no tensor shape, e.g. ``{"mask_ratio": 0.5}`` or ``{"drop_path_rate": 0.1}`` to
            fine-tune an image tower with FLIP masking / stochastic depth again (its checkpoint is
            saved without FLIP masking). A field that changes a shape is the usual shape error.

    Returns:
        The model in eval mode, carrying ``model_spec``; a CLIP also gets its caption tokenizer
        back (``model.tokenizer``) when the recorded spec loads.

    Raises:
        CheckpointError: missing or corrupt file, a checkpoint without a model record, another
            family than ``family``, a stage output that is not a model, or tensors that do not fit
            the recorded config (each named with its expected and found shape).
    """
    from mmafm.config import ConfigError
    from mmafm.registry import ModelSpec, UnknownModelError, build_from_config

    families = _families(family)
    source = Path(source)
    path = _stage_model_path(source, output, families) if source.is_dir() else source
    weights_path, meta_path = checkpoint_paths(path)
    tensors, metadata = load_checkpoint(path, device=str(device))
    record = metadata.get(MODEL_KEY)
    if not isinstance(record, dict) or not {"family", "config"} <= set(record):
        raise CheckpointError(
            f"{weights_path}: its metadata {meta_path} holds no model record (key {MODEL_KEY!r} with family "
            f"and config); it was not written by mmafm.save_model (metadata keys: {sorted(metadata)})"
        )
    if families is not None and record["family"] not in families:
        raise CheckpointError(f"{weights_path} holds a {record['family']!r} model, expected family "
                              f"{' or '.join(repr(f) for f in families)}")
    config = {**record["config"], **(overrides or {})}
    try:
        with torch.device(device):
            model = build_from_config(record["family"], config, source=f"{meta_path} model config")
    except (ConfigError, UnknownModelError, TypeError, ValueError) as err:
        raise CheckpointError(f"{weights_path}: cannot rebuild its model from {meta_path}: {err}") from err
    if metadata.get("compression"):  # packed codes + tables (mmafm.compress.storage)
        from mmafm.compress.storage import apply_layout

        apply_layout(model, metadata["compression"], source=meta_path)
    mismatch = _shape_report(model, tensors)
    if mismatch:
        raise CheckpointError(
            f"checkpoint {weights_path} does not fit the {record['family']} model its metadata describes "
            f"({meta_path}): " + "; ".join(mismatch[:8]) + (f"; ... {len(mismatch) - 8} more" if len(mismatch) > 8 else "")
        )
    target = dtype or _stored_dtype(tensors)
    if target is not None:
        model = model.to(target)
    model.load_state_dict(tensors, strict=True)
    model.model_spec = ModelSpec(record["family"], record.get("preset"),
                                 {**(record.get("overrides") or {}), **(overrides or {})})
    if record["family"] == "clip" and metadata.get("tokenizer"):
        _attach_caption_tokenizer(model, metadata["tokenizer"], weights_path)
    return model.eval()


def load_tokenizer_for(source: str | Path, tokenizer: str | Path | None = None, vocab_size: int | None = None):
    """The :class:`mmafm.tokenizer.Tokenizer` a text or multimodal model was trained with.

    Args:
        source: a finished stage directory (its manifest's ``tokenizer`` output) or a model
            checkpoint (its metadata's ``tokenizer``).
        tokenizer: a ``tokenizer.model`` path that takes precedence over both.
        vocab_size: the model's vocabulary; a tokenizer of another size is an error.

    Raises:
        ConfigError: no tokenizer named or found, or a vocabulary mismatch, naming the file.
    """
    from mmafm.config import ConfigError
    from mmafm.tokenizer import Tokenizer

    source = Path(source)
    if tokenizer is None:
        if source.is_dir():
            tokenizer = _manifest_outputs(source).get("tokenizer")
        else:
            tokenizer = read_metadata(source).get("tokenizer")
    if not tokenizer or not Path(tokenizer).is_file():
        raise ConfigError(f"tokenizer {str(tokenizer)!r} not found; pass the tokenizer.model the model was trained with")
    loaded = Tokenizer.load(tokenizer)
    if vocab_size is not None and loaded.vocab_size != vocab_size:
        raise ConfigError(f"tokenizer {tokenizer} has {loaded.vocab_size} tokens, the model "
                          f"{vocab_size}: pass the tokenizer it was trained with")
    return loaded
