"""benchmarks/gpu_check.py runs on the CPU with --dry-run: full-size models on meta, their
parameter counts (README's table), and FLOP counts against closed-form numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

# README.md, "Full-size parameter counts"
AFM_2025_DEVICE = 3_111_368_064
CLIP_VIT_GIANT = 1_367_759_617
VIT_GIANT = 1_012_285_184  # the CLIP image tower
# open_clip ViT-g-14's text tower: 49,408 x 1024 embedding, 77 positions, 24 blocks of
# (qkv + out projections with biases, 1024 -> 4096 -> 1024 MLP with biases, two LayerNorms),
# a final LayerNorm
TEXT_TOWER = 49_408 * 1024 + 77 * 1024 + 24 * (4 * 1024**2 + 4 * 1024 + 8 * 1024**2 + 4096 + 1024 + 4 * 1024) + 2 * 1024
PROJECTIONS = CLIP_VIT_GIANT - VIT_GIANT - TEXT_TOWER  # image + text projections and the logit scale


def test_dry_run_prints_counts_and_flops(tmp_path):
    out = tmp_path / "dry.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"afm_2025_device parameters {AFM_2025_DEVICE:,}" in result.stdout
    assert f"clip_vit_giant_patch14 parameters {CLIP_VIT_GIANT:,}" in result.stdout
    assert "logits (2, 2048, 153600)" in result.stdout  # the default batch: 2 x 2,048 tokens

    rows = {row["name"]: row for row in json.loads(out.read_text())["results"]}
    assert PROJECTIONS == 1408 * 1024 + 1024 * 1024 + 1
    text, clip = rows["text"], rows["clip"]
    assert text["model_flops_per_step"] == 6 * AFM_2025_DEVICE * 2 * 2048
    # ViT-g/14 at 448: 32 x 32 patches, FLIP keeps half, plus [CLS]; 77 caption tokens; batch 32
    image_tokens = 32 * 32 // 2 + 1
    assert clip["model_flops_per_step"] == 6 * 32 * (VIT_GIANT * image_tokens + TEXT_TOWER * 77 + PROJECTIONS)
    # torch's FLOP counter sees every matmul: 6N plus the attention products, never less
    for row, most in ((text, 1.25), (clip, 1.15)):
        assert 1.0 < row["counted_flops_per_step"] / row["model_flops_per_step"] < most, row


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is visible")
def test_without_a_gpu_it_says_so():
    result = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA GPU is visible" in result.stderr and "--dry-run" in result.stderr


@pytest.mark.slow
def test_smoke_run_trains_through_the_trainer(tmp_path):
    """The timed path itself (Trainer, FSDP2 / DDP in a one-process gloo group, step timing) on
    tiny presets on the CPU, so a GPU machine's few minutes are not spent finding a typo."""
    out = tmp_path / "smoke.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())["results"]}
    assert {name: row["parallel"] for name, row in rows.items()} == {"text": "fsdp", "clip": "ddp"}
    for row in rows.values():
        assert len(row["step_seconds"]) == 2 and all(s > 0 for s in row["step_seconds"]), row
        assert torch.isfinite(torch.tensor([row["first_loss"], row["last_loss"]])).all(), row
    assert rows["text"]["items_per_step"] == 2 * 32 and rows["clip"]["items_per_step"] == 4
    assert "| text | afm_2025_device_tiny |" in result.stdout and "| clip | clip_tiny |" in result.stdout
