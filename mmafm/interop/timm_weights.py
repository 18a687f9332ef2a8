"""Public vision weights into mmafm's encoders, by key mapping; and mmafm's encoders in timm.

Sources understood (REFERENCE.md, "Vision encoders": ViT-g/14 has the shape of open_clip's
``ViT-g-14`` and timm's ``vit_giant_patch14_*``; ViTDet-L that of SAM's ViT-L image encoder):

* timm ``VisionTransformer`` state dicts (e.g. ``vit_giant_patch14_clip_224``): names already
  match :class:`mmafm.models.vit.VisionTransformer`.
* open_clip visual towers (``ViT-g-14``): a full CLIP state dict (``visual.*`` keys) or the
  tower's own (``conv1.weight``, ``transformer.resblocks.*``, ``proj``); converted like timm's
  ``_convert_openai_clip``.
* timm ``samvit_*`` state dicts and original SAM checkpoints (``image_encoder.*``), into
  :class:`mmafm.models.vitdet.VisionTransformerDet`.

Position embeddings and relative-position tables are resampled to the target model's grid
(bicubic / linear, as timm and SAM do at run time), so a 224- or 1024-pixel checkpoint loads into a
448-pixel preset. Missing and unexpected keys are reported by name; shape mismatches are errors.

Every vision preset is also registered with timm as ``mmafm_<preset>`` (see
:func:`register_timm_entrypoint`), so ``timm.create_model("mmafm_vitdet_large_patch16_rw")`` works
once ``mmafm`` is imported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmafm.layers.patch import resample_pos_embed, resample_pos_embed_tokens

__all__ = [
    "LoadReport",
    "WeightLoadError",
    "detect_format",
    "convert_open_clip_visual",
    "convert_sam_image_encoder",
    "load_timm_weights",
    "register_timm_entrypoint",
]


class WeightLoadError(ValueError):
    """A checkpoint that does not fit the model (names the keys and expected shapes)."""


@dataclass
class LoadReport:
    """What :func:`load_timm_weights` did."""

    source: str  # detected format: "timm", "open_clip" or "sam"
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys (mmafm names) the model lacks
    resampled: list[str] = field(default_factory=list)  # keys interpolated to the model's grid
    ignored: list[str] = field(default_factory=list)  # keys of other SAM/CLIP parts, skipped on purpose

    def __str__(self) -> str:
        return (
            f"loaded {self.source} weights: missing={self.missing}, unexpected={self.unexpected}, "
            f"resampled={self.resampled}, ignored {len(self.ignored)} keys of other towers"
        )


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"open_clip"``, ``"sam"`` or ``"timm"`` from the key names of a state dict."""
    keys = set(state_dict)
    if "conv1.weight" in keys or "visual.conv1.weight" in keys:
        return "open_clip"
    if "image_encoder.patch_embed.proj.weight" in keys:
        return "sam"
    return "timm"


_OPEN_CLIP_SWAPS = (
    ("conv1", "patch_embed.proj"),
    ("positional_embedding", "pos_embed"),
    ("transformer.resblocks.", "blocks."),
    ("ln_pre", "norm_pre"),
    ("ln_post", "norm"),
    ("ln_", "norm"),
    ("in_proj_", "qkv."),
    ("out_proj", "proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


def convert_open_clip_visual(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """open_clip visual tower -> mmafm/timm ViT names; returns (converted, ignored keys).

    ``proj`` (width x embed) becomes the head ``head.weight`` (transposed) with a zero bias.
    """
    full_clip = "visual.conv1.weight" in state_dict
    out, ignored = {}, []
    for key, value in state_dict.items():
        if full_clip:
            if not key.startswith("visual."):
                ignored.append(key)
                continue
            key = key[len("visual.") :]
        for old, new in _OPEN_CLIP_SWAPS:
            key = key.replace(old, new)
        if key == "proj":
            out["head.weight"] = value.t()
            out["head.bias"] = value.new_zeros(value.shape[1])
            continue
        if key == "class_embedding":
            key, value = "cls_token", value.reshape(1, 1, -1)
        elif key == "pos_embed":
            value = value.unsqueeze(0)
        out[key] = value
    return out, ignored


def convert_sam_image_encoder(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """SAM checkpoint or timm ``samvit`` state dict -> mmafm ViTDet names; (converted, ignored)."""
    sam_checkpoint = "image_encoder.patch_embed.proj.weight" in state_dict
    out, ignored = {}, []
    for key, value in state_dict.items():
        if sam_checkpoint:
            if not key.startswith("image_encoder."):
                ignored.append(key)  # prompt encoder / mask decoder
                continue
            key = key[len("image_encoder.") :].replace("mlp.lin1", "mlp.fc1").replace("mlp.lin2", "mlp.fc2")
        out[key.replace("head.fc.", "head.")] = value
    return out, ignored


def _resample_rel_pos(table: torch.Tensor, rows: int) -> torch.Tensor:
    """Linearly resample a ``(2L - 1, D)`` relative-position table to ``rows`` rows (SAM's way)."""
    resized = F.interpolate(table.float().t()[None], size=rows, mode="linear")[0].t()
    return resized.to(table.dtype)


def _fit_to_model(
    converted: dict[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Resample grid-dependent tensors to the model's shapes; shape mismatches are errors."""
    expected = model.state_dict(keep_vars=True)
    resampled, mismatched = [], []
    for key, value in list(converted.items()):
        if key not in expected or tuple(value.shape) == tuple(expected[key].shape):
            continue
        target = tuple(expected[key].shape)
        if key == "pos_embed" and value.ndim == 4 and len(target) == 4:  # ViTDet (1, G, G, C)
            converted[key] = resample_pos_embed(value, target[1:3])
        elif key == "pos_embed" and value.ndim == 3 and len(target) == 3 and value.shape[-1] == target[-1]:
            prefix = getattr(model, "num_prefix_tokens", 0)
            source_prefix = 1 if "cls_token" in converted else 0
            if prefix != source_prefix:
                mismatched.append(f"{key}: checkpoint has {source_prefix} prefix rows, model {prefix}")
                continue
            side = int(round((target[1] - prefix) ** 0.5))
            converted[key] = resample_pos_embed_tokens(value, (side, side), prefix)
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.shape[1:] == target[1:]:
            converted[key] = _resample_rel_pos(value, target[0])
        else:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model expects {target}")
            continue
        resampled.append(key)
    if mismatched:
        raise WeightLoadError("shape mismatch loading weights: " + "; ".join(mismatched))
    return converted, resampled


def load_timm_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = False,
    assign: bool = False,
) -> LoadReport:
    """Load a timm / open_clip / SAM vision state dict into an mmafm ViT or ViTDet.

    Args:
        model: :class:`~mmafm.models.vit.VisionTransformer` or
            :class:`~mmafm.models.vitdet.VisionTransformerDet`.
        state_dict: The source weights (format detected from the key names).
        strict: Raise :class:`WeightLoadError` naming any missing or unexpected keys.
        assign: Assign the tensors instead of copying (for a model built on ``meta``).

    Returns:
        A :class:`LoadReport` naming missing, unexpected, resampled and ignored keys.
    """
    source = detect_format(state_dict)
    if source == "open_clip":
        converted, ignored = convert_open_clip_visual(state_dict)
    else:
        converted, ignored = convert_sam_image_encoder(state_dict)
    converted, resampled = _fit_to_model(converted, model)
    model_keys = set(model.state_dict())
    unexpected = sorted(set(converted) - model_keys)
    missing = sorted(model_keys - set(converted))
    if strict and (missing or unexpected):
        raise WeightLoadError(
            f"{source} weights do not match {type(model).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    loadable = {k: v for k, v in converted.items() if k in model_keys}
    model.load_state_dict(loadable, strict=False, assign=assign)
    return LoadReport(source, missing, unexpected, sorted(resampled), ignored)


def register_timm_entrypoint(preset: str) -> str:
    """Register mmafm preset ``preset`` with timm as ``mmafm_<preset>``; returns that name.

    ``timm.create_model("mmafm_<preset>", **overrides)`` then builds
    ``mmafm.create_model(preset, **overrides)``. There are no hosted weights: ``pretrained=True``
    is an error pointing to :func:`load_timm_weights`.
    """
    import timm.models

    name = f"mmafm_{preset}"

    def entrypoint(
        pretrained: bool = False,
        pretrained_cfg=None,
        pretrained_cfg_overlay=None,
        cache_dir=None,
        **overrides,
    ) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"{name} has no hosted weights (pretrained=False expected); build it and load a "
                "timm/open_clip/SAM state dict with mmafm.interop.timm_weights.load_timm_weights"
            )
        from mmafm.registry import create_model

        return create_model(preset, **overrides)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"mmafm preset {preset!r} (see mmafm.get_config({preset!r}))."
    setattr(sys.modules[__name__], name, entrypoint)
    if name not in timm.models.list_models(name):
        timm.models.register_model(entrypoint)
    return name
