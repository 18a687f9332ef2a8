"""Stage 11_compression: config file and errors, and the notebook executed end to end by papermill
on a tiny base (a compressed checkpoint per scheme that loads back with its bits per weight,
recovery adapters that lower the held-out loss of the compressed base)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mmafm.config import ConfigError, from_dict, load_yaml
from mmafm.stages.compression import CompressionStageConfig, parse_scheme, run

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_holds_the_config_defaults():
    values = load_yaml(ROOT / "configs" / "stages" / "11_compression.yaml")
    defaults = CompressionStageConfig()
    for key, value in values.items():
        assert getattr(defaults, key) == value, key
    assert from_dict(CompressionStageConfig, values) == defaults


def test_scheme_names_and_errors(tmp_path):
    assert parse_scheme("palettize4") == ("palettize", 4) and parse_scheme("qat2") == ("qat", 2)
    with pytest.raises(ConfigError, match="unknown scheme 'palettize3'"):
        parse_scheme("palettize3")
    with pytest.raises(ConfigError, match="checkpoint is empty"):
        run(CompressionStageConfig(out_dir=str(tmp_path / "x")))


@pytest.fixture(scope="module")
def token_shards(text_checkpoint, tmp_path_factory):
    from mmafm.data.shards import write_token_shards

    root = tmp_path_factory.mktemp("compression_tokens")
    words = ("red", "blue", "green", "circle", "square", "on", "the", "left", "right", "a")
    generator = torch.Generator().manual_seed(0)
    documents = [(f"doc{i}", " ".join(words[int(j)] for j in torch.randint(0, len(words), (60,), generator=generator)))
                 for i in range(300)]
    write_token_shards(documents, text_checkpoint["tokenizer"], root / "tokens", val_fraction=0.2)
    return root / "tokens"


@pytest.mark.slow
def test_stage_notebook_compresses_and_recovers(tmp_path, text_checkpoint, token_shards):
    papermill = pytest.importorskip("papermill")
    import mmafm
    from mmafm.compress import PackedLinear, bits_per_weight
    from mmafm.stages.base import read_manifest

    out_dir = tmp_path / "11_compression"
    params = dict(out_dir=str(out_dir), checkpoint=str(text_checkpoint["checkpoint"]), tokens_dir=str(token_shards),
                  tokenizer=str(text_checkpoint["tokenizer"].path), schemes="palettize2,qat2", seq_len=32,
                  batch_size=4, eval_batches=2, qat_steps=3, max_steps=4, lr=1e-2, warmup_steps=1, log_every=1)
    assert set(params) <= {f.name for f in dataclasses.fields(CompressionStageConfig)}
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "11_compression.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters=params, kernel_name="mmafm", cwd=str(ROOT), progress_bar=False,
    )
    manifest = read_manifest(out_dir)
    outputs, summary = manifest["outputs"], manifest["summary"]
    assert {Path(f).stem for f in manifest["figures"]} == {"compression"}
    for scheme in ("palettize2", "qat2"):
        model = mmafm.load_model(outputs[f"compressed_{scheme}"])
        assert isinstance(model.layers[0].ffn.w_up, PackedLinear) and model.layers[0].ffn.w_up.bits == 2
        assert bits_per_weight(model) == pytest.approx(summary[f"{scheme}_bpw"], abs=1e-4)
        assert summary[f"{scheme}_bpw"] < 4.5  # 2-bit body, 8-/4-bit embedding
        assert summary[f"{scheme}_loss_recovered"] < summary[f"{scheme}_loss"]  # the adapter recovers some
        assert Path(outputs[f"adapter_{scheme}"]).is_file()


@pytest.mark.slow
def test_stage_mixed_and_astc_schemes(tmp_path, text_checkpoint, token_shards):
    import mmafm
    from mmafm.compress.astc import ASTCLinear

    out_dir = tmp_path / "11_compression"
    run(CompressionStageConfig(out_dir=str(out_dir), checkpoint=str(text_checkpoint["checkpoint"]),
                               tokens_dir=str(token_shards), schemes="mixed,astc", mixed_bpw=3.0, seq_len=32,
                               batch_size=4, eval_batches=1, max_steps=1, warmup_steps=0, log_every=1))
    from mmafm.stages.base import read_manifest

    summary = read_manifest(out_dir)["summary"]
    assert summary["mixed_bpw_without_embedding"] <= 3.0 + 1e-9  # the allocation meets its budget
    assert "| **all linears** |" in (out_dir / "allocation.md").read_text()
    astc = mmafm.load_model(read_manifest(out_dir)["outputs"]["compressed_astc"])
    assert isinstance(astc.layers[0].attn.q_proj, ASTCLinear)
    assert 3.5 < summary["astc_bpw_without_embedding"] < 3.7


@pytest.mark.slow  # ~90 s of CPU: five schemes, and full-size models built on the meta device
def test_reproduce_notebook_runs_every_scheme_at_tiny_size(tmp_path, text_checkpoint, token_shards):
    """notebooks/reproduce_compression.ipynb under papermill at tiny parameters: the Pareto figure
    and table over every scheme, and the full-size table equal to the closed forms."""
    papermill = pytest.importorskip("papermill")
    import json
    import math

    from mmafm.compress.reproduce import full_size_table

    out_dir = tmp_path / "reproduce"
    schemes = "palettize4,mixed,astc,palettize2,qat2"
    params = dict(checkpoint=str(text_checkpoint["checkpoint"]), tokens_dir=str(token_shards), out_dir=str(out_dir),
                  schemes=schemes, mixed_bpw=3.0, max_steps=1, qat_steps=1, seq_len=16, batch_size=2,
                  eval_batches=1, seed=0)
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "reproduce_compression.ipynb"), str(tmp_path / "executed.ipynb"),
        parameters=params, kernel_name="mmafm", cwd=str(ROOT), progress_bar=False,
    )
    summary = json.loads((out_dir / "manifest.json").read_text())["summary"]
    assert (out_dir / "figures" / "pareto.png").stat().st_size > 1000
    table = (out_dir / "pareto.md").read_text().splitlines()
    assert len(table) == 3 + 5  # header, rule, float base, one row per scheme
    for name in schemes.split(","):
        row = next(line for line in table if line.startswith(f"| {name} |"))
        assert f"| {summary[f'{name}_bpw']:.3f} | {math.exp(summary[f'{name}_loss']):.2f} |" in row
    assert summary["mixed_bpw_without_embedding"] <= 3.0 + 1e-9
    sizes = full_size_table()
    assert (out_dir / "full_size.md").read_text().strip() == sizes
    assert "| `afm_2025_server` | ASTC 6x6, 4-bit emb. (2025 server) | 3.566 | 3.564 |" in sizes
