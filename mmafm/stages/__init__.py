"""Training stages: each module here registers one stage (config dataclass + ``run`` function).

A stage module ends with::

    register_stage("02_text_pretrain", TextPretrainConfig, run)

and its notebook ``notebooks/02_text_pretrain.ipynb`` does::

    cfg = make_config("02_text_pretrain", globals())   # the parameters cell's variables
    outputs = run(cfg)
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from mmafm.config import ConfigError, from_dict

__all__ = [
    "register_stage",
    "get_stage",
    "list_stages",
    "make_config",
    "Stage",
    "injected_parameter_names",
    "check_parameter_names",
    "interactive_out_dir",
]

PARAMETERS_COMMENT = "# Parameters"  # first line of papermill's injected cell and of our parameters cell


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


def injected_parameter_names(namespace: Mapping[str, Any]) -> list[str]:
    """Names assigned by the notebook's parameter cells that ran in this kernel, in order.

    Papermill injects its parameters as a cell after the ``parameters`` cell whose first line is
    ``# Parameters``, and passes unknown names through with only a warning; the stage notebooks'
    own ``parameters`` cell starts with ``# Parameters (...)``. IPython keeps the source of every
    executed cell in ``In``, so the names can be read back from there. Empty outside IPython.
    """
    history = namespace.get("In")
    if not isinstance(history, list):
        return []
    names: list[str] = []
    for source in history:
        if not isinstance(source, str) or not source.lstrip().startswith(PARAMETERS_COMMENT):
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            names += [t.id for t in targets if isinstance(t, ast.Name) and t.id not in names]
    return names


def check_parameter_names(stage: str, names: list[str]) -> None:
    """Fail on a parameter name that is not a field of the stage's config, naming the closest one.

    Raises:
        ConfigError: e.g. ``unknown parameter 'max_stpes' (did you mean 'max_steps'?)``.
    """
    fields = [f.name for f in dataclasses.fields(get_stage(stage).config_cls)]
    unknown = [name for name in names if name not in fields]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, fields, n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise ConfigError(
        f"notebook {stage} parameters: unknown parameter(s) {', '.join(hints)}; the parameters are the "
        f"fields of {get_stage(stage).config_cls.__name__}: {', '.join(sorted(fields))}"
    )


def interactive_out_dir(stage: str, config: Any) -> Path:
    """Where a notebook run with ``out_dir = ""`` writes: ``runs/interactive/<stage>/<config hash>``.

    The hash (:func:`mmafm.stages.base.config_hash`) covers every value but ``out_dir``: running
    the same parameters again resumes or reuses that folder, other parameters get their own.
    """
    from mmafm.runner import project_root
    from mmafm.stages.base import config_hash

    return project_root() / "runs" / "interactive" / stage / config_hash(config)


def make_config(stage: str, namespace: Mapping[str, Any]) -> Any:
    """Build and validate a stage's config from a notebook's variables (``globals()``).

    Only names that are fields of the stage config are read, so a notebook's imports do not
    interfere; a field missing from the namespace keeps its default. A name that papermill
    injected (``papermill ... -p max_stpes 5``) but that is not a field is an error naming the
    closest field. An empty ``out_dir`` means an interactive session: outputs go to
    ``runs/interactive/<stage>/<config hash>`` (:func:`interactive_out_dir`). Input paths must
    exist, and a folder holding a checkpoint made under another config is refused
    (:func:`mmafm.stages.base.check_resume`).
    """
    from mmafm.stages.base import check_input_paths, check_resume

    config_cls = get_stage(stage).config_cls
    check_parameter_names(stage, injected_parameter_names(namespace))
    values = {f.name: namespace[f.name] for f in dataclasses.fields(config_cls) if f.name in namespace}
    config = from_dict(config_cls, values, source=f"notebook {stage} parameters")
    if not config.out_dir:
        config = dataclasses.replace(config, out_dir=str(interactive_out_dir(stage, config)))
    check_input_paths(config, source=f"notebook {stage}")
    check_resume(config.out_dir, config)
    return config
