"""DDP and FSDP2 under torchrun (2 processes, gloo on CPU) give the losses and weights of one
process on the same global batch, and resume exactly from their checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from mmafm.checkpoint import load_checkpoint
from mmafm.config import ConfigError
from mmafm.io import read_jsonl
from mmafm.stages.base import StageConfig, StageDir, read_manifest
from mmafm.train import parallelize

sys.path.insert(0, str(Path(__file__).parent))
import _train_script as tiny  # noqa: E402

SCRIPT = Path(__file__).parent / "_train_script.py"


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), "dist", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ddp"]["wrapping"] == "DistributedDataParallel:Parameter"
    assert results["fsdp"]["wrapping"] == "FSDPTinyNet:DTensor"  # sharded in place by fully_shard

    for mode in tiny.DIST_MODES:
        reference_dir = tmp_path / "reference" / mode
        reference = tiny.dist_run(mode, str(reference_dir), parallel="none")
        expected = _losses(reference)
        assert len(expected) == tiny.DIST_COMMON["max_steps"]
        assert expected[-1] < expected[0]
        full, resumed = _losses(results[mode]["full"]), _losses(results[mode]["resumed"])
        assert full == pytest.approx(expected, abs=1e-5), mode
        assert resumed == pytest.approx(expected, abs=1e-5), mode
        grad_norms = [r["grad_norm"] for r in results[mode]["full"] if "grad_norm" in r]
        assert grad_norms == pytest.approx([r["grad_norm"] for r in reference if "grad_norm" in r], rel=1e-4)

        # rank 0 wrote the full (gathered) weights, equal to the one-process ones
        want, _ = load_checkpoint(reference_dir / "checkpoints" / "final.safetensors")
        for run in ("full", "resumed"):
            got, meta = load_checkpoint(tmp_path / mode / run / "checkpoints" / "final.safetensors")
            assert sorted(got) == sorted(want) and meta["step"] == tiny.DIST_COMMON["max_steps"]
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)
        steps = [r["step"] for r in read_jsonl(tmp_path / mode / "resumed" / "metrics.jsonl") if "loss" in r]
        assert steps == list(range(1, tiny.DIST_COMMON["max_steps"] + 1))


def test_parallel_modes_need_a_process_group():
    assert parallelize(nn.Linear(2, 2), "none").__class__ is nn.Linear
    with pytest.raises(RuntimeError, match="torchrun"):
        parallelize(nn.Linear(2, 2), "ddp")
    with pytest.raises(ValueError, match="parallel"):
        parallelize(nn.Linear(2, 2), "pipeline")


def test_parallel_without_torchrun_falls_back_to_one_process(monkeypatch):
    from mmafm.train import TrainConfig, Trainer

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.warns(UserWarning, match="without torchrun"):
        trainer = Trainer(tiny.make_task(), tiny.global_batches(1, 4), TrainConfig(max_steps=1, parallel="ddp"))
    assert trainer.parallel == "none" and trainer.world_size == 1
    assert trainer.fit()[0]["step"] == 1


@dataclass
class _TinyStageConfig(StageConfig):
    max_steps: int = field(default=2, metadata={"min": 1})
    parallel: str = field(default="none", metadata={"choices": ("none", "ddp", "fsdp")})


def _tiny_stage(cfg: _TinyStageConfig) -> dict[str, str]:
    from mmafm.train import TrainConfig, Trainer

    stage_dir = StageDir(cfg.out_dir, "zz_tiny_train")
    config = TrainConfig(max_steps=cfg.max_steps, seed=cfg.seed, parallel=cfg.parallel, log_every=1)
    trainer = Trainer(tiny.make_task(seed=cfg.seed), tiny.global_batches(2, 4), config, stage_dir)
    trainer.fit()
    outputs = {"weights": str(trainer.final_path)}
    stage_dir.write_manifest(outputs, cfg)
    return outputs


def test_launch_runs_a_stage_function_without_its_notebook(tmp_path, monkeypatch):
    from mmafm.stages.base import ResumeMismatch
    from mmafm import stages
    from mmafm import launch

    stages.list_stages()  # load the real stages first, then add the test one for this test only
    stage = stages.Stage("zz_tiny_train", _TinyStageConfig, _tiny_stage, __name__)
    monkeypatch.setitem(stages._STAGES, "zz_tiny_train", stage)
    outputs = launch.main(["zz_tiny_train", "--runs-dir", str(tmp_path), "--run-id", "r1", "-p", "max_steps=3"])
    stage_dir = tmp_path / "r1" / "zz_tiny_train"
    assert outputs == {"weights": str(stage_dir / "checkpoints" / "final.safetensors")}
    assert read_manifest(stage_dir)["config"]["max_steps"] == 3
    assert [r["step"] for r in read_jsonl(stage_dir / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    with pytest.raises(ConfigError, match="max_steps"):
        launch.main(["zz_tiny_train", "--runs-dir", str(tmp_path), "--run-id", "r2", "-p", "max_steps=0"])
    # like `mmafm run`, the launcher records the config and refuses to continue r1 under another
    assert (stage_dir / "config.yaml").is_file()
    with pytest.raises(ResumeMismatch, match=r"max_steps: 3 -> 4"):
        launch.main(["zz_tiny_train", "--runs-dir", str(tmp_path), "--run-id", "r1", "-p", "max_steps=4"])


def _count_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from mmafm.train.distributed import sum_counts_over_ranks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        counts = {"empty caption": rank + 1} if rank == 0 else {"empty caption": 5, "undecodable image": 2}
        Path(out_dir, f"{rank}.json").write_text(json.dumps(sum_counts_over_ranks(counts)))
    finally:
        dist.destroy_process_group()


def test_skip_counts_are_summed_over_ranks(tmp_path):
    from mmafm.train.distributed import sum_counts_over_ranks

    assert sum_counts_over_ranks({"a": 3}) == {"a": 3}  # one process: unchanged
    torch.multiprocessing.spawn(_count_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):  # every rank gets the same total, as rank 0 writes it to the manifest
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == {"empty caption": 6, "undecodable image": 2}


@pytest.mark.parametrize("scale", [0.01, 10.0, float("inf")], ids=["unclipped", "clipped", "non_finite"])
def test_clip_grad_norm_equals_torch_and_leaves_unclipped_gradients_alone(scale):
    """``clip_grad_norm`` returns torch.nn.utils.clip_grad_norm_'s norm and gradients, bit for bit;
    a step under the limit does not write the gradients at all (their version counters stay)."""
    from mmafm.train.distributed import clip_grad_norm

    generator = torch.Generator().manual_seed(0)
    models = [nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    grads = [torch.randn(p.shape, generator=generator) * scale for p in models[0].parameters()]
    for model in models:
        for param, grad in zip(model.parameters(), grads):
            param.grad = grad.clone()
    versions = [p.grad._version for p in models[0].parameters()]
    got = clip_grad_norm(models[0], 1.0)
    want = torch.nn.utils.clip_grad_norm_(models[1].parameters(), 1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    for mine, theirs in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=0, equal_nan=True)
    written = [p.grad._version != v for p, v in zip(models[0].parameters(), versions)]
    assert written == [scale != 0.01] * len(written)
