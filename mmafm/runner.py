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
same run. A complete stage is skipped on re-run unless forced; an interrupted one is executed
again in the same folder, where the trainer resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmafm.config import ConfigError, dump_yaml, from_dict, load_yaml, to_dict
from mmafm.stages import get_stage
from mmafm.stages.base import MANIFEST, ManifestError, read_manifest

__all__ = [
    "StageFailed",
    "PipelineStage",
    "PipelineConfig",
    "project_root",
    "notebook_path",
    "resolve_stage_config",
    "run_stage",
    "run_pipeline",
    "load_pipeline",
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

    Raises:
        ConfigError: bad stage name, config file, key, type or value (nothing is executed).
        StageFailed: a cell raised; the executed notebook is kept in the stage folder.
    """
    import papermill

    run_id = run_id or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stage_dir = Path(runs_dir).resolve() / run_id / stage
    config = resolve_stage_config(stage, config_file, params, out_dir=stage_dir)
    notebook = notebook_path(stage)

    if _is_complete(stage_dir):
        if not force:
            print(f"[mmafm] {stage}: complete in {stage_dir}, skipped (use --force to re-run)")
            return stage_dir
        shutil.rmtree(stage_dir)
    elif (stage_dir / "checkpoints").is_dir() and any((stage_dir / "checkpoints").iterdir()):
        if force:
            shutil.rmtree(stage_dir)
        else:
            print(f"[mmafm] {stage}: unfinished run found in {stage_dir}, resuming")

    stage_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(config, stage_dir / "config.yaml")
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


@dataclass
class PipelineStage:
    stage: str  # stage name, e.g. "00_data" (notebooks/<stage>.ipynb)
    config: str = ""  # YAML file of the stage's parameters (relative to the workspace root)
    params: dict[str, Any] = field(default_factory=dict)  # overrides on top of the file
    inputs: dict[str, str] = field(default_factory=dict)  # param -> "<stage>.<output>"


@dataclass
class PipelineConfig:
    run_id: str  # runs/<run_id>/...: a fixed id makes re-runs skip finished stages
    stages: list[PipelineStage]
    runs_dir: str = "runs"
    description: str = ""


def load_pipeline(path: str | Path) -> PipelineConfig:
    pipeline = from_dict(PipelineConfig, load_yaml(path), source=str(path))
    names = [s.stage for s in pipeline.stages]
    for index, entry in enumerate(pipeline.stages):
        get_stage(entry.stage)  # unknown stage names fail before anything runs
        for param, ref in entry.inputs.items():
            producer = ref.split(".", 1)[0]
            if "." not in ref or producer not in names[:index]:
                raise ConfigError(
                    f"{path}: stage {entry.stage} input {param}={ref!r}: expected "
                    f"'<earlier stage>.<output>' with an earlier stage among {names[:index]}"
                )
    return pipeline


def _resolve_inputs(entry: PipelineStage, run_dir: Path) -> dict[str, str]:
    values = {}
    for param, ref in entry.inputs.items():
        producer, output = ref.split(".", 1)
        manifest = read_manifest(run_dir / producer)
        if output not in manifest["outputs"]:
            raise ManifestError(
                f"stage {producer} has no output {output!r} (outputs: {sorted(manifest['outputs'])})"
            )
        values[param] = manifest["outputs"][output]
    return values


def run_pipeline(
    path: str | Path,
    force: bool = False,
    run_id: str | None = None,
    only: list[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Run a pipeline's stages in order; returns ``runs_dir/run_id``.

    Args:
        only: run just these stages (their inputs must already be complete).
        overrides: extra params per stage name, applied last.
    """
    pipeline = load_pipeline(path)
    run_id = run_id or pipeline.run_id
    root = project_root()
    runs_dir = Path(pipeline.runs_dir)
    if not runs_dir.is_absolute():
        runs_dir = root / runs_dir
    run_dir = runs_dir / run_id
    selected = [s for s in pipeline.stages if not only or s.stage in only]
    total = time.perf_counter()
    for number, entry in enumerate(selected, 1):
        print(f"[mmafm] pipeline {Path(path).name} ({run_id}): stage {number}/{len(selected)} {entry.stage}")
        params = dict(entry.params)
        params.update(_resolve_inputs(entry, run_dir))
        params.update((overrides or {}).get(entry.stage, {}))
        config_file = (root / entry.config) if entry.config else None
        run_stage(entry.stage, config_file, params, run_id=run_id, runs_dir=runs_dir, force=force)
    from mmafm.report import write_report

    report = write_report(run_dir)
    print(f"[mmafm] pipeline finished in {time.perf_counter() - total:.0f} s -> {run_dir} (summary: {report})")
    return run_dir


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
