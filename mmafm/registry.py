"""One registry for every model family: build any preset by name.

A family file registers each preset as a small function returning its config dataclass (timm's
``@register_model`` pattern, litgpt's "presets as data"), together with the module class that
builds a model from that config::

    @register_model("vitdet_large_patch16", builder=VisionTransformerDet)
    def vitdet_large_patch16() -> VitDetConfig:
        return VitDetConfig(depth=24, width=1024, ...)

Users then call ``mmafm.create_model(name, **overrides)``, ``mmafm.get_config(name)`` and
``mmafm.list_models()``.

Every model :func:`create_model` returns carries the :class:`ModelSpec` it was built from (family,
preset, overrides) as ``model.model_spec`` -- timm's ``pretrained_cfg`` idea: the registry sets
it, no model file knows about it. :func:`mmafm.save_model` records that spec and the model's full
config next to the weights, and :func:`mmafm.load_model` rebuilds the model with
:func:`build_from_config`; a model not built from a preset (upcycled, imported) is found a family
by its class (:func:`family_of`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = [
    "register_model",
    "create_model",
    "get_config",
    "list_models",
    "model_family",
    "ModelSpec",
    "family_of",
    "build_from_config",
    "preset_table",
    "TEXT_FAMILIES",
    "UnknownModelError",
]

TEXT_FAMILIES = ("text", "ptmoe")  # the decoder families; preset_table adds its text columns for them


class UnknownModelError(KeyError):
    """Raised for a preset name that no family registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


@dataclass(frozen=True)
class _Preset:
    name: str
    config_fn: Callable[[], Any]
    builder: Callable[[Any], nn.Module]
    family: str


_PRESETS: dict[str, _Preset] = {}


def register_model(name: str, builder: Callable[[Any], nn.Module], family: str | None = None):
    """Decorator registering a preset function ``() -> config`` under ``name``."""

    def wrap(config_fn: Callable[[], Any]) -> Callable[[], Any]:
        if name in _PRESETS and _PRESETS[name].config_fn.__qualname__ != config_fn.__qualname__:
            raise ValueError(f"model preset {name!r} registered twice")
        fam = family or config_fn.__module__.rsplit(".", 1)[-1]
        _PRESETS[name] = _Preset(name, config_fn, builder, fam)
        return config_fn

    return wrap


def _load_families() -> None:
    """Import every module of ``mmafm.models`` so their presets register themselves."""
    import importlib
    import pkgutil

    import mmafm.models

    for info in pkgutil.iter_modules(mmafm.models.__path__):
        importlib.import_module(f"mmafm.models.{info.name}")


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Sorted preset names matching a glob ``pattern`` (and optionally a family)."""
    _load_families()
    return sorted(
        name
        for name, preset in _PRESETS.items()
        if fnmatch.fnmatch(name, pattern) and (family is None or preset.family == family)
    )


def _preset(name: str) -> _Preset:
    _load_families()
    if name not in _PRESETS:
        close = [n for n in _PRESETS if name.split("_")[0] in n][:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise UnknownModelError(
            f"unknown model preset {name!r}{hint}. Known presets: see mmafm.list_models()"
        )
    return _PRESETS[name]


def _from_file(name: str) -> tuple[str, dict]:
    """A model YAML (``preset: NAME`` + ``overrides: {...}``) -> (preset name, overrides)."""
    from mmafm.config import ConfigError, load_yaml

    data = load_yaml(name)
    unknown = sorted(set(data) - {"preset", "overrides", "description"})
    if unknown or "preset" not in data:
        raise ConfigError(
            f"{name}: a model config has keys 'preset' (required), 'overrides', 'description'; "
            f"got {sorted(data)}"
        )
    return data["preset"], dict(data.get("overrides") or {})


def _is_file_name(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def _resolve(name: str, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(preset name, overrides)`` of a preset name or a model YAML plus call overrides."""
    if _is_file_name(name):
        name, file_overrides = _from_file(name)
        overrides = {**file_overrides, **overrides}
    return name, overrides


def get_config(name: str, **overrides: Any) -> Any:
    """The config dataclass of preset ``name`` with ``overrides`` applied and validated.

    ``name`` may also be a YAML file under ``configs/models/`` naming a preset and overrides.
    """
    name, overrides = _resolve(name, overrides)
    config = _preset(name).config_fn()
    if not overrides:
        return config
    from mmafm.config import coerce_fields

    values = coerce_fields(type(config), overrides, source=f"model preset {name!r}")
    return dataclasses.replace(config, **values)


@dataclass(frozen=True)
class ModelSpec:
    """How a model was built, attached by :func:`create_model` as ``model.model_spec``."""

    family: str  # the registry family, e.g. "text", "clip", "vitdet"
    preset: str | None = None  # the preset name; None for a model not built from a preset (upcycled, imported)
    overrides: dict[str, Any] = field(default_factory=dict)  # config fields set on top of the preset


def create_model(
    name: str, device: str | torch.device | None = None, **overrides: Any
) -> nn.Module:
    """Build preset ``name`` (or a model YAML); ``device="meta"`` allocates nothing.

    The model carries ``model.model_spec`` (:class:`ModelSpec`: family, preset, overrides).
    """
    config = get_config(name, **overrides)
    preset_name, all_overrides = _resolve(name, overrides)
    preset = _preset(preset_name)
    if device is None:
        model = preset.builder(config)
    else:
        with torch.device(device):
            model = preset.builder(config)
    model.model_spec = ModelSpec(preset.family, preset.name, dict(all_overrides))
    return model


def _family_types(family: str) -> tuple[Callable[[Any], nn.Module], type]:
    """The ``(builder, config class)`` every preset of ``family`` shares."""
    _load_families()
    kinds = {(p.builder, type(p.config_fn())) for p in _PRESETS.values() if p.family == family}
    if not kinds:
        families = sorted({p.family for p in _PRESETS.values()})
        raise UnknownModelError(f"unknown model family {family!r}; known families: {', '.join(families)}")
    if len(kinds) > 1:
        raise ValueError(f"model family {family!r} has several builders {sorted(b.__qualname__ for b, _ in kinds)}: "
                         "a family must build one class from one config class")
    return next(iter(kinds))


def family_of(model: nn.Module) -> str:
    """The family of ``model``: its :class:`ModelSpec`'s, else the family whose builder is its class.

    Raises:
        TypeError: the model's class is no registered family's builder.
    """
    spec = getattr(model, "model_spec", None)
    if isinstance(spec, ModelSpec):
        return spec.family
    _load_families()
    families = sorted({p.family for p in _PRESETS.values() if p.builder is type(model)})
    if len(families) != 1:
        raise TypeError(f"{type(model).__qualname__} is not the model class of one registered family "
                        f"(found {families or 'none'}); register a preset with builder={type(model).__name__}")
    return families[0]


def build_from_config(family: str, config: dict[str, Any], source: str = "<config>") -> nn.Module:
    """Build a model of ``family`` from a full config dict (as :func:`mmafm.config.to_dict` wrote
    it); unknown keys, wrong types and out-of-range values are a ConfigError naming ``source``."""
    from mmafm.config import from_dict

    builder, config_cls = _family_types(family)
    return builder(from_dict(config_cls, config, source=source))


def model_family(name: str) -> str:
    """The family (module) a preset belongs to, e.g. ``"vitdet"`` or ``"text"``."""
    return _preset(name).family


def _family_set(family: str | Sequence[str] | None) -> set[str] | None:
    if family is None:
        return None
    return {family} if isinstance(family, str) else set(family)


def preset_table(
    pattern: str = "*",
    include_tiny: bool = False,
    family: str | Sequence[str] | None = None,
    seq_len: int = 4096,
    dtype: str = "bfloat16",
) -> str:
    """A Markdown table of presets, each built on the meta device.

    Every table has parameter counts. When ``family`` selects decoder families only (``"text"``,
    ``"ptmoe"`` or :data:`TEXT_FAMILIES`) the rows are the text table of ``docs/text_model.md``:
    shape, parameter counts (all, non-embedding, active per token) and KV-cache bytes of one
    sequence of ``seq_len`` tokens in ``dtype`` (closed form, :func:`~mmafm.models.text.kv_cache_bytes`).

    Args:
        pattern: glob over preset names.
        include_tiny: keep the ``*_tiny`` presets.
        family: one family or several; None = all.
    """
    families = _family_set(family)
    names = [
        name for name in list_models(pattern)
        if (include_tiny or not name.endswith("_tiny")) and (families is None or model_family(name) in families)
    ]
    if families is not None and families <= set(TEXT_FAMILIES):
        return _text_preset_table(names, seq_len, dtype)
    rows = ["| preset | family | parameters |", "| --- | --- | ---: |"]
    for name in names:
        model = create_model(name, device="meta")
        count = sum(p.numel() for p in model.parameters())
        rows.append(f"| `{name}` | {model_family(name)} | {count:,} ({count / 1e9:.3g}B) |")
    return "\n".join(rows)


def _text_preset_table(names: list[str], seq_len: int, dtype: str) -> str:
    """The decoder columns of :func:`preset_table` for ``names`` (text / PT-MoE presets)."""
    from mmafm.models.text import kv_cache_bytes

    rows = [
        "| preset | layers | width | heads / KV | FFN | experts (top-k) | tracks | vocab | params | "
        "non-embedding | active / token | KV bytes / token (first token) | KV bytes / token "
        f"past {seq_len} | KV cache @ {seq_len} ({dtype}) | int8 KV cache |",
        "|" + "---|" * 15,
    ]
    for name in names:
        model = create_model(name, device="meta")
        c = model.config
        layers = f"{c.kv_share_segments[0]}+{c.kv_share_segments[1]}" if c.kv_share_segments else str(c.n_layers)
        experts = f"{c.num_experts} ({c.top_k}) every {c.moe_every}" if c.num_experts else "-"
        full = kv_cache_bytes(c, seq_len, 1, dtype)
        per_token = kv_cache_bytes(c, 1, 1, dtype)  # one token: every layer holds one slot
        growth = kv_cache_bytes(c, seq_len + 1, 1, dtype) - full  # windowed layers no longer grow
        int8 = kv_cache_bytes(c, seq_len, 1, dtype, quantized=True)
        rows.append(
            f"| `{name}` | {layers} | {c.dim} | {c.n_heads} / {c.n_kv_heads} x {c.head_dim} | {c.ffn_dim} | "
            f"{experts} | {c.num_tracks} | {c.vocab_size:,} | {model.num_params():,} | "
            f"{model.num_params(non_embedding=True):,} | {model.num_active_params():,} | {per_token:,} | {growth:,} | "
            f"{full / 2**20:,.1f} MiB | {int8 / 2**20:,.1f} MiB |"
        )
        del model
    return "\n".join(rows)
