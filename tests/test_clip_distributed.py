"""01_clip_pretrain under torchrun (2 processes, gloo on CPU): FSDP2 (``parallel=fsdp``, each
tower block its own unit) gives DDP's losses, evaluation and final weights.

DDP is the reference: it keeps a full replica per rank and all-reduces gradients, while FSDP2
shards every parameter, gathers each block for its forward and reduce-scatters the gradients.
Both see the same per-rank batches (each rank reads its own shards) and open_clip's loss gathers
the features of both ranks, so with float32 on CPU the two runs must agree to reduction-order
noise. The stage's own launcher (``python -m mmafm.launch``) runs them, so this also covers the
FSDP2-only steps of the stage: the encoders registered as FSDP forward methods for evaluation,
and the full weights gathered (a collective) before rank 0 saves.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmafm.checkpoint import load_checkpoint
from mmafm.io import read_jsonl
from mmafm.stages.base import read_manifest

ROOT = Path(__file__).resolve().parents[1]
STAGE = "01_clip_pretrain"
STEPS = 6


def _regen_golden():
    spec = importlib.util.spec_from_file_location("regen_golden", ROOT / "scripts" / "regen_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(tmp_path: Path, data: dict[str, str], parallel: str) -> Path:
    params = {
        "pairs_dir": data["pairs_dir"], "tokenizer": data["tokenizer"], "fashion_mnist": data["fashion_mnist"],
        "image_size": 32, "batch_size": 8, "max_steps": STEPS, "warmup_steps": 2, "eval_every": 3,
        "eval_pairs": 12, "fmnist_images": 20, "ckpt_every": 0, "log_every": 1, "threads": 1,
        "parallel": parallel, "seed": 0,
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mmafm.launch", STAGE, "--runs-dir", str(tmp_path / "runs"), "--run-id", parallel]
    for key, value in params.items():
        command += ["-p", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return tmp_path / "runs" / parallel / STAGE


@pytest.mark.slow
def test_fsdp2_matches_ddp(tmp_path):
    data = _regen_golden().build_data(tmp_path / "data")
    ddp, fsdp = _launch(tmp_path, data, "ddp"), _launch(tmp_path, data, "fsdp")

    records = {name: read_jsonl(folder / "metrics.jsonl") for name, folder in (("ddp", ddp), ("fsdp", fsdp))}
    losses = {name: [r["loss"] for r in rows if "loss" in r] for name, rows in records.items()}
    assert len(losses["ddp"]) == STEPS
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5, abs=1e-6)
    # the periodic evaluation ran on the sharded model (encode_image / encode_text gathered)
    evals = {name: [r for r in rows if "eval/fmnist_top1" in r] for name, rows in records.items()}
    assert [r["step"] for r in evals["fsdp"]] == [r["step"] for r in evals["ddp"]] and evals["ddp"]
    for got, want in zip(evals["fsdp"], evals["ddp"]):
        for key in ("eval/fmnist_top1", "eval/fmnist_top5", "eval/i2t_R@1", "eval/t2i_R@5"):
            assert got[key] == pytest.approx(want[key]), key
    assert [r["logit_scale"] for r in records["fsdp"] if "loss" in r] == pytest.approx(
        [r["logit_scale"] for r in records["ddp"] if "loss" in r], rel=1e-6)  # the (1,)-vector scalar trains alike

    # rank 0 saved the full (gathered) weights: the same tensors as DDP's replica
    want, _ = load_checkpoint(read_manifest(ddp)["outputs"]["clip_checkpoint"])
    got, _ = load_checkpoint(read_manifest(fsdp)["outputs"]["clip_checkpoint"])
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    # and the summaries' final evaluation agrees
    assert read_manifest(fsdp)["summary"]["fmnist_top1"] == read_manifest(ddp)["summary"]["fmnist_top1"]
