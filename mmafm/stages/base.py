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
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmafm.config import to_dict
from mmafm.io import append_jsonl, atomic_path, atomic_write_json, read_jsonl
from mmafm.train.trainer import TrainConfig, TrainSettings

__all__ = ["StageConfig", "TrainStageConfig", "StageDir", "read_manifest", "ManifestError"]

MANIFEST = "manifest.json"


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
    """The output folder of one stage run."""

    def __init__(self, out_dir: str | Path, stage: str):
        self.root = Path(out_dir)
        self.stage = stage
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "checkpoints").mkdir(exist_ok=True)
        (self.root / "figures").mkdir(exist_ok=True)

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
