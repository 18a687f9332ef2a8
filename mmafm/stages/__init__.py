"""Training stages: each module here registers one stage (config dataclass + ``run`` function).

A stage module ends with::

    register_stage("02_text_pretrain", TextPretrainConfig, run)

and its notebook ``notebooks/02_text_pretrain.ipynb`` does::

    cfg = make_config("02_text_pretrain", globals())   # the parameters cell's variables
    outputs = run(cfg)
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mmafm.config import ConfigError, from_dict

__all__ = ["register_stage", "get_stage", "list_stages", "make_config", "Stage"]


@dataclass(frozen=True)
class Stage:
    name: str
    config_cls: type
    run: Callable[[Any], dict]
    module: str


_STAGES: dict[str, Stage] = {}


def register_stage(name: str, config_cls: type, run: Callable[[Any], dict]) -> None:
    _STAGES[name] = Stage(name, config_cls, run, run.__module__)


def _load_stages() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def list_stages() -> list[str]:
    _load_stages()
    return sorted(_STAGES)


def get_stage(name: str) -> Stage:
    _load_stages()
    if name not in _STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(sorted(_STAGES))}")
    return _STAGES[name]


def make_config(stage: str, namespace: Mapping[str, Any]) -> Any:
    """Build and validate a stage's config from a notebook's variables (``globals()``).

    Only names that are fields of the stage config are read, so a notebook's imports do not
    interfere; a field missing from the namespace keeps its default. An empty ``out_dir`` means
    an interactive session: outputs go to ``runs/interactive/<stage>``.
    """
    config_cls = get_stage(stage).config_cls
    values = {f.name: namespace[f.name] for f in dataclasses.fields(config_cls) if f.name in namespace}
    config = from_dict(config_cls, values, source=f"notebook {stage} parameters")
    if not config.out_dir:
        config = dataclasses.replace(config, out_dir=f"runs/interactive/{stage}")
    return config
