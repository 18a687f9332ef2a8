"""Reliability of runs (issue 12): whole pipelines checked before anything runs, no resume into
another config, no litter from killed writers, papermill typos caught, numbers over seeds.

The toy stage below really runs in the `mmafm` Jupyter kernel through papermill (its notebook
registers the same config there and builds it with ``make_config``, as a stage notebook does);
most checks need no kernel at all, because they must fail before one starts.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import papermill
import pytest
import torch
import yaml

from mmafm.cli import main as cli_main
from mmafm.config import ConfigError, dump_yaml
from mmafm.report import mean_std, render_seeds, seed_report_path, write_seed_report
from mmafm.runner import parse_seeds, plan_pipeline, run_pipeline, run_stage
from mmafm.stages import injected_parameter_names, make_config
from mmafm.stages.base import (
    ManifestError,
    ResumeMismatch,
    StageDir,
    TrainStageConfig,
    check_resume,
    check_tokenizer_vocab,
    config_differences,
    read_manifest,
    require_inputs,
)
from mmafm.train.trainer import Trainer

from _stage_helpers import toy_notebook, toy_workspace

ROOT = Path(__file__).resolve().parents[1]

# The toy stage's config: executed here and, verbatim, in the notebook's kernel.
CONFIG_SOURCE = '''
from dataclasses import dataclass, field
from mmafm.stages.base import StageConfig

@dataclass
class RelToyConfig(StageConfig):
    lr: float = 0.003
    max_steps: int = 3
    init: str = field(default="", metadata={"path": "checkpoint"})
    data: str = field(default="", metadata={"path": "dir"})
    rank: int = 0
'''
exec(CONFIG_SOURCE, globals())  # defines RelToyConfig in this module

NOTEBOOK_CODE = CONFIG_SOURCE + '''
from mmafm.stages import make_config, register_stage
from mmafm.stages.base import StageDir
register_stage("NAME", RelToyConfig, lambda cfg: {})
cfg = make_config("NAME", globals())
stage = StageDir(cfg.out_dir, "NAME")
stage.write_manifest({"result": cfg.out_dir, "rank": cfg.rank},
                     summary={"twice_seed": 2 * cfg.seed, "steps": cfg.max_steps})
'''
PARAMETERS = '# Parameters (toy)\nout_dir = ""\nseed = 0\nlr = 0.003\nmax_steps = 3\ninit = ""\ndata = ""\nrank = 0'


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    notebooks = {name: toy_notebook(PARAMETERS, NOTEBOOK_CODE.replace("NAME", name)) for name in ("rel_a", "rel_b")}
    return toy_workspace(tmp_path, monkeypatch, notebooks, RelToyConfig)


def _pipeline(workspace: Path, second_stage: str = "") -> Path:
    path = workspace / "p.yaml"
    path.write_text(
        "run_id: demo\nruns_dir: runs\nstages:\n"
        "  - stage: rel_a\n    params: {lr: 0.01}\n"
        "  - stage: rel_b\n    inputs: {data: rel_a.result, rank: rel_a.rank}\n" + second_stage
    )
    return path


# ------------------------------------------------------------------ 1. fail before starting
def test_pipeline_checks_every_stage_before_the_first_runs(workspace):
    runs = workspace / "runs"
    with pytest.raises(ConfigError, match="key 'lr'"):  # last stage's bad value
        run_pipeline(_pipeline(workspace), overrides={"rel_b": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="unknown key"):
        run_pipeline(_pipeline(workspace, "    params: {lr_typo: 1.0}\n"))
    with pytest.raises(ConfigError, match=r"'init' = '/no/such/ckpt': no such checkpoint"):
        run_pipeline(_pipeline(workspace, "    params: {init: /no/such/ckpt}\n"))
    assert not runs.exists()  # the first stage never started


def test_unknown_stage_in_overrides_or_only_is_an_error(workspace, capsys):
    with pytest.raises(ConfigError, match=r"\['rel_x'\] not in pipeline .*its stages are: rel_a, rel_b"):
        run_pipeline(_pipeline(workspace), overrides={"rel_x": {"lr": 1.0}})
    with pytest.raises(ConfigError, match=r"--only names stage\(s\) \['rel_c'\]"):
        run_pipeline(_pipeline(workspace), only=["rel_c"])
    args = ["pipeline", "run", str(_pipeline(workspace)), "-p", "rel_x.lr=1.0"]
    assert cli_main(args) == 2
    assert "rel_x" in capsys.readouterr().err and not (workspace / "runs").exists()


def test_upstream_outputs_are_placeholders_of_the_right_type(workspace):
    plans = plan_pipeline(_pipeline(workspace), workspace / "runs" / "demo")
    later = plans[1].config
    assert later.data == "<rel_a.result>" and later.rank == 0  # str placeholder; int default
    assert plans[1].placeholders == {"data", "rank"} and all(p.runs for p in plans)
    # an override wins over the wiring and is then checked like any path
    with pytest.raises(ConfigError, match="'data' = '/no/such/dir': no such folder"):
        plan_pipeline(_pipeline(workspace), workspace / "runs" / "demo", overrides={"rel_b": {"data": "/no/such/dir"}})
    # a stage run alone reads its input from the manifest, which must exist
    with pytest.raises(ManifestError, match="stage rel_b reads data from rel_a.result"):
        plan_pipeline(_pipeline(workspace), workspace / "runs" / "demo", only=["rel_b"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipelines_plan_from_scratch(path, tmp_path):
    """Every stage of every shipped pipeline resolves before anything has run."""
    plans = plan_pipeline(path, tmp_path / "run")
    assert all(plan.runs for plan in plans)
    for plan in plans:
        assert plan.placeholders == set(plan.entry.inputs)
        for param, ref in plan.entry.inputs.items():  # every wired input is a free-form string
            assert getattr(plan.config, param) == f"<{ref}>"


def test_missing_input_leaves_no_stage_folder(workspace, tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint"):
        run_stage("rel_a", params={"init": str(tmp_path / "nothing")}, run_id="r", runs_dir=workspace / "runs")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, expected a folder"):
        run_stage("rel_a", params={"data": str(tmp_path / "a_file")}, run_id="r", runs_dir=workspace / "runs")
    assert not (workspace / "runs").exists()


def test_stage_path_fields_are_declared():
    """The real stages declare their inputs; the check uses that metadata."""
    import dataclasses

    from mmafm.stages import get_stage

    def kinds(stage):
        return {f.name: f.metadata["path"] for f in dataclasses.fields(get_stage(stage).config_cls) if "path" in f.metadata}

    assert kinds("02_text_pretrain") == {"init_checkpoint": "checkpoint", "tokens_dir": "dir", "tokenizer": "file",
                                        "distill_from": "model"}
    assert kinds("03_vl_alignment") == {"pairs_dir": "dir", "tokenizer": "file", "image_tower": "model", "text_checkpoint": "model"}
    assert kinds("01_clip_pretrain") == {"pairs_dir": "dir", "tokenizer": "file", "fashion_mnist": "dir"}
    config = make_config("01_clip_pretrain", {"out_dir": "/tmp/x", "tokenizer": "openclip"})  # a keyword, not a path
    assert config.tokenizer == "openclip"


def test_require_inputs_names_the_first_empty_field_and_its_upstream_output():
    config = RelToyConfig(init="", data="")
    hints = {"init": "02's `checkpoint`", "data": "00_data's `data_dir`"}
    with pytest.raises(ConfigError) as caught:  # checked in the mapping's order
        require_inputs(config, "rel", hints)
    assert str(caught.value) == "rel: init is empty; pass 02's `checkpoint`"
    with pytest.raises(ConfigError) as caught:
        require_inputs(RelToyConfig(init="ckpt", data=""), "rel", hints)
    assert str(caught.value) == "rel: data is empty; pass 00_data's `data_dir`"
    with pytest.raises(ConfigError) as caught:  # reversed order: the other field is named first
        require_inputs(config, "rel", dict(reversed(hints.items())))
    assert str(caught.value) == "rel: data is empty; pass 00_data's `data_dir`"
    require_inputs(RelToyConfig(init="ckpt", data="dir"), "rel", hints)  # both given: no error


@pytest.mark.parametrize("stage, empty, given, message", [
    # the messages the stages raised before they shared require_inputs, copied verbatim
    ("compression", "tokens_dir", {"checkpoint": "c"},
     "11_compression: tokens_dir is empty; pass 02_text_pretrain's `checkpoint` and 00_data's `tokens_dir` "
     "(configs/pipelines/tiny.yaml wires them)"),
    ("rlhf", "reward_model", {"checkpoint": "c", "tokenizer": "t", "reward": "reward_model"},
     "09_rlhf: reward_model is empty; pass 07_sft's `checkpoint`, 08_reward_model's `reward_model` and 00_data's "
     "`tokenizer` (configs/pipelines/tiny.yaml wires them)"),
    ("continued_pretrain", "data_dir", {"init_checkpoint": "c", "tokenizer": "t"},
     "04_continued_pretrain: data_dir is empty; pass 00_data's `data_dir`"),
    ("text_pretrain", "tokenizer", {"tokens_dir": "d"},
     "02_text_pretrain: tokenizer is empty; pass the 00_data stage's `tokenizer` output"),
])
def test_stages_name_an_empty_upstream_input_as_before(stage, empty, given, message, tmp_path):
    import importlib
    import typing

    module = importlib.import_module(f"mmafm.stages.{stage}")
    config_cls = typing.get_type_hints(module.run)["cfg"]
    config = config_cls(out_dir=str(tmp_path / "out"), **given, **{empty: ""})
    with pytest.raises(ConfigError) as caught:
        module.run(config)
    assert str(caught.value) == message
    assert not (tmp_path / "out").exists()  # refused before the stage folder is made


def test_check_tokenizer_vocab_names_both_sizes():
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(vocab_size=64))
    check_tokenizer_vocab("s", model, SimpleNamespace(vocab_size=64), "tok.json", "the base")  # equal: no error
    with pytest.raises(ConfigError) as caught:
        check_tokenizer_vocab("s", model, SimpleNamespace(vocab_size=48), "tok.json", "the policy")
    assert str(caught.value) == ("s: the policy has a 64-token vocabulary, tokenizer tok.json has 48; "
                                 "pass the tokenizer it was trained with")
    with pytest.raises(ConfigError) as caught:
        check_tokenizer_vocab("s", model, SimpleNamespace(vocab_size=48), "tok.json", "the base", refer_as="the base")
    assert str(caught.value) == ("s: the base has a 64-token vocabulary, tokenizer tok.json has 48; "
                                 "pass the tokenizer the base was trained with")


# ------------------------------------------------------------------ 2. resume only the same run
def _plant_unfinished(stage_dir: Path, config) -> None:
    """A killed run's folder: its config and a checkpoint pointer."""
    (stage_dir / "checkpoints").mkdir(parents=True)
    dump_yaml(config, stage_dir / "config.yaml")
    (stage_dir / "checkpoints" / "latest.json").write_text('{"step": 1, "checkpoint": "step_00000001"}')


def test_resume_with_another_lr_is_refused(workspace):
    stage_dir = workspace / "runs" / "r" / "rel_a"
    _plant_unfinished(stage_dir, RelToyConfig(out_dir=str(stage_dir), lr=0.003))
    with pytest.raises(ResumeMismatch) as info:
        run_stage("rel_a", params={"lr": 0.001, "max_steps": 5}, run_id="r", runs_dir=workspace / "runs")
    message = str(info.value)
    assert "lr: 0.003 -> 0.001" in message and "max_steps: 3 -> 5" in message
    assert "--force" in message and "--run-id" in message and "out_dir:" not in message
    assert not (stage_dir / "rel_a.ipynb").exists()  # nothing ran
    with pytest.raises(ResumeMismatch):  # the pipeline refuses before its first stage
        plan_pipeline(_pipeline(workspace), workspace / "runs" / "r", only=["rel_a"],
                      overrides={"rel_a": {"lr": 0.001}})


@pytest.mark.slow
def test_same_config_resumes_and_cleans_litter_force_starts_over(workspace):
    runs = workspace / "runs"
    stage_dir = runs / "r" / "rel_a"
    _plant_unfinished(stage_dir, RelToyConfig(out_dir=str(stage_dir)))
    litter = [stage_dir / "checkpoints" / ".step_00000002.safetensors.ab12cd34.tmp",
              stage_dir / "checkpoints" / "step_00000002.safetensors",  # its JSON was never written
              stage_dir / ".metrics.jsonl.x9y8z7w6.tmp"]
    for path in litter:
        path.write_bytes(b"half")
    keep = stage_dir / "notes.tmp"
    keep.write_text("mine")
    run_stage("rel_a", run_id="r", runs_dir=runs)  # the same (default) config: resumes
    assert read_manifest(stage_dir)["status"] == "complete"
    assert not any(path.exists() for path in litter) and keep.exists()
    run_stage("rel_a", params={"lr": 0.5}, run_id="r", runs_dir=runs, force=True)  # starts over
    assert yaml.safe_load((stage_dir / "config.yaml").read_text())["lr"] == 0.5 and not keep.exists()


def _tiny_trainer_run(stage_dir: Path, config: TrainStageConfig) -> Trainer:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)

    class Task:
        def __init__(self):
            self.model = model

        def training_forward(self, batch):
            return {"mse": ((self.model(batch[0]) - batch[1]) ** 2).mean()}, {}

    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(3)]
    trainer = Trainer(Task(), data, config.train_config(), StageDir(stage_dir, "tiny"))
    trainer.fit()
    return trainer


def test_checkpoint_metadata_guards_a_folder_without_config_file(tmp_path):
    """A run started without the runner (papermill directly, torchrun) has no config.yaml: the
    trainer settings in its checkpoint are compared instead."""
    config = TrainStageConfig(out_dir=str(tmp_path), max_steps=2, ckpt_every=1, warmup_steps=5, lr=0.01)
    _tiny_trainer_run(tmp_path, config)
    assert not (tmp_path / "config.yaml").exists()
    check_resume(tmp_path, config)  # same settings (warm-up capped at max_steps - 1 both times)
    check_resume(tmp_path, TrainStageConfig(out_dir="elsewhere", max_steps=2, ckpt_every=9, warmup_steps=5, lr=0.01, parallel="ddp"))
    with pytest.raises(ResumeMismatch) as info:
        check_resume(tmp_path, TrainStageConfig(out_dir=str(tmp_path), max_steps=2, warmup_steps=5, lr=0.02))
    assert "lr: 0.01 -> 0.02" in str(info.value) and "step_00000002.json" in str(info.value)


def test_config_differences_name_keys_both_ways():
    assert config_differences({"a": 1, "b": [1, 2], "out_dir": "x"}, {"a": 1.0, "b": (1, 2), "out_dir": "y"}) == {}
    assert config_differences({"a": 1, "gone": 2}, {"a": 3, "new": 4}) == {
        "a": (1, 3), "gone": (2, "<absent>"), "new": ("<absent>", 4)}


def test_interactive_runs_get_a_folder_per_config(workspace):
    first = make_config("rel_a", {"out_dir": "", "lr": 0.003})
    again = make_config("rel_a", {"out_dir": "", "lr": 0.003})
    other = make_config("rel_a", {"out_dir": "", "lr": 0.001})
    assert Path(first.out_dir).parent == workspace / "runs" / "interactive" / "rel_a"
    assert first.out_dir == again.out_dir != other.out_dir
    # a folder given explicitly is guarded like the runner's
    _plant_unfinished(Path(first.out_dir), first)
    with pytest.raises(ResumeMismatch, match="lr: 0.003 -> 0.001"):
        make_config("rel_a", {"out_dir": first.out_dir, "lr": 0.001})


# ------------------------------------------------------------------ 4. no litter
def test_opening_a_stage_dir_removes_what_a_killed_writer_left(tmp_path):
    config = TrainStageConfig(out_dir=str(tmp_path), max_steps=2, ckpt_every=1)
    _tiny_trainer_run(tmp_path, config)
    checkpoints = tmp_path / "checkpoints"
    complete = sorted(p.name for p in checkpoints.iterdir())
    planted = [checkpoints / ".step_00000003.safetensors.k2j4h6g8.tmp", checkpoints / ".latest.json.abcdefgh.tmp",
               checkpoints / "step_00000003.safetensors", tmp_path / "figures" / ".loss.png.0a1b2c3d.tmp"]
    shutil.copy(checkpoints / "step_00000002.safetensors", planted[2])
    for path in planted[:2] + planted[3:]:
        path.write_bytes(b"partial")
    kept = [tmp_path / "my.tmp", tmp_path / ".hidden", checkpoints / ".x.tmp"]  # not atomic-write names
    for path in kept:
        path.write_text("keep")
    StageDir(tmp_path, "tiny")
    assert not any(p.exists() for p in planted) and all(p.exists() for p in kept)
    assert sorted(p.name for p in checkpoints.iterdir() if p not in kept) == complete
    resumed = _tiny_trainer_run(tmp_path, TrainStageConfig(out_dir=str(tmp_path), max_steps=3, ckpt_every=1))
    assert resumed.step == 3


# ------------------------------------------------------------------ 6. papermill typos
def test_injected_names_are_read_from_the_kernel_history():
    history = ["", "# Parameters (defaults)\nout_dir = ''\nlr = 0.1", "# Parameters\nmax_stpes = 5\nlr = 0.2\n",
               "x = 1  # an ordinary cell", "# Parameters\nlr: float = 0.3"]
    assert injected_parameter_names({"In": history}) == ["out_dir", "lr", "max_stpes"]
    assert injected_parameter_names({}) == []  # not a notebook: nothing to check
    with pytest.raises(ConfigError, match=r"'max_stpes' \(did you mean 'max_steps'\?\)"):
        make_config("rel_a", {"In": history, "out_dir": "/tmp/x"})


def test_papermill_run_with_a_typo_fails_naming_the_closest_parameter(workspace):
    notebook = str(workspace / "notebooks" / "rel_a.ipynb")
    with pytest.raises(papermill.PapermillExecutionError) as info:
        papermill.execute_notebook(notebook, str(workspace / "typo.ipynb"), parameters={"max_stpes": 5},
                                   kernel_name="mmafm", progress_bar=False, cwd=str(workspace))
    assert "unknown parameter(s) 'max_stpes' (did you mean 'max_steps'?)" in info.value.evalue
    # the right names pass: the slow tests below run this notebook through the runner


@pytest.mark.slow
def test_papermill_cli_on_a_stage_notebook_rejects_a_typo(tmp_path):
    """The issue's command, on the real text-pretraining notebook: it stops before training."""
    papermill_cli = Path(sys.executable).with_name("papermill")
    done = subprocess.run(
        [str(papermill_cli), "notebooks/02_text_pretrain.ipynb", str(tmp_path / "out.ipynb"), "-p", "max_stpes", "5",
         "-k", "mmafm"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "'max_stpes' (did you mean 'max_steps'?)" in done.stdout + done.stderr


# ------------------------------------------------------------------ 7. numbers over seeds
def _fake_seed_runs(root: Path, values: list[float]) -> list[Path]:
    runs = []
    for seed, value in enumerate(values):
        run = root / f"rep-seed{seed}"
        StageDir(run / "01_x", "01_x").write_manifest({}, summary={"acc": value, "params": 1234, "name": "tiny",
                                                                   "per_class": [1, 2]})
        StageDir(run / "02_y", "02_y").write_manifest({}, summary={"ppl": 60.0 + seed} if seed < 2 else {})
        runs.append(run)
    return runs


def test_seed_report_gives_mean_and_sample_std(tmp_path, capsys):
    values = [0.344, 0.267, 0.301]
    runs = _fake_seed_runs(tmp_path, values)
    text = render_seeds(runs)
    mean, std = statistics.mean(values), statistics.stdev(values)
    assert f"| acc | {mean:.4g} ± {std:.2g} | 3 | 0.344 | 0.267 | 0.301 |" in text
    assert "| params | 1234 (exact) | 3 |" in text and "| name | tiny (exact) | 3 |" in text
    assert "per_class" not in text  # lists stay in the stage report's figures
    assert f"| ppl | {60.5:.4g} ± {statistics.stdev([60.0, 61.0]):.2g} | 2 | 60 | 61 |  |" in text
    assert mean_std([2.0]) == (2.0, 0.0)
    assert seed_report_path(runs) == tmp_path / "rep" / "RESULTS.md"
    with pytest.raises(ManifestError, match="pass --out"):
        seed_report_path([tmp_path / "rep-seed0", tmp_path / "other"])
    assert cli_main(["report", "--seeds", *map(str, runs)]) == 0
    assert (tmp_path / "rep" / "RESULTS.md").read_text() == text
    assert write_seed_report(runs[:2], tmp_path / "two.md").read_text().startswith("# Results over 2 runs")


def test_seeds_option_parses_counts_and_lists(workspace):
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("0,4,7") == [0, 4, 7] and parse_seeds("5,") == [5]
    for bad in ("0", "x", "1,1", "-1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    with pytest.raises(ConfigError, match="conflicts with --seeds"):
        run_pipeline(_pipeline(workspace), seeds=[0, 1], overrides={"rel_a": {"seed": 3}})
    assert not (workspace / "runs").exists()


@pytest.mark.slow
def test_pipeline_runs_once_per_seed_and_aggregates(workspace):
    pipeline = workspace / "one.yaml"
    pipeline.write_text("run_id: demo\nstages:\n  - stage: rel_a\n")
    assert cli_main(["pipeline", "run", str(pipeline), "--seeds", "2"]) == 0
    runs = workspace / "runs"
    for seed in (0, 1):
        assert yaml.safe_load((runs / f"demo-seed{seed}" / "rel_a" / "config.yaml").read_text())["seed"] == seed
        assert read_manifest(runs / f"demo-seed{seed}" / "rel_a")["summary"]["twice_seed"] == 2 * seed
        assert (runs / f"demo-seed{seed}" / "REPORT.md").is_file()
    results = (runs / "demo" / "RESULTS.md").read_text()
    assert f"| twice_seed | 1 ± {statistics.stdev([0, 2]):.2g} | 2 | 0 | 2 |" in results
    assert "| steps | 3 (exact) | 2 |" in results
