"""The Makefile's pipeline targets write to folders of their own: `make seeds` writes
``runs/<id>-seed<k>/`` and ``runs/<id>/RESULTS.md``, `make reproduce` writes ``runs/<id>/<entry>/``,
so sharing one run-id would put the seed report among the reproduce pipeline's stage folders."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recipe_run_ids(makefile: str) -> dict[str, str]:
    """``{target: run-id}`` for every recipe line that passes ``--run-id``."""
    run_ids, target = {}, None
    for line in makefile.splitlines():
        header = re.match(r"^([A-Za-z0-9_.-]+):", line)
        if header:
            target = header.group(1)
        elif line.startswith("\t") and target:
            found = re.search(r"--run-id\s+(\S+)", line)
            if found:
                run_ids[target] = found.group(1)
    return run_ids


def test_recipe_run_ids_are_read_per_target():
    text = "a: x\n\tcmd --run-id one\n\n# comment\nb: y\n\tcmd --seeds 3 --run-id two\nc:\n\tcmd\n"
    assert recipe_run_ids(text) == {"a": "one", "b": "two"}


def test_seeds_and_reproduce_have_their_own_run_ids():
    run_ids = recipe_run_ids((ROOT / "Makefile").read_text())
    assert {"seeds", "reproduce"} <= set(run_ids)
    assert run_ids["seeds"] != run_ids["reproduce"]  # else runs/<id>/RESULTS.md lands among reproduce's folders
    assert run_ids["reproduce"] == "reproduce"  # README and configs/pipelines/reproduce.yaml name runs/reproduce/
    readme = (ROOT / "README.md").read_text()
    assert f"runs/{run_ids['seeds']}/RESULTS.md" in readme and f"runs/{run_ids['seeds']}-seed<k>/" in readme
