"""What every training stage shares: its config base, its output folder, its manifest.

A stage is a function ``run(config) -> dict[str, str]`` in ``mmafm/stages/<name>.py`` plus a thin
notebook ``notebooks/<STAGE>.ipynb`` whose ``parameters`` cell names exactly the fields of the
stage's config dataclass (a test checks this). A training stage module holds its config, its
task for the shared trainer (a :class:`mmafm.train.task.TrainingTask`), its figures and ``run``;
metrics come from the evaluation library (:mod:`mmafm.eval`). The stage writes everything under
``config.out_dir`` through a :class:`StageDir`:

- ``metrics.jsonl`` one JSON record per logged step / evaluation,
- ``checkpoints/`` safetensors + JSON metadata,
- ``figures/`` PNGs,
- ``manifest.json`` written last, naming the outputs later stages consume. Its presence with
  ``"status": "complete"`` is what makes the pipeline skip the stage on a re-run.

Beside it the runner writes ``config.yaml``, the resolved config; a folder holding a checkpoint
resumes only under the same config (:func:`check_resume`). A config field that names an input
which must exist declares it in its metadata, so it is checked before anything runs
(:func:`check_input_paths`)::

    init_checkpoint: str = field(default="", metadata={"path": "checkpoint"})
    tokenizer: str = field(default="", metadata={"path": "file", "keywords": ("openclip",)})

``"path"`` is ``"file"``, ``"dir"``, ``"checkpoint"`` (``NAME``, ``NAME.safetensors`` or
``NAME.json`` of a :func:`mmafm.checkpoint.save_checkpoint`) or ``"model"`` (such a checkpoint or
a finished stage folder, what :func:`mmafm.checkpoint.load_model` reads); ``""`` always means
"not given", and ``"keywords"`` lists other values that are not paths.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from mmafm.checkpoint import checkpoint_paths
from mmafm.config import ConfigError, to_dict
from mmafm.io import append_jsonl, atomic_path, atomic_write_json, read_jsonl, remove_temp_files
from mmafm.train.checkpointing import LATEST, remove_incomplete_checkpoints
from mmafm.train.trainer import TrainConfig, TrainSettings

__all__ = [
    "StageConfig",
    "TrainStageConfig",
    "StageDir",
    "read_manifest",
    "ManifestError",
    "ResumeMismatch",
    "CONFIG_FILE",
    "PATH_KINDS",
    "check_input_paths",
    "require_inputs",
    "check_tokenizer_vocab",
    "config_hash",
    "config_differences",
    "saved_config",
    "has_checkpoint",
    "check_resume",
]

MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"  # the resolved config of the stage run, written before it starts
PATH_KINDS = ("file", "dir", "checkpoint", "model")
# keys that may differ between a run and its resumption: where it lives, and how it is spread
# over processes (checkpoints resume on any world size and parallel mode, docs/training.md)
RESUME_IGNORED = ("out_dir", "parallel")
# trainer settings compared with a checkpoint's saved train config when a folder has no
# config.yaml: all but the cadences, which stages may derive (CLIP: one evaluation per epoch)
_CHECKPOINT_COMPARED = tuple(
    f.name for f in dataclasses.fields(TrainSettings) if f.name not in ("parallel", "log_every", "eval_every", "ckpt_every")
) + ("seed",)


class ManifestError(RuntimeError):
    """A stage's manifest is missing, incomplete or lacks a requested output."""


@dataclass
class StageConfig:
    """Fields every stage has. Subclasses add their own (scalars and paths only)."""

    out_dir: str = ""  # where outputs go; the runner sets runs/<run-id>/<stage>
    seed: int = field(default=0, metadata={"min": 0})


@dataclass
class TrainStageConfig(TrainSettings, StageConfig):
    """A training stage's config: :class:`StageConfig` + the trainer's :class:`TrainSettings`.

    The trainer's fields (``max_steps``, ``lr``, ``warmup_steps``, ``parallel``, ...) are declared
    once, in :class:`~mmafm.train.trainer.TrainSettings`; a stage re-declares one only to change
    its default or narrow its choices (``max_steps: int = setting("max_steps", 600)``). They stay
    flat scalars, so the notebook ``parameters`` cell and ``-p key=value`` name them directly.
    """

    def train_config(self, **fixed: Any) -> TrainConfig:
        """The :class:`TrainConfig` of this stage: its settings, its seed, and what it fixes itself.

        Args:
            **fixed: trainer fields the stage sets rather than exposes (e.g. CLIP's AdamW betas)
                or derives (an evaluation cadence of one epoch); they win over the settings.
        """
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainSettings)}
        # a warm-up never outlasts the run: the LR must reach its peak before the last step
        values["warmup_steps"] = min(self.warmup_steps, self.max_steps - 1)
        values["seed"] = self.seed
        values.update(fixed)
        return TrainConfig(**values)


class StageDir:
    """The output folder of one stage run.

    Opening it (rank 0 under torchrun) removes what a writer killed in an earlier run left: temp
    files of atomic writes and step checkpoints without their JSON, so a started or resumed
    stage leaves no litter.
    """

    def __init__(self, out_dir: str | Path, stage: str):
        self.root = Path(out_dir)
        self.stage = stage
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "checkpoints").mkdir(exist_ok=True)
        (self.root / "figures").mkdir(exist_ok=True)
        if os.environ.get("RANK", "0") == "0":  # the one writer; other ranks never write here
            removed = remove_temp_files(self.root) + remove_incomplete_checkpoints(self.checkpoint_dir)
            if removed:
                names = ", ".join(str(p.relative_to(self.root)) for p in removed)
                print(f"[mmafm] {stage}: removed {len(removed)} file(s) a killed writer left: {names}", file=sys.stderr)

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    def log(self, record: dict) -> None:
        append_jsonl(self.metrics_path, record)

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def save_figure(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure as ``figures/<name>.png`` atomically."""
        path = self.root / "figures" / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        return path

    def write_manifest(self, outputs: dict[str, Any], config: Any = None, summary: dict | None = None) -> Path:
        """Mark the stage complete, naming its outputs (paths are stored as given)."""
        manifest = {
            "stage": self.stage,
            "status": "complete",
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "outputs": {k: str(v) for k, v in outputs.items()},
            "summary": summary or {},
            "config": to_dict(config) if config is not None else None,
            "figures": sorted(str(p) for p in (self.root / "figures").glob("*.png")),
        }
        path = self.root / MANIFEST
        atomic_write_json(path, manifest)
        return path


def read_manifest(stage_dir: str | Path) -> dict:
    """The manifest of a finished stage; :class:`ManifestError` if absent or incomplete."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"stage output {stage_dir} has no {MANIFEST} (stage not finished?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"corrupt manifest {path}: {err}") from err
    if manifest.get("status") != "complete":
        raise ManifestError(f"stage output {stage_dir} is not complete")
    return manifest


# ------------------------------------------------------------------------- input paths
def _path_problem(value: str, kind: str, base: Path) -> str | None:
    """Why ``value`` is not an existing ``kind`` (relative to ``base``), or None if it is."""
    path = Path(value) if Path(value).is_absolute() else base / value
    if kind == "file":
        if path.is_file():
            return None
        return f"{path} is a folder, expected a file" if path.is_dir() else f"no such file {path}"
    if kind == "dir":
        if path.is_dir():
            return None
        return f"{path} is a file, expected a folder" if path.exists() else f"no such folder {path}"
    weights = checkpoint_paths(path)[0]
    if weights.is_file() or (kind == "model" and path.is_dir()):
        return None
    wanted = "checkpoint or stage folder" if kind == "model" else "checkpoint"
    return f"no such {wanted}: {weights} does not exist"


def check_input_paths(
    config: Any, skip: Iterable[str] = (), base: str | Path | None = None, source: str = ""
) -> None:
    """Check that every input path the config names exists (fields with ``metadata["path"]``).

    Args:
        config: a stage config dataclass.
        skip: fields not to check (outputs of an earlier stage that has not run yet).
        base: what relative paths are relative to; default the current directory.
        source: names the stage in the message.

    Raises:
        ConfigError: naming each missing input, its field and the path looked at.
    """
    base = Path(base) if base is not None else Path.cwd()
    skip = set(skip)
    problems = []
    for f in dataclasses.fields(config):
        kind = f.metadata.get("path")
        value = getattr(config, f.name)
        if not kind or f.name in skip or not value or value in f.metadata.get("keywords", ()):
            continue
        if kind not in PATH_KINDS:
            raise ValueError(f"{type(config).__name__}.{f.name}: metadata path {kind!r} is not one of {PATH_KINDS}")
        problem = _path_problem(str(value), kind, base)
        if problem:
            problems.append(f"key '{f.name}' = {value!r}: {problem}")
    if problems:
        where = source or type(config).__name__
        raise ConfigError(f"{where}: missing input(s), nothing was run:\n  " + "\n  ".join(problems))


def require_inputs(config: Any, stage: str, inputs: Mapping[str, str]) -> None:
    """Refuse a config that leaves an input another stage hands over empty.

    Stages run alone (a notebook, ``mmafm run``) get these fields from the user, so an empty one
    is named with where its value comes from rather than failing later on a path ``""``.

    Args:
        config: a stage config dataclass.
        stage: names the stage in the message.
        inputs: ``{field: what to pass}``, checked in this order; the first empty field raises
            ``"<stage>: <field> is empty; pass <what to pass>"``. Fields sharing one hint:
            ``dict.fromkeys(("checkpoint", "tokenizer"), "07_sft's `checkpoint` and ...")``.

    Raises:
        ConfigError: naming the first empty field and the upstream output to pass.
    """
    for name, upstream in inputs.items():
        if not getattr(config, name):
            raise ConfigError(f"{stage}: {name} is empty; pass {upstream}")


def check_tokenizer_vocab(stage: str, model: Any, tokenizer: Any, tokenizer_path: str, model_name: str,
                          refer_as: str = "it") -> None:
    """Refuse a tokenizer whose vocabulary size is not the loaded model's.

    A mismatched pair would index embeddings with another tokenizer's ids: silently wrong text,
    or an index error deep in training.

    Args:
        stage: names the stage in the message.
        model: the loaded text model (its ``config.vocab_size`` is compared).
        tokenizer: the loaded tokenizer (its ``vocab_size``).
        tokenizer_path: the config's tokenizer path, named in the message.
        model_name: what the model is to this stage (``"the base"``, ``"the policy"``).
        refer_as: how the advice refers to the model: ``"pass the tokenizer <refer_as> was
            trained with"``.

    Raises:
        ConfigError: naming both sizes and the tokenizer path.
    """
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"{stage}: {model_name} has a {model.config.vocab_size}-token vocabulary, tokenizer "
                          f"{tokenizer_path} has {tokenizer.vocab_size}; pass the tokenizer {refer_as} was trained with")


# ------------------------------------------------------------------------------- resume
class ResumeMismatch(ConfigError):
    """A stage folder holds a run made with another config; resuming it would mix the two."""


def config_hash(config: Any) -> str:
    """A short hash of a config's values without ``out_dir``: equal configs, equal hashes."""
    values = {k: v for k, v in to_dict(config).items() if k != "out_dir"}
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def has_checkpoint(stage_dir: str | Path) -> bool:
    """Whether ``stage_dir`` holds a resumable checkpoint (``checkpoints/latest.json``)."""
    return (Path(stage_dir) / "checkpoints" / LATEST).is_file()


def saved_config(stage_dir: str | Path, config_cls: type) -> tuple[dict, Path] | None:
    """The config a stage folder's run was made with, and the file it comes from.

    ``config.yaml`` when the folder has one (the whole config); otherwise the train config in
    the newest checkpoint's metadata, reduced to the trainer settings it shares with
    ``config_cls``. None when neither exists.
    """
    stage_dir = Path(stage_dir)
    config_file = stage_dir / CONFIG_FILE
    if config_file.is_file():
        try:
            saved = yaml.safe_load(config_file.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{config_file}: unreadable saved config ({err}); delete the folder or use --force") from err
        return (saved if isinstance(saved, dict) else {}), config_file
    latest = stage_dir / "checkpoints" / LATEST
    if not latest.is_file() or not issubclass(config_cls, TrainStageConfig):
        return None
    try:
        name = json.loads(latest.read_text())["checkpoint"]
        meta_path = checkpoint_paths(latest.parent / name)[1]
        train_config = json.loads(meta_path.read_text()).get("train_config") or {}
    except (OSError, KeyError, json.JSONDecodeError, TypeError):
        return None  # the trainer reports a damaged checkpoint with the file's name
    return {k: train_config[k] for k in _CHECKPOINT_COMPARED if k in train_config}, meta_path


_ABSENT = "<absent>"


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = RESUME_IGNORED
) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for every key whose values differ (``"<absent>"``
    for a key one side lacks), keys in ``ignore`` left out."""
    ignore = set(ignore)
    differences = {}
    for key in sorted((set(saved) | set(current)) - ignore):
        old, new = saved.get(key, _ABSENT), current.get(key, _ABSENT)
        if isinstance(old, tuple):
            old = list(old)
        if isinstance(new, tuple):
            new = list(new)
        if old != new:
            differences[key] = (old, new)
    return differences


def check_resume(stage_dir: str | Path, config: Any) -> None:
    """Refuse to resume a stage folder's run under a config other than the one it was made with.

    Only a folder holding a checkpoint is resumed, so only such a folder is checked: against its
    ``config.yaml``, or (without one) the trainer settings saved in its newest checkpoint.
    ``out_dir`` and ``parallel`` may differ.

    Raises:
        ResumeMismatch: naming each differing key (old -> new) and the two ways out.
    """
    if not has_checkpoint(stage_dir):
        return
    found = saved_config(stage_dir, type(config))
    if found is None:
        return
    saved, source = found
    current = to_dict(config.train_config()) if source.name != CONFIG_FILE else to_dict(config)
    if source.name != CONFIG_FILE:
        current = {k: current[k] for k in saved if k in current}
    differences = config_differences(saved, current)
    if not differences:
        return
    changes = "\n  ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in ((k, *v) for k, v in differences.items()))
    state = "a finished" if (Path(stage_dir) / MANIFEST).is_file() else "an unfinished"
    raise ResumeMismatch(
        f"{stage_dir} holds {state} run made with another config (saved in {source}); running "
        f"here would continue the old run. Differing keys (old -> new):\n  {changes}\n"
        "Either start over in this folder: --force (mmafm run; mmafm pipeline run --force --only STAGE), "
        "which deletes it, or delete the folder yourself; or keep it and run elsewhere: another "
        "--run-id (in a notebook: another out_dir, or out_dir = \"\" for a folder of its own)."
    )
