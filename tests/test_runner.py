"""The papermill stage runner and pipelines, on a toy stage defined here (no model code).

The toy notebook really runs in the `mmafm` Jupyter kernel through papermill; it writes a
metric, a figure and a manifest through the library's StageDir like a real stage.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mmafm.cli import main as cli_main
from mmafm.config import ConfigError
from mmafm.runner import StageFailed, load_pipeline, run_pipeline, run_stage
from mmafm.stages.base import StageConfig, read_manifest

from _stage_helpers import toy_notebook, toy_workspace

TOY_CODE = """
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from pathlib import Path
from mmafm.stages.base import StageDir
stage = StageDir(out_dir, "{name}")
if fail:
    raise ValueError("toy failure requested")
Path(out_dir, "count.txt").write_text(str(int(Path(out_dir, "count.txt").read_text() if Path(out_dir, "count.txt").exists() else 0) + 1))
stage.log({{"step": 1, "value": scale * 2}})
fig, ax = plt.subplots(); ax.plot([0, 1], [0, scale]); stage.save_figure(fig, "line")
stage.write_manifest({{"result": str(Path(out_dir, "count.txt")), "upstream": upstream}})
"""


@dataclass
class ToyConfig(StageConfig):
    scale: float = 1.0
    fail: bool = False
    upstream: str = ""


TOY_PARAMETERS = 'out_dir = ""\nseed = 0\nscale = 1.0\nfail = False\nupstream = ""'


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    notebooks = {name: toy_notebook(TOY_PARAMETERS, TOY_CODE.format(name=name)) for name in ("toy_a", "toy_b")}
    return toy_workspace(tmp_path, monkeypatch, notebooks, ToyConfig)


@pytest.mark.slow
def test_run_stage_skip_force_and_failure(workspace):
    runs = workspace / "runs"
    out = run_stage("toy_a", params={"scale": 3}, run_id="r1", runs_dir=runs)
    manifest = read_manifest(out)
    assert manifest["status"] == "complete"
    assert yaml.safe_load((out / "config.yaml").read_text())["scale"] == 3.0
    assert (out / "toy_a.ipynb").is_file() and (out / "config.yaml").is_file()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["value"] == 6.0
    assert (out / "figures" / "line.png").stat().st_size > 0

    run_stage("toy_a", params={"scale": 3}, run_id="r1", runs_dir=runs)  # complete: skipped
    assert (out / "count.txt").read_text() == "1"
    run_stage("toy_a", params={"scale": 3}, run_id="r1", runs_dir=runs, force=True)
    assert (out / "count.txt").read_text() == "1"  # forced re-run starts from a clean folder

    with pytest.raises(StageFailed) as info:
        run_stage("toy_a", params={"fail": True}, run_id="r2", runs_dir=runs)
    message = str(info.value)
    assert "toy_a.ipynb" in message and "cell 1" in message and "toy failure requested" in message
    assert (runs / "r2" / "toy_a" / "toy_a.ipynb").is_file()  # executed notebook kept
    assert not (runs / "r2" / "toy_a" / "manifest.json").exists()


def test_bad_config_fails_before_running(workspace):
    with pytest.raises(ConfigError, match="unknown key"):
        run_stage("toy_a", params={"scael": 2}, run_id="r3", runs_dir=workspace / "runs")
    with pytest.raises(ConfigError, match="key 'scale': expected float"):
        run_stage("toy_a", params={"scale": "big"}, run_id="r3", runs_dir=workspace / "runs")
    assert not (workspace / "runs" / "r3" / "toy_a" / "toy_a.ipynb").exists()
    with pytest.raises(ConfigError, match="unknown stage"):
        run_stage("nope", run_id="r3", runs_dir=workspace / "runs")


def test_cli_exit_codes(workspace, capsys):
    assert cli_main(["run", "toy_a", "-p", "scale=oops", "--runs-dir", str(workspace / "runs")]) == 2
    assert "key 'scale'" in capsys.readouterr().err
    assert cli_main(["pipeline", "run", str(workspace / "missing.yaml")]) == 2


def test_cli_lists_models_by_family(capsys):
    import mmafm
    from mmafm.registry import model_family

    assert cli_main(["list", "models", "--family", "clip"]) == 0
    assert capsys.readouterr().out.split() == [n for n in mmafm.list_models() if model_family(n) == "clip"]
    assert cli_main(["list", "models", "afm_2025_server*", "--params", "--family", "text", "--family", "ptmoe"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "KV cache @ 4096 (bfloat16)" in table[0]  # the text table's columns
    assert [line.split("`")[1] for line in table[2:]] == ["afm_2025_server", "afm_2025_server_tiny"]
    tiny = mmafm.create_model("afm_2025_server_tiny", device="meta")
    assert f"| {sum(p.numel() for p in tiny.parameters()):,} |" in table[3]


@pytest.mark.slow
def test_pipeline_wires_outputs(workspace):
    pipeline = workspace / "p.yaml"
    pipeline.write_text(
        "run_id: demo\nruns_dir: runs\nstages:\n"
        "  - stage: toy_a\n    params: {scale: 2.0}\n"
        "  - stage: toy_b\n    inputs: {upstream: toy_a.result}\n"
    )
    run_dir = run_pipeline(pipeline)
    upstream = read_manifest(run_dir / "toy_b")["outputs"]["upstream"]
    assert upstream == read_manifest(run_dir / "toy_a")["outputs"]["result"]
    report = (run_dir / "REPORT.md").read_text()
    assert "## toy_a" in report and "## toy_b" in report and "figures/line.png" in report


def test_pipeline_validation(workspace):
    bad = workspace / "bad.yaml"
    bad.write_text("run_id: x\nstages:\n  - stage: toy_b\n    inputs: {upstream: toy_a.result}\n")
    with pytest.raises(ConfigError, match="earlier stage"):
        load_pipeline(bad)
    bad.write_text("run_id: x\nstages:\n  - stage: toy_a\n    parms: {}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_pipeline(bad)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "pipelines").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_pipelines_run_stages_in_number_order(path):
    """Stage numbers are the recipe's run order: a pipeline lists them increasing, and a stage
    reads only outputs of stages that ran before it."""
    from mmafm.runner import load_pipeline

    pipeline = load_pipeline(path)
    numbers = [int(step.stage.split("_", 1)[0]) for step in pipeline.stages if step.stage]  # notebook entries: no number
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), f"{path.name}: stages out of order {numbers}"
    seen: set[str] = set()
    for step in pipeline.stages:
        for parameter, ref in step.inputs.items():
            source = ref.split(".", 1)[0]
            assert source in seen, f"{path.name}: {step.name}.{parameter} reads {ref} from a later stage"
        seen.add(step.name)


def test_stage_numbers_are_unique():
    from mmafm.stages import get_stage, list_stages

    library = [name for name in list_stages() if get_stage(name).module.startswith("mmafm.stages.")]  # not toys
    numbers = [name.split("_", 1)[0] for name in library]
    assert all(n.isdigit() and len(n) == 2 for n in numbers), library
    assert len(set(numbers)) == len(numbers), f"two stages share a number: {library}"
