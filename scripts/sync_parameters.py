"""Rewrite each stage notebook's ``parameters`` cell from its config dataclass defaults.

    .venv/bin/python scripts/sync_parameters.py            # every stage notebook
    .venv/bin/python scripts/sync_parameters.py --check    # exit 1 if any cell is out of date

The config dataclass (``mmafm/stages/<module>.py``) is the single source of a stage's parameters
and their defaults; ``tests/test_notebooks.py`` fails when a notebook's cell differs from it. Run
this after adding or changing a field. Fields are written in the dataclass's order, the trainer's
settings (:class:`mmafm.train.trainer.TrainSettings`) as a group of their own; the rest of the
notebook is left untouched and no outputs are added.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import nbformat

from mmafm.io import atomic_path
from mmafm.stages import get_stage, list_stages
from mmafm.train.trainer import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
HEADER = "# Parameters (papermill overrides these; defaults = the stage config dataclass)"


def _literal(value) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def parameters_source(stage: str) -> str:
    """The ``parameters`` cell of ``stage``: one assignment per config field."""
    fields = [f for f in dataclasses.fields(get_stage(stage).config_cls)]
    trainer = {f.name for f in dataclasses.fields(TrainSettings)}
    own = [f for f in fields if f.name not in trainer]
    shared = [f for f in fields if f.name in trainer]
    lines = [HEADER] + [f"{f.name} = {_literal(f.default)}" for f in own]
    if shared:
        lines.append("# the trainer's settings (mmafm.train.trainer.TrainSettings)")
        lines += [f"{f.name} = {_literal(f.default)}" for f in shared]
    return "\n".join(lines)


def sync(path: Path, check: bool) -> bool:
    """Update one notebook; returns whether it was (or, with ``check``, would be) changed."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise SystemExit(f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    source = parameters_source(path.stem)
    if cells[0].source == source:
        return False
    if not check:
        cells[0].source = source
        with atomic_path(path) as tmp:
            nbformat.write(nb, str(tmp))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="report stale cells, change nothing")
    args = parser.parse_args(argv)
    notebooks = {name: ROOT / "notebooks" / f"{name}.ipynb" for name in list_stages()}
    missing = [name for name, path in notebooks.items() if not path.is_file()]
    stale = [name for name, path in notebooks.items() if name not in missing and sync(path, args.check)]
    for name in stale:
        print(f"{'stale' if args.check else 'updated'}: notebooks/{name}.ipynb")
    for name in missing:  # the others are still synced: one stage in progress must not block the rest
        print(f"error: stage {name!r} is registered but has no notebook notebooks/{name}.ipynb", file=sys.stderr)
    if missing:
        return 2
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
