"""Track parallelism (PT-MoE tracks on separate ranks, 2 and 4 gloo processes) computes what one
process computes, synchronises L/D times per forward against tensor parallelism's 2L, checkpoints
the plain model's state dicts; the plan at scale matches its closed forms."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmafm
from mmafm.checkpoint import load_checkpoint
from mmafm.models.ptmoe import PTMoEModel, sync_points
from mmafm.registry import get_config
from mmafm.train import parallelize
from mmafm.train.parallel import (
    TrackDataShare,
    activation_bytes,
    local_track_ids,
    mesh_shape,
    shard_tracks,
    text_param_counts,
    track_plan,
)

sys.path.insert(0, str(Path(__file__).parent))
import _track_parallel_script as script  # noqa: E402

SCRIPT = Path(__file__).parent / "_track_parallel_script.py"
TOLERANCE = dict(logits=1e-5, loss=1e-5, aux=1e-5, grads=1e-5)


def _launch(nproc: int, out: Path) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         str(SCRIPT), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"check_rank{rank}.json").read_text()) for rank in range(nproc)]


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def _check_equal_and_counted(checks: list[dict]) -> None:
    """Every rank's track-parallel forward/backward equals one process's; L/D vs 2L collectives."""
    world = len(checks)
    config = script.tiny_config()
    layers, depth = config.n_layers, config.track_block_depth
    plain_names = set(dict(PTMoEModel(config).named_parameters()))
    for num_tracks in (2, 4):
        for exchange in ("mean", "final"):
            case = f"tracks{num_tracks}_{exchange}"
            rows = [rank_checks[case] for rank_checks in checks]
            for row in rows:
                for name, tolerance in TOLERANCE.items():
                    assert row[name] <= tolerance, (case, name, row[name])
                assert row["logits_scale"] > 0.1  # the logits compared are not all zero
                syncs = sync_points(script.tiny_config(num_tracks, exchange))["parallel_track"]
                assert syncs == (layers // depth if exchange == "mean" else 1)
                assert row["forward"] == syncs and row["backward"] == syncs, case
                # CommDebugMode (torch's own counter) sees the same collectives, FSDP2's included
                assert row["forward_comm_debug"] == row["forward"] + row["forward_other"]
                # payload: the (B, T, dim) float32 residual stream once per exchange (+ the balance loss once)
                assert row["forward_bytes_per_token"] == pytest.approx(syncs * config.dim * 4 + 4 / (script.BATCH * script.SEQ))
            # the ranks of a track group hold disjoint tracks that together are the whole model
            track_degree = mesh_shape(world, num_tracks)[1]
            held = [tuple(row["track_ids"]) for row in rows[:track_degree]]
            assert held == [local_track_ids(num_tracks, track_degree, r) for r in range(track_degree)]
            if num_tracks == 2:
                names = set().union(*(row["grad_names"] for row in rows))
                assert names == plain_names  # every weight got its gradient on some rank
    tensor = [rank_checks["tensor_parallel"] for rank_checks in checks]
    for row in tensor:
        assert row["logits"] <= 1e-5
        assert row["forward"] == 2 * layers == sync_points(config)["tensor_parallel"]
        assert row["backward"] == 2 * layers
        assert row["forward_comm_debug"] == row["forward"]
        assert row["forward_bytes_per_token"] == 2 * layers * config.dim * 4
    # the report's -87.5% (D = 4), measured: bytes per token moved by one forward
    track_bytes = checks[0]["tracks2_mean"]["forward_bytes_per_token"]
    measured = 1 - track_bytes / tensor[0]["forward_bytes_per_token"]
    assert measured == pytest.approx(sync_points(config)["reduction"], abs=1e-4)
    assert sync_points(config)["reduction"] == 0.875


def _check_final_weights(run_dir: Path, reference_dir: Path) -> None:
    want, _ = load_checkpoint(reference_dir / "checkpoints" / "final.safetensors")
    got, meta = load_checkpoint(run_dir / "checkpoints" / "final.safetensors")
    assert list(got) == list(want) and meta["step"] == script.STEPS  # the plain model's names, in order
    for name in want:
        # Adam divides by sqrt(v): a float-rounding difference in a near-zero gradient moves a weight
        # by up to ~1e-5 of its lr-sized step
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_two_processes_track_parallel(tmp_path):
    config = script.tiny_config(2)
    reference = _losses(script.train(config, str(tmp_path / "reference"), "none", dp=1))
    assert len(reference) == script.STEPS and reference[-1] < reference[0]
    script.train(config, str(tmp_path / "single_stop"), "none", dp=1, stop=True)  # resumed by 2 processes

    checks = _launch(2, tmp_path)
    _check_equal_and_counted(checks)
    with pytest.warns(UserWarning, match="world_size=2"):  # a 2-process checkpoint resumed in one process
        resumed_here = _losses(script.train(config, str(tmp_path / "track_stop"), "none", dp=1))
    runs = {
        "track": _losses(json.loads(line) for line in (tmp_path / "track_full" / "metrics.jsonl").read_text().splitlines()),
        "one process -> track": _losses(json.loads(line) for line in (tmp_path / "single_stop" / "metrics.jsonl").read_text().splitlines()),
        "track -> one process": resumed_here,
    }
    for name, losses in runs.items():
        assert losses == pytest.approx(reference, abs=1e-5), name
    for run in ("track_full", "single_stop", "track_stop"):
        _check_final_weights(tmp_path / run, tmp_path / "reference")
    # a track-parallel checkpoint is the one-process format: optimizer state under the plain names
    tensors, meta = load_checkpoint(tmp_path / "track_stop" / "checkpoints" / "step_00000002.safetensors")
    plain, _ = load_checkpoint(tmp_path / "reference" / "checkpoints" / "step_00000004.safetensors")
    assert sorted(k for k in tensors if not k.startswith("rng/")) == sorted(k for k in plain if not k.startswith("rng/"))
    assert meta["parallel"] == "track" and meta["world_size"] == 2


@pytest.mark.slow
def test_four_processes_track_parallel_with_fsdp(tmp_path):
    config = script.tiny_config(2)
    # 2 tracks on 4 ranks: a 2 (dp, FSDP2) x 2 (track) mesh; one process accumulates the 2 dp shares
    reference = _losses(script.train(config, str(tmp_path / "reference"), "none", dp=2))
    checks = _launch(4, tmp_path)
    _check_equal_and_counted(checks)
    assert checks[0]["tracks2_mean"]["forward_other"] > 0  # FSDP2 gathers over dp
    assert checks[0]["tracks4_mean"]["forward_other"] == 0  # 4 x 1 mesh: exchanges only
    for run in ("track_full", "track_stop"):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert _losses(records) == pytest.approx(reference, abs=1e-5), run
        assert [r["step"] for r in records if "loss" in r] == list(range(1, script.STEPS + 1))
        _check_final_weights(tmp_path / run, tmp_path / "reference")


# ------------------------------------------------------------------------------ in one process
def test_mesh_shapes_and_track_split():
    assert mesh_shape(8, 4) == (2, 4) and mesh_shape(2, 4) == (1, 2) and mesh_shape(4, 2) == (2, 2)
    assert mesh_shape(6, 4) == (3, 2) and mesh_shape(1, 4) == (1, 1)
    with pytest.raises(ValueError, match="track_degree"):
        mesh_shape(8, 4, track_degree=3)
    assert [local_track_ids(4, 2, r) for r in range(2)] == [(0, 1), (2, 3)]


def test_track_parallel_needs_a_pt_moe_model_and_a_process_group():
    with pytest.raises(RuntimeError, match="torchrun"):
        parallelize(PTMoEModel(script.tiny_config()), "track")
    with pytest.raises(TypeError, match="PT-MoE"):
        shard_tracks(mmafm.create_model("afm_2024_device_tiny"), mesh=None)


def test_data_share_gives_each_dp_rank_every_dp_th_batch(monkeypatch):
    import torch.distributed as dist

    batches = list(range(10))
    assert list(TrackDataShare(batches, num_tracks=2)) == batches  # no process group: everything
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    shares = {}
    for rank in range(4):  # mesh 2 x 2: ranks 0, 1 are dp 0; ranks 2, 3 are dp 1
        monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
        shares[rank] = list(TrackDataShare(batches, num_tracks=2))
    assert shares[0] == shares[1] == [0, 2, 4, 6, 8] and shares[2] == shares[3] == [1, 3, 5, 7, 9]
    assert len(TrackDataShare(batches, num_tracks=2)) == 5


def test_param_counts_match_the_built_models():
    for name in ("afm_2025_server", "afm_2025_server_tiny", "afm_2024_device_tiny"):
        model = mmafm.create_model(name, device="meta")
        counts = text_param_counts(model.config)
        assert counts["total"] == sum(p.numel() for p in model.parameters()), name
        if isinstance(model, PTMoEModel):
            assert counts["per_track"] == sum(p.numel() for p in model.tracks[0].parameters())
            assert counts["largest_layer"] == max(sum(p.numel() for p in layer.parameters())
                                                  for layer in model.tracks[0].layers)


@pytest.mark.parametrize("gpus", [8, 64, 512])
def test_full_size_plan_matches_closed_forms(gpus):
    config = get_config("afm_2025_server")
    plan = track_plan(config, gpus)
    T, L, D, d, V = config.num_tracks, config.n_layers, config.track_block_depth, config.dim, config.vocab_size
    hd, H, Hkv, F, E, k = config.head_dim, config.n_heads, config.n_kv_heads, config.ffn_dim, config.num_experts, config.top_k
    # parameters, written out: attention + 2 norms per layer, dense and MoE FFNs alternating
    attention = 2 * d * H * hd + 2 * d * Hkv * hd + 2 * d + 2 * hd
    per_track = L * attention + (L // 2) * 3 * d * F + (L // 2) * (E * 3 * d * F + d * E)
    shared = V * d + d
    assert plan.params_total == shared + T * per_track
    assert 84e9 < plan.params_total < 86e9  # "~85B" at the preset
    track, dp = 4, gpus // 4
    assert (plan.track, plan.dp, plan.tracks_per_rank) == (track, dp, 1)
    local = shared + per_track
    assert plan.params_per_gpu == -(-local // dp)
    assert plan.weights + plan.grads + plan.optimizer == 16 * plan.params_per_gpu  # fp32 w + g + Adam m, v
    seq = 4096
    assert plan.activations == L * seq * d * 4 + seq * ((2 * d + 2 * H * hd + 2 * Hkv * hd + k * 3 * F) * 2 + 2 * d * 4)
    assert plan.activations == activation_bytes(config, seq, 1, 1)
    assert plan.logits == seq * V * 10
    micro = 4096 // dp
    assert plan.micro_batches == micro
    assert plan.exchange_collectives == 2 * L // D and plan.tensor_parallel_collectives == 4 * L
    ring = 2 * (track - 1) / track
    assert plan.exchange_bytes == round(micro * 2 * (L // D) * ring * seq * d * 4)
    assert plan.exchange_bytes / plan.tensor_parallel_bytes == pytest.approx(1 - 0.875)
    assert plan.fsdp_bytes == round((2 * micro + 1) * (dp - 1) / dp * local * 4)
    assert plan.total == (plan.weights + plan.grads + plan.optimizer + plan.gathered + plan.activations + plan.logits)


def test_plan_shows_where_the_full_model_fits():
    config = get_config("afm_2025_server")
    h200 = 141e9
    totals = {gpus: track_plan(config, gpus).total for gpus in (8, 64, 512)}
    assert totals[8] > h200 > totals[64] > totals[512]  # one track of 21B per 2 GPUs does not fit
    single_exchange = track_plan(dataclasses.replace(config, track_exchange="final"), 64)
    assert single_exchange.exchange_collectives == 2


def test_text_stage_offers_track_parallel_for_pt_moe_presets(tmp_path):
    from mmafm.config import ConfigError
    from mmafm.runner import resolve_stage_config
    from mmafm.stages import text_pretrain

    config = resolve_stage_config("02_text_pretrain", None, {"parallel": "track", "preset": "afm_2025_server_tiny"},
                                  out_dir=tmp_path)
    assert config.parallel == "track" and config.train_config().parallel == "track"
    with pytest.raises(ConfigError, match="parallel"):
        resolve_stage_config("02_text_pretrain", None, {"parallel": "pipeline"}, out_dir=tmp_path)
    dense = dataclasses.replace(config, preset="afm_2024_device_tiny", tokens_dir="unused", tokenizer="unused")
    with pytest.raises(ConfigError, match="PT-MoE"):  # refused before any data is read
        text_pretrain.run(dense)
