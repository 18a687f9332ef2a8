"""Compressed checkpoints: packed codes and fp16 tables in safetensors, rebuilt by ``mmafm.load_model``.

:func:`save_compressed` writes a :func:`mmafm.save_model` checkpoint of a compressed model (its
state dict holds each packed module's ``codes`` and ``lut`` / ``scale`` (and ``row_scale``), so the file is smaller by
the bits-per-weight ratio) plus, under the metadata key ``"compression"``, the layout: which
module is packed how. :func:`mmafm.load_model` sees the key, rebuilds the model from its config,
puts empty packed modules where the layout says (:func:`apply_layout`) and loads the tensors
strictly, so a compressed checkpoint loads like any other; a layout that does not fit the model
or a corrupt file is a :class:`~mmafm.checkpoint.CheckpointError` naming the file.

>>> save_compressed("runs/x/model_q4", model, {"step": 100})
>>> model = mmafm.load_model("runs/x/model_q4")     # packed modules back, same logits
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mmafm.checkpoint import CheckpointError, save_model
from mmafm.compress.packed import Packed, PackedEmbedding, PackedLinear

__all__ = ["COMPRESSION_KEY", "compression_layout", "apply_layout", "save_compressed", "load_compressed"]

COMPRESSION_KEY = "compression"
_FIELDS = ("rows", "cols", "bits", "scheme", "group_size", "axis")


def compression_layout(model: nn.Module) -> dict[str, dict]:
    """``{module name: {"kind", "rows", "cols", "bits", "scheme", "group_size", "axis"}}`` of
    every packed module of ``model``."""
    from mmafm.compress.astc import ASTCLinear

    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, ASTCLinear):
            layout[name] = {"kind": "astc_linear", "rows": module.rows, "cols": module.cols}
        elif isinstance(module, Packed):
            kind = "embedding" if isinstance(module, PackedEmbedding) else "linear"
            layout[name] = {"kind": kind, **{field: getattr(module, field) for field in _FIELDS}}
            if module.per_channel_scale:  # recorded only when set, so older layouts read the same
                layout[name]["per_channel_scale"] = True
    return layout


def apply_layout(model: nn.Module, layout: dict, source: str | Path = "the checkpoint") -> None:
    """Replace the modules ``layout`` names by empty packed modules of the recorded shape.

    Raises:
        CheckpointError: a named module that is missing, of another kind or another shape, or a
            malformed record (all naming ``source``).
    """
    from mmafm.compress.astc import ASTCLinear
    from mmafm.compress.palettize import _replace

    if not isinstance(layout, dict):
        raise CheckpointError(f"{source}: compression layout must be a mapping, got {type(layout).__name__}")
    modules = dict(model.named_modules())
    for name, record in layout.items():
        try:
            kind, rows, cols = record["kind"], int(record["rows"]), int(record["cols"])
            settings = {} if kind == "astc_linear" else {field: record[field] for field in ("bits", "scheme", "group_size", "axis")}
            if kind != "astc_linear" and record.get("per_channel_scale"):
                settings["per_channel_scale"] = True
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: malformed compression record for {name!r}: {err!r}") from err
        original = modules.get(name)
        expected = {"linear": nn.Linear, "astc_linear": nn.Linear, "embedding": nn.Embedding}.get(kind)
        if expected is None or not isinstance(original, expected):
            found = "nothing" if original is None else type(original).__name__
            raise CheckpointError(f"{source}: compression layout packs {name!r} as a {kind}, the model has {found} there")
        shape = tuple(original.weight.shape)
        if shape != (rows, cols):
            raise CheckpointError(f"{source}: packed {name!r} is ({rows}, {cols}), the model's weight is {shape}")
        device = original.weight.device
        try:
            if kind == "astc_linear":
                packed = ASTCLinear(cols, rows, device=device)
            elif kind == "linear":
                packed = PackedLinear(cols, rows, device=device, **settings)
            else:
                packed = PackedEmbedding(rows, cols, device=device, **settings)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: bad compression settings for {name!r}: {err}") from err
        _replace(model, name, packed)


def save_compressed(path: str | Path, model: nn.Module, metadata: dict | None = None) -> Path:
    """:func:`mmafm.save_model` of a compressed model with its layout (atomic, like every
    checkpoint). Returns the ``.safetensors`` path.

    Raises:
        ValueError: ``model`` has no packed module (use :func:`mmafm.save_model`).
    """
    layout = compression_layout(model)
    if not layout:
        raise ValueError("save_compressed: the model has no packed modules; use mmafm.save_model")
    return save_model(path, model, {**(metadata or {}), COMPRESSION_KEY: layout})


def load_compressed(path: str | Path, device: str = "cpu") -> nn.Module:
    """:func:`mmafm.load_model` of a compressed checkpoint, checking that it is one."""
    from mmafm.checkpoint import load_model, read_metadata

    if COMPRESSION_KEY not in read_metadata(path):
        raise CheckpointError(f"{path}: not a compressed checkpoint (no {COMPRESSION_KEY!r} metadata)")
    return load_model(path, device=device)
