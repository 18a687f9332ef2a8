"""Every committed notebook is clean and parameterized; every stage notebook's `parameters` cell
names exactly the fields (and defaults) of its stage config, so papermill and `mmafm run` agree."""

import ast
import dataclasses
from pathlib import Path

import nbformat
import pytest

from mmafm.runner import stage_config_fields
from mmafm.stages import get_stage, list_stages

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
STAGE_NOTEBOOKS = [p for p in NOTEBOOKS if p.stem[:2].isdigit()]


def _parameters_cell(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: expected exactly one cell tagged 'parameters'"
    return cells[0].source


def _assigned(source: str) -> dict:
    values = {}
    for node in ast.parse(source).body:
        assert isinstance(node, (ast.Assign, ast.AnnAssign)), "parameters cell: assignments only"
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        values[target.id] = ast.literal_eval(node.value)  # scalars, strings, lists only
    return values


def test_there_are_notebooks():
    assert STAGE_NOTEBOOKS, "no stage notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean_and_parameterized(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "mmafm", "kernelspec must be 'mmafm'"
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name} cell {index} committed with outputs"
            assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"
    _assigned(_parameters_cell(path))


@pytest.mark.parametrize("path", STAGE_NOTEBOOKS, ids=lambda p: p.name)
def test_stage_parameters_match_config(path):
    assert path.stem in list_stages(), f"{path.name} has no registered stage"
    params = _assigned(_parameters_cell(path))
    fields = stage_config_fields(path.stem)
    assert set(params) == set(fields), (
        f"{path.name}: only in notebook {sorted(set(params) - set(fields))}, "
        f"only in config {sorted(set(fields) - set(params))}"
    )
    for name, default in fields.items():
        if default is dataclasses.MISSING:
            continue
        expected = list(default) if isinstance(default, tuple) else default
        assert params[name] == expected, f"{path.name}: {name} = {params[name]!r}, config default {default!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path):
    """papermill's own reader of the parameters cell (its ``inspect_notebook``, what JupyterLab
    users and ``papermill --help-notebook`` see) finds every parameter: it skips a line holding
    two ``=`` (a mixture written ``a=1``), with only a warning."""
    import papermill

    assert set(papermill.inspect_notebook(str(path))) == set(_assigned(_parameters_cell(path)))


def test_every_stage_has_a_notebook():
    names = {p.stem for p in STAGE_NOTEBOOKS}
    library = {s for s in list_stages() if get_stage(s).module.startswith("mmafm.stages.")}  # not tests' toys
    assert library <= names, f"stages without notebook: {library - names}"


def test_parameters_cells_are_in_sync():
    """scripts/sync_parameters.py writes every stage's parameters cell from its config."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "scripts" / "sync_parameters.py"), "--check"],
                          capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr


def test_sync_names_a_stage_without_a_notebook(monkeypatch, capsys):
    """A registered stage whose notebook does not exist yet is named (exit 2); the others still sync."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("sync_parameters", root / "scripts" / "sync_parameters.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "list_stages", lambda: ["02_text_pretrain", "98_not_written_yet"])
    assert script.main(["--check"]) == 2
    err = capsys.readouterr().err
    assert "'98_not_written_yet'" in err and "notebooks/98_not_written_yet.ipynb" in err
    assert "02_text_pretrain" not in err
