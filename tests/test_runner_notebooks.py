"""Pipeline entries that name a parameterized notebook (``- notebook: NAME``), not a stage.

Toy notebooks written here really run in the `mmafm` kernel through papermill; the checks that
need no kernel (unknown parameter, wrong type, bad names) run none. The shipped
configs/pipelines/reproduce.yaml is plan-checked (every entry resolves) without running it.
"""

import json
from pathlib import Path

import pytest
import yaml

from mmafm.cli import main as cli_main
from mmafm.config import ConfigError
from mmafm.runner import (
    StageFailed,
    _seed_overrides,
    load_pipeline,
    notebook_parameters,
    plan_pipeline,
    run_pipeline,
)
from mmafm.stages.base import read_manifest

from _stage_helpers import toy_notebook, toy_workspace

ROOT = Path(__file__).resolve().parents[1]

TOY_CODE = """
import json
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
count = out / "count.txt"
count.write_text(str(int(count.read_text()) + 1 if count.exists() else 1))
if fail:  # a stage run inside the notebook finished (its manifest), then the notebook fails
    (out / "manifest.json").write_text(json.dumps({"stage": "inner", "status": "complete", "outputs": {}}))
    raise ValueError("toy notebook failure requested")
(out / "summary.json").write_text(json.dumps({"value": scale * steps, "label": label, "rows": [1, 2]}))
fig, ax = plt.subplots(); ax.plot([0, 1], [0, scale]); fig.savefig(out / "line.png")
"""


TOY_PARAMETERS = ('# Parameters (papermill overrides these)\nupstream = "runs/x/summary.json"  # an input\n'
                  'out_dir = "runs/toy"\nscale = 1.5\nsteps = 2\nlabel = "a"\nfail = False')


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    notebooks = {name: toy_notebook(TOY_PARAMETERS, TOY_CODE, title="toy") for name in ("toy_nb", "toy_nb2")}
    return toy_workspace(tmp_path, monkeypatch, notebooks)


def _pipeline(workspace: Path, first: str = "params: {steps: 3}", second: str = "params: {}") -> Path:
    path = workspace / "p.yaml"
    path.write_text(
        "run_id: nb\nruns_dir: runs\nstages:\n"
        f"  - notebook: toy_nb\n    {first}\n"
        f"  - notebook: toy_nb2\n    {second}\n    inputs: {{upstream: toy_nb.summary_json}}\n"
    )
    return path


def test_notebook_parameters_are_read_from_the_parameters_cell(workspace):
    assert notebook_parameters("toy_nb") == {"upstream": "runs/x/summary.json", "out_dir": "runs/toy",
                                             "scale": 1.5, "steps": 2, "label": "a", "fail": False}
    with pytest.raises(ConfigError, match="no notebook"):
        notebook_parameters("nope")


def test_unknown_parameter_or_wrong_type_fails_before_anything_runs(workspace, capsys):
    run_dir = workspace / "runs" / "nb"
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) 'stpes' \(did you mean 'steps'\?\)"):
        plan_pipeline(_pipeline(workspace, "params: {stpes: 3}"), run_dir)
    with pytest.raises(ConfigError, match="parameter 'steps': expected int .*got str 'ten'"):
        plan_pipeline(_pipeline(workspace, "params: {steps: ten}"), run_dir)
    with pytest.raises(ConfigError, match="parameter 'fail': expected bool"):
        plan_pipeline(_pipeline(workspace), run_dir, overrides={"toy_nb2": {"fail": 1}})
    with pytest.raises(ConfigError, match="did you mean 'scale'"):  # a -p override is checked too
        plan_pipeline(_pipeline(workspace), run_dir, overrides={"toy_nb2": {"scael": 2.0}})
    with pytest.raises(ConfigError, match="out_dir is set by the runner"):
        plan_pipeline(_pipeline(workspace, "params: {out_dir: elsewhere}"), run_dir)
    with pytest.raises(ConfigError, match="its stages are: toy_nb, toy_nb2"):
        plan_pipeline(_pipeline(workspace), run_dir, only=["toy_nb3"])
    bad = workspace / "bad.yaml"
    bad.write_text("run_id: x\nstages:\n  - notebook: toy_nb\n    stage: 00_data\n")
    with pytest.raises(ConfigError, match="exactly one of"):
        load_pipeline(bad)
    bad.write_text("run_id: x\nstages:\n  - notebook: missing_nb\n")
    with pytest.raises(ConfigError, match="no notebook"):
        load_pipeline(bad)
    assert cli_main(["pipeline", "run", str(_pipeline(workspace)), "-p", "toy_nb.stpes=3"]) == 2  # the CLI's -p
    assert "did you mean 'steps'" in capsys.readouterr().err
    assert not (workspace / "runs").exists()  # nothing ran, no folder was made

    plans = plan_pipeline(_pipeline(workspace), run_dir)  # an int widens to a float; inputs stand in
    assert plans[0].config.steps == 3 and plans[0].config.out_dir == str(run_dir / "toy_nb")
    assert plans[1].placeholders == {"upstream"} and all(plan.runs for plan in plans)
    assert plans[1].config.upstream == "<toy_nb.summary_json>"  # an output not made yet stands in


def test_seeds_set_seed_only_where_a_notebook_has_one(workspace):
    pipeline = load_pipeline(_pipeline(workspace))
    assert _seed_overrides(pipeline, {}, 4) == {}  # the toy notebooks have no `seed` parameter


@pytest.mark.slow
def test_notebook_entry_runs_is_skipped_on_rerun_and_failure_is_not_complete(workspace):
    path = _pipeline(workspace)
    run_dir = run_pipeline(path, overrides={"toy_nb": {"scale": 2}})
    first = read_manifest(run_dir / "toy_nb")
    assert first["notebook"] == "toy_nb" and first["config"]["scale"] == 2.0 and first["config"]["steps"] == 3
    outputs = first["outputs"]
    assert outputs["out_dir"] == str(run_dir / "toy_nb")
    assert Path(outputs["notebook"]).is_file() and outputs["summary_json"] == str(run_dir / "toy_nb" / "summary.json")
    assert first["summary"]["value"] == 6.0 and first["summary"]["label"] == "a" and "rows" not in first["summary"]
    assert first["figures"] == [str(run_dir / "toy_nb" / "line.png")]
    second = read_manifest(run_dir / "toy_nb2")  # its input came from the first entry's manifest
    assert second["config"]["upstream"] == outputs["summary_json"]
    assert yaml.safe_load((run_dir / "toy_nb2" / "parameters.yaml").read_text())["upstream"] == outputs["summary_json"]
    report = (run_dir / "REPORT.md").read_text()
    assert "## toy_nb" in report and "| value | 6 |" in report and "toy_nb/line.png" in report

    run_pipeline(path, overrides={"toy_nb": {"scale": 2}})  # complete: both skipped
    assert (run_dir / "toy_nb" / "count.txt").read_text() == "1"
    run_pipeline(path, only=["toy_nb2"], force=True)  # --only + --force re-run one entry from scratch
    assert (run_dir / "toy_nb2" / "count.txt").read_text() == "1"
    assert (run_dir / "toy_nb" / "count.txt").read_text() == "1"

    with pytest.raises(StageFailed, match="toy notebook failure requested"):
        run_pipeline(path, run_id="bad", overrides={"toy_nb2": {"fail": True}})
    failed = workspace / "runs" / "bad" / "toy_nb2"
    assert (failed / "toy_nb2.ipynb").is_file()  # the executed notebook is kept
    assert not (failed / "manifest.json").exists()  # the inner manifest is set aside, nothing marks it complete
    assert json.loads((failed / "manifest.incomplete.json").read_text())["stage"] == "inner"
    plans = plan_pipeline(path, workspace / "runs" / "bad", overrides={"toy_nb2": {"fail": True}})
    assert [plan.runs for plan in plans] == [False, True]  # the failed entry runs again
    with pytest.raises(ConfigError, match="fail: True -> False"):  # not into its folder with other parameters
        plan_pipeline(path, workspace / "runs" / "bad")


def test_reproduce_pipeline_plans_without_running(tmp_path):
    """Every entry of configs/pipelines/reproduce.yaml resolves: stages' configs, notebooks'
    parameter names and types, inputs from earlier entries; nothing runs."""
    path = ROOT / "configs" / "pipelines" / "reproduce.yaml"
    pipeline = load_pipeline(path)
    plans = plan_pipeline(path, tmp_path / "reproduce")
    names = [plan.entry.name for plan in plans]
    assert {"reproduce_pretraining", "reproduce_distillation", "reproduce_post_training",
            "reproduce_compression"} <= set(names)
    assert all(plan.runs for plan in plans) and not (tmp_path / "reproduce").exists()
    for entry in pipeline.stages:
        if entry.notebook:  # every notebook input is wired from an earlier entry of this pipeline
            assert entry.inputs, entry.name
            assert set(entry.inputs) | set(entry.params) <= set(notebook_parameters(entry.notebook))
