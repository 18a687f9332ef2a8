"""Atomic file writes: write a sibling temp file, fsync, then rename over the target.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
half-written file, even if the process is killed mid-write. A killed writer does leave its temp
file behind: ``.<target name>.<8 random characters>.tmp`` beside the target.
:func:`remove_temp_files` deletes such leftovers (a stage does when it starts or resumes).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "append_jsonl",
    "read_jsonl",
    "is_temp_file",
    "remove_temp_files",
]

TEMP_SUFFIX = ".tmp"
# what tempfile.mkstemp(prefix=".<name>.", suffix=".tmp") makes: 8 characters of [a-z0-9_]
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it to ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def is_temp_file(path: str | Path) -> bool:
    """Whether ``path`` is named like an :func:`atomic_path` temp file (``.<name>.<8 random characters>.tmp``)."""
    return bool(_TEMP_NAME.match(Path(path).name))


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the :func:`atomic_path` temp files under ``folder`` (recursively): the leftovers of a
    writer killed mid-write. Call it only while no writer works in ``folder``.

    Returns:
        The paths removed (none when ``folder`` does not exist).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.rglob(f"*{TEMP_SUFFIX}")):
        if path.is_file() and is_temp_file(path):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON record as a line (a line is written in one ``write`` call)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record, default=float) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; a truncated last line (killed writer) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
