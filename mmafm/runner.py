"""Run stage notebooks with papermill, alone (``mmafm run``) or as a pipeline (``mmafm pipeline run``).

Each stage run lives in ``runs/<run-id>/<stage>/``::

    <stage>.ipynb      the executed notebook (kept on failure, for reading the traceback)
    config.yaml        the resolved stage config the notebook received
    metrics.jsonl      written by the stage
    checkpoints/       safetensors + JSON metadata
    figures/           PNGs
    manifest.json      written last by the stage: its outputs; marks the stage complete

A pipeline passes outputs along: ``inputs: {tokens_dir: 00_data.tokens_dir}`` sets the stage
parameter ``tokens_dir`` from the ``tokens_dir`` output in the manifest of stage ``00_data`` of the
same run; ``<stage>.out_dir`` is the finished stage's folder (what :func:`mmafm.load_model` and
most model inputs also accept). A complete stage is skipped on re-run unless forced; an
interrupted one is executed again in the same folder, where the trainer resumes from its last
checkpoint.

Nothing runs before everything that can be checked is: every stage's config of a pipeline
(its YAML, ``params``, ``-p STAGE.key=value``; an output of a stage that has not run yet stands
in as a placeholder), the stage names ``-p`` and ``--only`` refer to, the input paths that must
exist (config fields with ``metadata["path"]``, :func:`mmafm.stages.base.check_input_paths`), and
that a folder holding an unfinished run gets the same config it was started with
(:func:`mmafm.stages.base.check_resume`). ``--seeds`` runs the whole pipeline once per seed into
``runs/<run-id>-seed<k>/`` and writes the summary numbers' mean and spread to
``runs/<run-id>/RESULTS.md`` (:func:`mmafm.report.write_seed_report`).

A pipeline entry may also name a parameterized notebook that is no registered stage
(``- notebook: reproduce_distillation`` with ``params:`` and ``inputs:``, e.g. the
``notebooks/reproduce_*.ipynb``): its parameter names are those of its ``parameters`` cell (an
unknown one is an error naming the closest), each value must have its default's type, the
runner sets ``out_dir`` to ``runs/<run-id>/<notebook>/`` and, when papermill finishes it, writes
``manifest.json`` there (outputs ``out_dir``, ``notebook``, the JSON files the notebook wrote;
summary: their top-level numbers) so a re-run skips it (:func:`run_notebook`).
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import difflib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mmafm.config import ConfigError, dump_yaml, from_dict, load_yaml, to_dict
from mmafm.io import atomic_write_json, atomic_write_text, remove_temp_files
from mmafm.stages import get_stage
from mmafm.stages.base import (
    CONFIG_FILE,
    MANIFEST,
    ManifestError,
    check_input_paths,
    check_resume,
    config_differences,
    has_checkpoint,
    read_manifest,
)
from mmafm.train.checkpointing import remove_incomplete_checkpoints

__all__ = [
    "StageFailed",
    "PipelineStage",
    "PipelineConfig",
    "project_root",
    "notebook_path",
    "resolve_stage_config",
    "run_stage",
    "run_notebook",
    "notebook_parameters",
    "resolve_notebook_parameters",
    "run_pipeline",
    "load_pipeline",
    "plan_pipeline",
    "parse_seeds",
]

KERNEL_NAME = "mmafm"


class StageFailed(RuntimeError):
    """A stage notebook raised; the message names notebook, cell and error."""


def project_root() -> Path:
    """The workspace root (holds ``notebooks/`` and ``configs/``); ``MMAFM_ROOT`` overrides."""
    if "MMAFM_ROOT" in os.environ:
        return Path(os.environ["MMAFM_ROOT"]).resolve()
    return Path(__file__).resolve().parents[1]


def notebook_path(stage: str) -> Path:
    path = project_root() / "notebooks" / f"{stage}.ipynb"
    if not path.is_file():
        raise ConfigError(f"stage {stage!r} has no notebook at {path}")
    return path


def resolve_stage_config(
    stage: str,
    config_file: str | Path | None = None,
    params: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
) -> Any:
    """Stage config = dataclass defaults <- YAML file <- params; validated; ``out_dir`` set."""
    config_cls = get_stage(stage).config_cls
    values: dict[str, Any] = {}
    source = f"stage {stage}"
    if config_file:
        values.update(load_yaml(config_file))
        source = str(config_file)
    if params:
        values.update(params)
        source += " (with overrides)"
    if out_dir is not None:
        values["out_dir"] = str(Path(out_dir).resolve())
    return from_dict(config_cls, values, source=source)


def _is_complete(stage_dir: Path) -> bool:
    try:
        read_manifest(stage_dir)
    except ManifestError:
        return False
    return True


def _describe_failure(err: Exception, notebook: Path, executed: Path) -> str:
    """Name the failing cell by its index in the *source* notebook and its first line."""
    import nbformat

    ename = getattr(err, "ename", type(err).__name__)
    evalue = getattr(err, "evalue", str(err))
    where = "a cell"
    try:
        ran = nbformat.read(executed, as_version=4).cells
        source_cells = [c.source for c in nbformat.read(notebook, as_version=4).cells]
        failing = next(
            (c.source for c in ran if any(o.get("output_type") == "error" for o in c.get("outputs", []))),
            None,
        )
        if failing in source_cells:
            first_line = failing.strip().splitlines()[0] if failing.strip() else ""
            where = f"cell {source_cells.index(failing)} ({first_line[:60]!r})"
    except (OSError, IndexError, TypeError, ValueError):
        pass
    return (
        f"stage notebook {notebook.name} failed in {where}: {ename}: {evalue}\n"
        f"executed notebook kept at {executed}"
    )


def run_stage(
    stage: str,
    config_file: str | Path | None = None,
    params: dict[str, Any] | None = None,
    run_id: str | None = None,
    runs_dir: str | Path = "runs",
    force: bool = False,
    log_output: bool = False,
) -> Path:
    """Execute ``notebooks/<stage>.ipynb`` into ``runs_dir/run_id/stage``; returns that folder.

    Before the notebook starts: the config is resolved, its input paths must exist, and a folder
    holding an unfinished run must have been started with the same config (``force`` starts
    over instead); temp files a killed writer left are removed.

    Raises:
        ConfigError: bad stage name, config file, key, type or value; a missing input; an
            unfinished run made with another config (:class:`~mmafm.stages.base.ResumeMismatch`).
            Nothing is executed and no folder is made.
        StageFailed: a cell raised; the executed notebook is kept in the stage folder.
    """
    import papermill

    run_id = run_id or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stage_dir = Path(runs_dir).resolve() / run_id / stage
    config = resolve_stage_config(stage, config_file, params, out_dir=stage_dir)
    notebook = notebook_path(stage)

    if _is_complete(stage_dir) and not force:
        print(f"[mmafm] {stage}: complete in {stage_dir}, skipped (use --force to re-run)")
        return stage_dir
    check_input_paths(config, base=project_root(), source=f"stage {stage}")
    if force and stage_dir.exists():
        shutil.rmtree(stage_dir)
    elif has_checkpoint(stage_dir):
        check_resume(stage_dir, config)
        print(f"[mmafm] {stage}: unfinished run found in {stage_dir}, resuming (same config)")
    removed = remove_temp_files(stage_dir) + remove_incomplete_checkpoints(stage_dir / "checkpoints")
    if removed:
        print(f"[mmafm] {stage}: removed {len(removed)} file(s) a killed writer left: "
              + ", ".join(str(p.relative_to(stage_dir)) for p in removed))

    stage_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(config, stage_dir / CONFIG_FILE)
    executed = stage_dir / f"{stage}.ipynb"
    print(f"[mmafm] {stage}: executing {notebook.relative_to(project_root())} -> {executed}")
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(notebook),
            str(executed),
            parameters=to_dict(config),
            kernel_name=KERNEL_NAME,
            cwd=str(project_root()),
            progress_bar=False,
            log_output=log_output,
            report_mode=False,
        )
    except papermill.PapermillExecutionError as err:
        raise StageFailed(_describe_failure(err, notebook, executed)) from None
    if not _is_complete(stage_dir):
        raise StageFailed(
            f"stage notebook {notebook.name} finished without writing {stage_dir / MANIFEST}"
        )
    print(f"[mmafm] {stage}: done in {time.perf_counter() - start:.0f} s -> {stage_dir}")
    return stage_dir


# ------------------------------------------------------------ parameterized notebooks (not stages)
NOTEBOOK_PARAMETERS = "parameters.yaml"  # the resolved parameters of a notebook entry's run
_NO_TYPE = object()  # a parameters-cell default that is not a literal: any value is accepted


def notebook_parameters(name: str) -> dict[str, Any]:
    """``{parameter: default}`` of ``notebooks/<name>.ipynb``'s ``parameters`` cell.

    Defaults are read with :func:`ast.literal_eval`; one that is not a literal maps to a
    sentinel that accepts any value.

    Raises:
        ConfigError: no such notebook, no cell tagged ``parameters``, or no ``out_dir`` in it.
    """
    import nbformat

    path = project_root() / "notebooks" / f"{name}.ipynb"
    if not path.is_file():
        raise ConfigError(f"notebook {name!r}: no notebook at {path}")
    cells = [c for c in nbformat.read(path, as_version=4).cells
             if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise ConfigError(f"notebook {path}: no code cell tagged 'parameters' (papermill needs one)")
    defaults: dict[str, Any] = {}
    try:
        body = ast.parse(cells[0].source).body
    except SyntaxError as err:
        raise ConfigError(f"notebook {path}: its parameters cell is not valid Python: {err}") from err
    for node in body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else (
            node.target if isinstance(node, ast.AnnAssign) and node.value is not None else None)
        if isinstance(target, ast.Name):
            try:
                defaults[target.id] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError):
                defaults[target.id] = _NO_TYPE
    if "out_dir" not in defaults:
        raise ConfigError(f"notebook {path}: its parameters cell has no out_dir (the runner sets it)")
    return defaults


def _check_notebook_value(name: str, key: str, value: Any, default: Any) -> Any:
    """``value`` if it has ``default``'s type (an int for a float widens); else ConfigError."""
    where = f"notebook {name}: parameter '{key}'"
    if default is _NO_TYPE or default is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: expected {type(default).__name__} (the type of its default "
                          f"{default!r}), got {type(value).__name__} {value!r}")
    return value


def resolve_notebook_parameters(
    name: str, params: dict[str, Any] | None = None, out_dir: str | Path | None = None, source: str = ""
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check ``params`` against ``notebooks/<name>.ipynb``'s parameters cell.

    Returns:
        ``(given, resolved)``: the checked values papermill injects (``out_dir`` included when
        given) and every parameter's value (the defaults with ``given`` on top).

    Raises:
        ConfigError: an unknown parameter (naming the closest one), a value of another type than
            its default, or ``out_dir`` in ``params`` (the runner sets it).
    """
    where = f"{source}: " if source else ""
    defaults = notebook_parameters(name)
    params = dict(params or {})
    if "out_dir" in params:
        raise ConfigError(f"{where}notebook {name}: out_dir is set by the runner (runs/<run-id>/{name}/)")
    unknown = [key for key in params if key not in defaults]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ConfigError(f"{where}notebook {name}: unknown parameter(s) {', '.join(hints)}; its parameters: "
                          f"{', '.join(sorted(defaults))}")
    given = {key: _check_notebook_value(name, key, value, defaults[key]) for key, value in params.items()}
    if out_dir is not None:
        given["out_dir"] = str(Path(out_dir).resolve())
    resolved = {key: value for key, value in defaults.items() if value is not _NO_TYPE}
    resolved.update(given)
    return given, resolved


def _is_notebook_complete(out_dir: Path, name: str) -> bool:
    """A notebook entry is complete when the runner wrote its manifest (not a stage run inside it)."""
    try:
        return read_manifest(out_dir).get("notebook") == name
    except ManifestError:
        return False


def _set_aside_inner_manifest(out_dir: Path, name: str) -> None:
    """After a failure: a manifest a stage run inside the notebook wrote must not mark the entry
    (or a stage) complete; it is renamed ``manifest.incomplete.json``."""
    path = out_dir / MANIFEST
    if path.is_file() and not _is_notebook_complete(out_dir, name):
        path.replace(out_dir / "manifest.incomplete.json")


def _scalars(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        return {}
    return {key: value for key, value in data.items() if isinstance(value, (int, float, str, bool))}


def write_notebook_manifest(out_dir: Path, name: str, parameters: dict[str, Any], seconds: float) -> Path:
    """Mark a notebook entry complete: outputs ``out_dir``, ``notebook`` (the executed one) and
    ``<stem>_json`` per JSON file in ``out_dir`` (``summary_json``: ``summary.json``, or the only
    one); summary: their top-level numbers and the wall time; figures: the PNGs in ``out_dir``
    and ``out_dir/figures``. A manifest a stage run inside the notebook wrote keeps its outputs
    and summary under these."""
    inner: dict = {}
    if (out_dir / MANIFEST).is_file():
        try:
            inner = json.loads((out_dir / MANIFEST).read_text())
        except json.JSONDecodeError:
            inner = {}
    outputs = dict(inner.get("outputs") or {})
    outputs.update({"out_dir": str(out_dir), "notebook": str(out_dir / f"{name}.ipynb")})
    summary = dict(inner.get("summary") or {})
    files = sorted(p for p in out_dir.glob("*.json") if p.name not in (MANIFEST, "manifest.incomplete.json"))
    for path in files:
        outputs[f"{path.stem}_json"] = str(path)
    main = out_dir / "summary.json" if (out_dir / "summary.json").is_file() else files[0] if len(files) == 1 else None
    if main is not None:
        outputs["summary_json"] = str(main)
        try:
            summary.update(_scalars(json.loads(main.read_text())))
        except json.JSONDecodeError:
            pass
    summary["seconds"] = round(seconds, 1)
    manifest = {
        "stage": name,
        "notebook": name,
        "status": "complete",
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "outputs": outputs,
        "summary": summary,
        "config": parameters,
        "figures": sorted(str(p) for p in [*out_dir.glob("*.png"), *out_dir.glob("figures/*.png")]),
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return out_dir / MANIFEST


def _check_notebook_resume(out_dir: Path, name: str, resolved: dict[str, Any]) -> None:
    """An unfinished notebook folder is run again only with the parameters it was started with."""
    import yaml

    saved_file = out_dir / NOTEBOOK_PARAMETERS
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    current = json.loads(json.dumps(resolved, default=str))
    differences = config_differences(saved, current, ignore=("out_dir",))
    if differences:
        changes = "\n  ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differences.items())
        raise ConfigError(
            f"{out_dir} holds an unfinished run of notebook {name} with other parameters (saved in "
            f"{saved_file}); differing keys (old -> new):\n  {changes}\n"
            "Either start over: --force (deletes the folder), or run elsewhere: another --run-id."
        )


def run_notebook(
    name: str,
    params: dict[str, Any] | None = None,
    run_id: str | None = None,
    runs_dir: str | Path = "runs",
    force: bool = False,
    log_output: bool = False,
) -> Path:
    """Execute ``notebooks/<name>.ipynb`` (a parameterized notebook, not a stage) into
    ``runs_dir/run_id/name``; returns that folder.

    Its parameters are checked first (:func:`resolve_notebook_parameters`); ``out_dir`` is the
    folder. A complete folder is skipped unless ``force``. On success the runner writes
    ``manifest.json`` (:func:`write_notebook_manifest`); on failure the executed notebook stays
    and nothing marks the folder complete.

    Raises:
        ConfigError: an unknown parameter, a wrong type, an unfinished run with other parameters.
        StageFailed: a cell raised (or the kernel died); the executed notebook is kept.
    """
    import papermill
    import yaml

    run_id = run_id or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(runs_dir).resolve() / run_id / name
    given, resolved = resolve_notebook_parameters(name, params, out_dir)
    notebook = project_root() / "notebooks" / f"{name}.ipynb"
    if _is_notebook_complete(out_dir, name) and not force:
        print(f"[mmafm] {name}: complete in {out_dir}, skipped (use --force to re-run)")
        return out_dir
    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    else:
        _check_notebook_resume(out_dir, name, resolved)
    remove_temp_files(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / NOTEBOOK_PARAMETERS, yaml.safe_dump(json.loads(json.dumps(resolved, default=str)),
                                                                    sort_keys=False))
    executed = out_dir / f"{name}.ipynb"
    print(f"[mmafm] {name}: executing {notebook.relative_to(project_root())} -> {executed}")
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebook), str(executed), parameters=given, kernel_name=KERNEL_NAME,
                                   cwd=str(project_root()), progress_bar=False, log_output=log_output,
                                   report_mode=False)
    except papermill.PapermillExecutionError as err:
        _set_aside_inner_manifest(out_dir, name)
        raise StageFailed(_describe_failure(err, notebook, executed)) from None
    except BaseException:
        _set_aside_inner_manifest(out_dir, name)
        raise
    write_notebook_manifest(out_dir, name, resolved, time.perf_counter() - start)
    print(f"[mmafm] {name}: done in {time.perf_counter() - start:.0f} s -> {out_dir}")
    return out_dir


@dataclass
class PipelineStage:
    stage: str = ""  # stage name, e.g. "00_data" (notebooks/<stage>.ipynb)
    notebook: str = ""  # or a parameterized notebook that is no stage, e.g. "reproduce_distillation"
    config: str = ""  # YAML file of the stage's parameters (relative to the workspace root); stages only
    params: dict[str, Any] = field(default_factory=dict)  # overrides on top of the file
    inputs: dict[str, str] = field(default_factory=dict)  # param -> "<stage>.<output>"

    @property
    def name(self) -> str:
        """The entry's name: its folder under the run, what ``--only`` and ``-p NAME.key`` use."""
        return self.stage or self.notebook


@dataclass
class PipelineConfig:
    run_id: str  # runs/<run_id>/...: a fixed id makes re-runs skip finished stages
    stages: list[PipelineStage]
    runs_dir: str = "runs"
    description: str = ""


def load_pipeline(path: str | Path) -> PipelineConfig:
    pipeline = from_dict(PipelineConfig, load_yaml(path), source=str(path))
    names = [s.name for s in pipeline.stages]
    for index, entry in enumerate(pipeline.stages):
        if bool(entry.stage) == bool(entry.notebook):
            raise ConfigError(f"{path}: entry {index + 1} ({entry.name or 'unnamed'}): expected exactly one of "
                              "'stage: <registered stage>' or 'notebook: <notebooks/NAME.ipynb>'")
        if entry.notebook:
            if entry.config:
                raise ConfigError(f"{path}: notebook {entry.notebook}: a notebook entry takes params:, not config:")
            notebook_parameters(entry.notebook)  # a missing notebook or parameters cell fails up front
        else:
            get_stage(entry.stage)  # unknown stage names fail before anything runs
        if entry.name in names[:index]:
            raise ConfigError(f"{path}: {entry.name} appears twice (each entry has its own folder)")
        for param, ref in entry.inputs.items():
            producer = ref.split(".", 1)[0]
            if "." not in ref or producer not in names[:index]:
                raise ConfigError(
                    f"{path}: stage {entry.name} input {param}={ref!r}: expected "
                    f"'<earlier stage>.<output>' with an earlier stage among {names[:index]}"
                )
    return pipeline


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: ``"3"`` -> ``[0, 1, 2]`` (that many seeds from 0); ``"0,4,7"`` -> those seeds
    (``"5,"`` is the single seed 5)."""
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        numbers = []
    seeds = numbers if "," in text else list(range(numbers[0])) if numbers else []
    if not seeds or any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"--seeds {text!r}: expected a number of seeds >= 1 (3 = seeds 0, 1, 2) or distinct "
            "seeds >= 0 separated by commas (0,1,2)"
        )
    return seeds


@dataclass
class PlannedStage:
    """One stage of a pipeline invocation, its config resolved and checked before anything runs."""

    entry: PipelineStage
    config_file: Path | None  # the stage's YAML, absolute
    overrides: dict[str, Any]  # -p STAGE.key=value (and --seeds' seed) for this stage
    config: Any  # the resolved config (a notebook entry's: its parameters as attributes); placeholders stand in
    placeholders: set[str]  # parameters whose value an earlier stage of this invocation makes
    runs: bool  # False: complete, skipped


def _placeholder(config_cls: type, param: str, ref: str) -> Any:
    """A value of the right type standing for ``ref``, an output that does not exist yet: a
    string naming it for a free-form str field, else the field's default."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if param not in fields:
        return f"<{ref}>"  # resolving reports the unknown key
    f = fields[param]
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, str) and "choices" not in f.metadata:
        return f"<{ref}>"
    return default


def _input_value(run_dir: Path, entry: PipelineStage, param: str, ref: str) -> str:
    """The output ``ref`` (``<stage>.<output>``) from that stage's manifest in ``run_dir``."""
    producer, output = ref.split(".", 1)
    try:
        manifest = read_manifest(run_dir / producer)
    except ManifestError as err:
        raise ManifestError(
            f"stage {entry.name} reads {param} from {ref}, but {err} (run {producer} first, "
            f"e.g. without --only)"
        ) from None
    if output == "out_dir" and output not in manifest["outputs"]:
        return str(run_dir / producer)  # every entry's folder: `<stage>.out_dir` (a model source, say)
    if output not in manifest["outputs"]:
        raise ManifestError(
            f"stage {producer} has no output {output!r} (outputs: {sorted(manifest['outputs'])})"
        )
    return manifest["outputs"][output]


def _entry_complete(run_dir: Path, entry: PipelineStage) -> bool:
    if entry.notebook:
        return _is_notebook_complete(run_dir / entry.name, entry.notebook)
    return _is_complete(run_dir / entry.stage)


def _check_stage_names(path: str | Path, names: list[str], wanted: list[str], what: str) -> None:
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise ConfigError(
            f"{what} names stage(s) {unknown} not in pipeline {path}; its stages are: {', '.join(names)}"
        )


def plan_pipeline(
    path: str | Path,
    run_dir: Path,
    force: bool = False,
    only: list[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[PlannedStage]:
    """Resolve and check every stage a pipeline invocation would run, running none.

    Each stage's config is resolved from its YAML, ``params``, its inputs and ``overrides``; an
    input made by a stage that runs before it in this invocation is a placeholder (its path is
    not checked); the others come from the manifests in ``run_dir``. Input paths must exist,
    and a stage folder holding an unfinished run must have been started with the same config.

    Raises:
        ConfigError: a bad key, type or value in any stage, an unknown stage in ``only`` or
            ``overrides`` (naming the pipeline's stages), a missing input path, a resume into
            another config.
        ManifestError: an input from a stage that is neither complete nor run now.
    """
    pipeline = load_pipeline(path)
    root = project_root()
    names = [s.name for s in pipeline.stages]
    overrides = overrides or {}
    _check_stage_names(path, names, sorted(overrides), "-p STAGE.key=value")
    _check_stage_names(path, names, only or [], "--only")
    selected = [s for s in pipeline.stages if not only or s.name in only]
    runs = {s.name for s in selected if force or not _entry_complete(run_dir, s)}
    plans = []
    for entry in selected:
        stage_overrides = dict(overrides.get(entry.name, {}))
        params = dict(entry.params)
        placeholders = set()
        defaults = notebook_parameters(entry.notebook) if entry.notebook else {}
        for param, ref in entry.inputs.items():
            if ref.split(".", 1)[0] in runs:
                if entry.notebook:  # as for a stage: a string naming it for a str parameter, else the default
                    default = defaults.get(param, "")
                    params[param] = f"<{ref}>" if isinstance(default, str) else default
                else:
                    params[param] = _placeholder(get_stage(entry.stage).config_cls, param, ref)
                placeholders.add(param)
            else:
                params[param] = _input_value(run_dir, entry, param, ref)
        params.update(stage_overrides)
        placeholders -= set(stage_overrides)
        if entry.notebook:
            _, resolved = resolve_notebook_parameters(entry.notebook, params, run_dir / entry.name, source=str(path))
            if entry.name in runs and not force and not placeholders:
                _check_notebook_resume(run_dir / entry.name, entry.name, resolved)
            plans.append(PlannedStage(entry, None, stage_overrides, SimpleNamespace(**resolved), placeholders,
                                      entry.name in runs))
            continue
        config_file = (root / entry.config) if entry.config else None
        config = resolve_stage_config(entry.stage, config_file, params, out_dir=run_dir / entry.stage)
        if entry.stage in runs:
            check_input_paths(config, skip=placeholders, base=root, source=f"{path}: stage {entry.stage}")
            if not force and not placeholders:
                check_resume(run_dir / entry.stage, config)
        plans.append(PlannedStage(entry, config_file, stage_overrides, config, placeholders, entry.stage in runs))
    return plans


def _runs_dir(pipeline: PipelineConfig) -> Path:
    runs_dir = Path(pipeline.runs_dir)
    return runs_dir if runs_dir.is_absolute() else project_root() / runs_dir


def _seed_overrides(
    pipeline: PipelineConfig, overrides: dict[str, dict[str, Any]], seed: int
) -> dict[str, dict[str, Any]]:
    """``overrides`` with ``seed`` set for every stage; a ``-p STAGE.seed`` too is an error."""
    out = {stage: dict(values) for stage, values in overrides.items()}
    for entry in pipeline.stages:
        if entry.notebook and "seed" not in notebook_parameters(entry.notebook):
            continue  # a notebook without a `seed` parameter runs as it is
        if "seed" in out.get(entry.name, {}):
            raise ConfigError(f"-p {entry.name}.seed conflicts with --seeds (which sets every stage's seed)")
        out.setdefault(entry.name, {})["seed"] = seed
    return out


def _execute(path: str | Path, plans: list[PlannedStage], run_id: str, run_dir: Path, force: bool) -> Path:
    """Run the planned stages in order (inputs read from the manifests just written)."""
    total = time.perf_counter()
    for number, plan in enumerate(plans, 1):
        entry = plan.entry
        print(f"[mmafm] pipeline {Path(path).name} ({run_id}): stage {number}/{len(plans)} {entry.name}")
        params = dict(entry.params)
        params.update({param: _input_value(run_dir, entry, param, ref) for param, ref in entry.inputs.items()})
        params.update(plan.overrides)
        if entry.notebook:
            run_notebook(entry.notebook, params, run_id=run_id, runs_dir=run_dir.parent, force=force)
        else:
            run_stage(entry.stage, plan.config_file, params, run_id=run_id, runs_dir=run_dir.parent, force=force)
    from mmafm.report import write_report

    report = write_report(run_dir)
    print(f"[mmafm] pipeline finished in {time.perf_counter() - total:.0f} s -> {run_dir} (summary: {report})")
    return run_dir


def run_pipeline(
    path: str | Path,
    force: bool = False,
    run_id: str | None = None,
    only: list[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    seeds: list[int] | None = None,
) -> Path:
    """Run a pipeline's stages in order; returns ``runs_dir/run_id``.

    Every stage is resolved and checked first (:func:`plan_pipeline`, for every seed), so a bad
    key in the last stage fails before the first one runs.

    Args:
        only: run just these stages (their inputs must already be complete).
        overrides: extra params per stage name, applied last.
        seeds: run the pipeline once per seed into ``runs_dir/<run_id>-seed<k>`` with every
            stage's ``seed`` set to k, then write the summary numbers' mean and standard
            deviation over the seeds to ``runs_dir/run_id/RESULTS.md``.
    """
    pipeline = load_pipeline(path)
    run_id = run_id or pipeline.run_id
    runs_dir = _runs_dir(pipeline)
    overrides = overrides or {}
    if not seeds:
        run_dir = runs_dir / run_id
        return _execute(path, plan_pipeline(path, run_dir, force, only, overrides), run_id, run_dir, force)

    planned = []
    for seed in seeds:
        seed_run = f"{run_id}-seed{seed}"
        plans = plan_pipeline(path, runs_dir / seed_run, force, only, _seed_overrides(pipeline, overrides, seed))
        planned.append((seed_run, plans))
    run_dirs = [_execute(path, plans, seed_run, runs_dir / seed_run, force) for seed_run, plans in planned]
    from mmafm.report import write_seed_report

    results = write_seed_report(run_dirs, runs_dir / run_id / "RESULTS.md")
    print(f"[mmafm] {len(seeds)} seeds done; mean ± std over seeds: {results}")
    return runs_dir / run_id


def stage_config_fields(stage: str) -> dict[str, Any]:
    """``{field: default}`` of a stage's config (what its notebook's parameters cell must hold)."""
    config_cls = get_stage(stage).config_cls
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = dataclasses.MISSING
    return out
