"""Stage 11_compression: config file and errors, and the notebook executed end to end by papermill
on a tiny base (a compressed checkpoint per scheme that loads back with its bits per weight,
recovery adapters that lower the held-out loss of the compressed base)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mmafm.config import ConfigError, from_dict, load_yaml
from mmafm.stages.compression import CompressionStageConfig, describe_recovery, gap_closed, parse_scheme, run

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


def test_gap_closed_has_no_ratio_without_a_gap():
    assert gap_closed(2.0, 3.0, 2.5) == pytest.approx(0.5)  # half of the 1.0 gap
    assert gap_closed(2.0, 3.0, 3.2) == pytest.approx(-0.2)  # recovery made it worse
    assert gap_closed(2.0, 1.9, 1.85) is None  # compressed already better than float: no ratio
    assert gap_closed(2.0, 2.0, 1.9) is None


def test_recovery_description_says_no_gap_in_words_and_never_nan():
    no_gap = describe_recovery(2.0, 1.9, 1.85, kept=True)
    assert "no gap to close" in no_gap and "nan" not in no_gap.lower()
    assert "50% of the gap closed" in describe_recovery(2.0, 3.0, 2.5, kept=True)
    dropped = describe_recovery(2.0, 3.0, 3.2, kept=False)
    assert "not kept" in dropped and "-20% of the gap closed" in dropped


def test_figure_draws_a_no_gap_row_and_a_dropped_recovery(tmp_path):
    from mmafm.stages.base import StageDir
    from mmafm.stages.compression import _figures

    rows = [{"scheme": "palettize4", "bpw": 4.2, "loss_compressed": 1.9, "loss_recovered": 1.85, "loss_trained": 1.85,
             "recovery_kept": True, "gap_closed": None},
            {"scheme": "palettize2", "bpw": 2.2, "loss_compressed": 3.0, "loss_recovered": 3.0, "loss_trained": 3.2,
             "recovery_kept": False, "gap_closed": 0.0}]
    stage_dir = StageDir(tmp_path, "11_compression")
    _figures(stage_dir, 2.0, rows, {"palettize4": [{"step": 1, "ce": 2.0}], "palettize2": [{"step": 1, "ce": 3.1}]})
    assert (tmp_path / "figures" / "compression.png").stat().st_size > 1000


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


def test_per_channel_scale_reaches_the_compressed_model(tmp_path, text_checkpoint, token_shards):
    """per_channel_scale=True: the palettize scheme's linears carry fp16 row scales (+16 bits a
    row over the same scheme without them), and its stored checkpoint keeps them."""
    from mmafm.compress import bits_per_weight
    from mmafm.compress.packed import PackedLinear
    from mmafm.stages.compression import _compress

    def compressed(scale):
        cfg = CompressionStageConfig(out_dir=str(tmp_path / str(scale)), checkpoint=str(text_checkpoint["checkpoint"]),
                                     tokens_dir=str(token_shards), schemes="palettize4", per_channel_scale=scale)
        return _compress(cfg, "palettize4", [], None)[0]

    plain, scaled = compressed(False), compressed(True)
    q_proj = scaled.layers[0].attn.q_proj
    assert q_proj.per_channel_scale and q_proj.row_scale.dtype == torch.float16
    packed = [m for m in scaled.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.per_channel_scale for m in packed)
    assert not any(m.per_channel_scale for m in plain.modules() if isinstance(m, PackedLinear))
    weights = sum(m.rows * m.cols for m in packed)
    extra = bits_per_weight(scaled, include_embedding=False) - bits_per_weight(plain, include_embedding=False)
    assert extra == pytest.approx(16 * sum(m.rows for m in packed) / weights, rel=1e-6)


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


@pytest.fixture(scope="module")
def trained_checkpoint(text_checkpoint, token_shards, tmp_path_factory):
    """The tiny base after 40 AdamW steps on the token shards (held-out loss well below uniform),
    so that a destructive recovery has something to destroy."""
    import mmafm
    from mmafm.data.shards import TokenShards

    torch.manual_seed(0)
    model = mmafm.load_model(text_checkpoint["checkpoint"], family="text").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step, (input_ids, targets) in enumerate(TokenShards(token_shards, 32, 8, seed=0, split="train")):
        if step == 40:
            break
        loss, _ = model.loss(model(input_ids), targets)  # (B, T) -> scalar
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    root = tmp_path_factory.mktemp("trained_checkpoint")
    return mmafm.save_model(root / "text_model", model.eval(), {"tokenizer": str(text_checkpoint["tokenizer"].path)})


@pytest.mark.slow
def test_recovery_that_raises_the_loss_is_dropped_and_reported(tmp_path, trained_checkpoint, token_shards, capsys):
    """A recovery LoRA trained at a destructive learning rate makes the held-out loss worse: the
    stage keeps the compressed model without it, names it in the summary and hands no adapter on."""
    from mmafm.stages.base import read_manifest

    out_dir = tmp_path / "11_compression"
    run(CompressionStageConfig(out_dir=str(out_dir), checkpoint=str(trained_checkpoint), tokens_dir=str(token_shards),
                               schemes="palettize4", seq_len=32, batch_size=4, eval_batches=2, max_steps=4, lr=1.0,
                               warmup_steps=0, grad_clip=0.0, log_every=1))
    manifest = read_manifest(out_dir)
    summary, outputs = manifest["summary"], manifest["outputs"]
    assert summary["palettize4_loss_trained"] > summary["palettize4_loss"]  # the adapter made it worse
    assert summary["palettize4_recovery_kept"] is False
    assert summary["palettize4_loss_recovered"] == summary["palettize4_loss"]  # the kept model: no adapter
    assert "adapter_palettize4" not in outputs
    assert (out_dir / "recovery" / "palettize4" / "adapter.safetensors").is_file() or \
        any((out_dir / "recovery" / "palettize4").glob("adapter*"))  # kept on disk for inspection
    printed = capsys.readouterr().out
    assert "recovery adapter not kept" in printed and "nan" not in printed.lower()
