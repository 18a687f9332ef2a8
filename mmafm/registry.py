"""One registry for every model family: build any preset by name.

A family file registers each preset as a small function returning its config dataclass (timm's
``@register_model`` pattern, litgpt's "presets as data"), together with the module class that
builds a model from that config::

    @register_model("vitdet_large_patch16", builder=VisionTransformerDet)
    def vitdet_large_patch16() -> VitDetConfig:
        return VitDetConfig(depth=24, width=1024, ...)

Users then call ``mmafm.create_model(name, **overrides)``, ``mmafm.get_config(name)`` and
``mmafm.list_models()``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["register_model", "create_model", "get_config", "list_models", "UnknownModelError"]


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


def get_config(name: str, **overrides: Any) -> Any:
    """The config dataclass of preset ``name`` with ``overrides`` applied and validated.

    ``name`` may also be a YAML file under ``configs/models/`` naming a preset and overrides.
    """
    if _is_file_name(name):
        name, file_overrides = _from_file(name)
        overrides = {**file_overrides, **overrides}
    config = _preset(name).config_fn()
    if not overrides:
        return config
    from mmafm.config import coerce_fields

    values = coerce_fields(type(config), overrides, source=f"model preset {name!r}")
    return dataclasses.replace(config, **values)


def create_model(
    name: str, device: str | torch.device | None = None, **overrides: Any
) -> nn.Module:
    """Build preset ``name`` (or a model YAML); ``device="meta"`` allocates nothing."""
    config = get_config(name, **overrides)
    preset = _preset(_from_file(name)[0] if _is_file_name(name) else name)
    if device is None:
        return preset.builder(config)
    with torch.device(device):
        return preset.builder(config)


def model_family(name: str) -> str:
    """The family (module) a preset belongs to, e.g. ``"vitdet"`` or ``"text"``."""
    return _preset(name).family


def preset_table(pattern: str = "*", include_tiny: bool = False) -> str:
    """A Markdown table of presets and their parameter counts, each built on the meta device."""
    rows = ["| preset | family | parameters |", "| --- | --- | ---: |"]
    for name in list_models(pattern):
        if name.endswith("_tiny") and not include_tiny:
            continue
        model = create_model(name, device="meta")
        count = sum(p.numel() for p in model.parameters())
        rows.append(f"| `{name}` | {model_family(name)} | {count:,} ({count / 1e9:.3g}B) |")
    return "\n".join(rows)
