"""Every command example in the documentation names real stages and real parameters.

The examples are collected from README.md, docs/*.md, configs/**/*.yaml (their comments),
notebooks' markdown and every docstring / comment under mmafm/, scripts/ and benchmarks/: each
``mmafm run STAGE``, ``mmafm pipeline run ... -p STAGE.key=value`` and
``torchrun ... -m mmafm.launch STAGE`` with its ``-p key=value`` overrides (lines joined across
shell continuations and YAML comment continuations). Each key must be a field of the stage's
config dataclass (a pipeline's notebook entry: a name in the notebook's parameters cell) and
every ``--config`` file must resolve for the stage, so documentation cannot
drift from the code again.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from mmafm.stages import get_stage, list_stages
from mmafm.runner import resolve_stage_config

ROOT = Path(__file__).resolve().parents[1]
# "-p key=value" / "-p stage.key=value"; placeholders like KEY or key=value are prose, not examples
PARAM = re.compile(r"(?<![\w-])-p\s+(\w[\w.]*)=")
STAGE_NAME = re.compile(r"\b(\d\d_[a-z][a-z0-9_]*)\b")
COMMAND = re.compile(r"(?:mmafm\s+run|mmafm(?:\.train)?\.launch|mmafm\s+pipeline\s+run)\b")
CONFIG_FILE = re.compile(r"--config\s+(configs/stages/[\w.]+\.ya?ml)")
PLACEHOLDER_KEYS = {"key", "KEY", "STAGE.key", "stage.key"}


def _sources() -> list[tuple[str, str]]:
    """(name, text) of every file whose prose may hold a command example."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "configs").rglob("*.yaml"))
    for folder in ("mmafm", "scripts", "benchmarks", "tests"):
        files += [p for p in sorted((ROOT / folder).rglob("*.py")) if p.name != Path(__file__).name]
    sources = [(str(p.relative_to(ROOT)), p.read_text()) for p in files]
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        sources.append((str(notebook.relative_to(ROOT)), text))
    return sources


def _logical_lines(text: str) -> list[str]:
    """Lines with shell (``\\``) and comment continuations (``#   -p ...``) joined."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        continues_previous = lines and (lines[-1].endswith("\\") or (line.startswith("-p ") and PARAM.search(lines[-1])))
        if continues_previous:
            lines[-1] = lines[-1].rstrip("\\") + " " + line
        else:
            lines.append(line)
    return lines


def _examples() -> list[tuple[str, str, str | None, list[str], str | None]]:
    """(source, line, stage or None (keys carry it), keys, config file) per example line."""
    examples = []
    for name, text in _sources():
        file_stage = Path(name).stem.removesuffix("_real") if name.startswith("configs/stages/") else None
        for line in _logical_lines(text):
            keys = [k for k in PARAM.findall(line) if k not in PLACEHOLDER_KEYS]
            config = CONFIG_FILE.search(line)
            if not keys and not config:
                continue
            command = COMMAND.search(line)
            after = line[command.end():] if command else line
            stages = STAGE_NAME.findall(after) or STAGE_NAME.findall(line)
            pipeline = bool(command) and "pipeline" in command.group(0)
            stage = None if pipeline else (stages[0] if stages else file_stage)
            examples.append((name, line, stage, keys, config.group(1) if config else None))
    return examples


EXAMPLES = _examples()


def test_examples_were_found():
    # the README alone documents several; an empty harvest would make the checks below vacuous
    assert len(EXAMPLES) >= 10
    sources = {source for source, *_ in EXAMPLES}
    assert "README.md" in sources and any(source.endswith("launch.py") for source in sources)


@pytest.mark.parametrize("source,line,stage,keys,config", EXAMPLES, ids=[f"{e[0]}:{i}" for i, e in enumerate(EXAMPLES)])
def test_example_names_real_parameters(source, line, stage, keys, config):
    known = set(list_stages())
    for key in keys:
        key_stage, _, field_name = key.rpartition(".") if "." in key else (stage, "", key)
        assert key_stage, f"{source}: cannot tell which stage `-p {key}` belongs to in: {line}"
        if key_stage not in known and (ROOT / "notebooks" / f"{key_stage}.ipynb").is_file():  # a notebook entry
            from mmafm.runner import notebook_parameters

            assert field_name in notebook_parameters(key_stage), f"{source}: `-p {key}` is no parameter of {key_stage}"
            continue
        assert key_stage in known, f"{source}: unknown stage {key_stage!r} in: {line}"
        fields = {f.name for f in dataclasses.fields(get_stage(key_stage).config_cls)}
        assert field_name in fields, (
            f"{source}: `-p {key}` is not a parameter of stage {key_stage} in: {line}\n"
            f"its parameters: {', '.join(sorted(fields))}")
    if config:
        assert stage in known, f"{source}: --config {config} without a known stage in: {line}"
        resolve_stage_config(stage, ROOT / config, {}, out_dir=ROOT / "runs" / "doc-example-check")


def test_readme_workspace_map_lists_every_module():
    """README's workspace map names every module of the library, so it cannot go stale."""
    readme = (ROOT / "README.md").read_text()
    words = set(readme.split("## The workspace", 1)[1].split("```", 2)[1].split())
    missing = []
    for path in sorted((ROOT / "mmafm").rglob("*.py")):
        package = path.parent.relative_to(ROOT / "mmafm")
        if path.name == "__init__.py" and package != Path("."):
            named = f"{package}/" in words  # a subpackage is named by its folder
        else:
            named = path.name in words and (package == Path(".") or f"{package}/" in words)
        if not named:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"README's workspace map does not mention: {missing}"
