"""Track parallelism under torchrun, checked against one process (tests/test_track_parallel.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_track_parallel_script.py OUT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node 4 tests/_track_parallel_script.py OUT_DIR

Every rank writes ``OUT_DIR/check_rank<r>.json``: the differences between the track-parallel
forward/backward and the one-process model's (logits, loss, balance loss, every gradient this
rank holds), the collectives of one forward and one backward (counted by
:class:`~mmafm.train.parallel.CollectiveCounter` and by ``CommDebugMode``) and their bytes, for
track parallelism and for the tensor-parallel baseline on the dense model of the same depth and
width. Then the trainer runs with ``parallel="track"`` (metrics and checkpoints in OUT_DIR); the
test compares them with one-process runs built by the same functions.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from mmafm.models.ptmoe import PTMoEModel
from mmafm.models.text import TextConfig, TextModel
from mmafm.registry import get_config
from mmafm.stages.base import StageDir
from mmafm.train import TrainConfig, Trainer, get_rank, get_world_size

BATCH, SEQ = 2, 16
STEPS, STOP_AT = 4, 2
TRAIN = dict(max_steps=STEPS, lr=1e-2, warmup_steps=1, log_every=1, ckpt_every=2, seed=0, grad_clip=0.5)


def tiny_config(num_tracks: int = 2, exchange: str = "mean") -> TextConfig:
    """afm_2025_server_tiny made smaller: 8 layers per track in blocks of D = 4 (the report's), 4
    experts top-2 every other layer."""
    return dataclasses.replace(
        get_config("afm_2025_server_tiny"), vocab_size=64, dim=32, n_layers=8, track_block_depth=4,
        n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, moe_ffn_dim=32, num_experts=4, top_k=2,
        num_tracks=num_tracks, track_exchange=exchange, sliding_window=4, max_seq_len=SEQ,
    )


def dense_config(config: TextConfig, heads: int = 4) -> TextConfig:
    """The dense one-track decoder of the same depth and width (the tensor-parallel baseline)."""
    return dataclasses.replace(config, num_tracks=1, num_experts=0, n_kv_heads=heads)


def token_batch(config: TextConfig, seed: int = 1, rows: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` sequences of a learnable rule (next = 5 * token + 3 mod vocab) from random starts:
    ``(input_ids (rows, SEQ), targets (rows, SEQ))``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, config.vocab_size, (rows,), generator=generator)]
    for _ in range(SEQ):
        tokens.append((5 * tokens[-1] + 3) % config.vocab_size)
    ids = torch.stack(tokens, dim=1)  # (rows, SEQ + 1)
    return ids[:, :-1], ids[:, 1:]


def build(config: TextConfig, cls: type = PTMoEModel):
    torch.manual_seed(0)
    return cls(config)


# ------------------------------------------------------------------------------ training
class LMTask:
    """Next-token loss of a text decoder (the model's CE + z-loss + MoE balance loss)."""

    def __init__(self, model):
        self.model = model

    def training_forward(self, batch):
        ids, targets = batch
        loss, metrics = self.model.loss(self.model(ids), targets)
        return {"lm": loss}, metrics

    def count_items(self, batch):
        return batch[0].numel()


def micro_batches(config: TextConfig, dp: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global batches of 2 * dp rows, cut into dp micro-batches each, in step order."""
    batches = []
    for step in range(STEPS):
        ids, targets = token_batch(config, seed=100 + step, rows=2 * dp)
        batches += [(ids[2 * d:2 * d + 2], targets[2 * d:2 * d + 2]) for d in range(dp)]
    return batches


class Stopped(Exception):
    pass


class StoppingTrainer(Trainer):
    """Raises (on every rank) right after the checkpoint of step ``STOP_AT``: a killed run."""

    def save_checkpoint(self):
        path = super().save_checkpoint()
        if self.step == STOP_AT:
            raise Stopped
        return path


def train(config: TextConfig, out_dir: str | None, parallel: str, dp: int, stop: bool = False) -> list[dict]:
    """One training run; ``parallel="none"`` with ``dp`` micro-batches accumulated per step is the
    reference of a ``dp x 2`` track-parallel mesh. ``stop``: end it at the checkpoint of ``STOP_AT``."""
    from mmafm.train.parallel import TrackDataShare

    data = micro_batches(config, dp)
    if parallel == "track":
        data = TrackDataShare(data, config.num_tracks)
    settings = TrainConfig(**TRAIN, grad_accum_steps=1 if parallel == "track" else dp, parallel=parallel)
    stage_dir = StageDir(out_dir, "track") if out_dir else None
    trainer = (StoppingTrainer if stop else Trainer)(LMTask(build(config)), data, settings, stage_dir)
    try:
        return trainer.fit()
    except Stopped:
        return trainer.records


# ------------------------------------------------------------------------------ equality, counts
def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def check_tracks(config: TextConfig, mesh) -> dict:
    """Track-parallel forward/backward vs the one-process model, and its collectives."""
    from torch.distributed.tensor.debug import CommDebugMode

    from mmafm.train.parallel import CollectiveCounter, shard_tracks

    ids, targets = token_batch(config)
    reference = build(config)
    ref_logits = reference(ids)
    ref_loss, _ = reference.loss(ref_logits, targets)
    ref_loss.backward()
    model = shard_tracks(build(config), mesh)
    with CollectiveCounter() as forward, CommDebugMode() as comm_mode:
        logits = model(ids)
    loss, _ = model.loss(logits, targets)
    with CollectiveCounter() as backward:
        loss.backward()
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    grad_diffs = {name: _max_diff(_full(p.grad), ref_grads[name]) for name, p in model.named_parameters()}
    return {
        "track_ids": list(model.track_ids),
        "logits": _max_diff(logits, ref_logits),
        "logits_scale": float(ref_logits.detach().abs().max()),
        "loss": abs(float(loss) - float(ref_loss)),
        "aux": abs(float(model.aux_loss) - float(reference.aux_loss)),
        "grads": max(grad_diffs.values()),
        "grad_names": sorted(grad_diffs),
        **_counts(forward, backward, comm_mode, ids.numel()),
    }


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2 shard's) full value; a collective over its mesh."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _counts(forward, backward, comm_mode, tokens: int) -> dict:
    """All-reduces of one forward and one backward and their payload per token; collectives of
    other kinds (FSDP2's all-gathers and reduce-scatters over dp) separately."""
    return {
        "forward": forward.count("all_reduce"),
        "forward_other": forward.count() - forward.count("all_reduce"),
        "forward_comm_debug": comm_mode.get_total_counts(),
        "forward_bytes_per_token": forward.bytes("all_reduce") / tokens,
        "backward": backward.count("all_reduce"),
        "backward_other": backward.count() - backward.count("all_reduce"),
        "backward_bytes_per_token": backward.bytes("all_reduce") / tokens,
    }


def check_tensor_parallel(config: TextConfig) -> dict:
    """The tensor-parallel baseline on the dense decoder of the same depth: its forward and its
    collectives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from mmafm.train.parallel import CollectiveCounter, tensor_parallelize

    dense = dense_config(config)
    ids, targets = token_batch(dense)
    reference = build(dense, TextModel)
    ref_logits = reference(ids)
    model = tensor_parallelize(build(dense, TextModel), init_device_mesh("cpu", (get_world_size(),)))
    with CollectiveCounter() as forward, CommDebugMode() as comm_mode:
        logits = model(ids)
    loss, _ = model.loss(logits, targets)
    with CollectiveCounter() as backward:
        loss.backward()
    return {
        "logits": _max_diff(logits, ref_logits),
        **_counts(forward, backward, comm_mode, ids.numel()),
    }


def main(out_dir: str) -> None:
    from mmafm.train import cleanup_distributed, init_distributed
    from mmafm.train.parallel import track_mesh

    torch.set_num_threads(1)
    init_distributed("gloo")
    out, rank, world = Path(out_dir), get_rank(), get_world_size()
    checks: dict = {"world": world}
    for num_tracks in (2, 4):  # world 2: 1 and 2 tracks per rank; world 4: 2 x FSDP2 over dp, 4 x 1
        for exchange in ("mean", "final"):
            config = tiny_config(num_tracks, exchange)
            checks[f"tracks{num_tracks}_{exchange}"] = check_tracks(config, track_mesh(num_tracks))
    checks["tensor_parallel"] = check_tensor_parallel(tiny_config())
    (out / f"check_rank{rank}.json").write_text(json.dumps(checks))

    config = tiny_config(2)
    dp = world // 2  # 2 tracks: the mesh is (world / 2) x 2, FSDP2 over dp when world is 4
    train(config, str(out / "track_full"), "track", dp)
    train(config, str(out / "track_stop"), "track", dp, stop=True)
    if dp > 1:  # resumed by track x FSDP itself (with dp = 1 the test resumes it in one process)
        train(config, str(out / "track_stop"), "track", dp)
    if (out / "single_stop").is_dir():  # a one-process run stopped at STOP_AT, resumed here
        train(config, str(out / "single_stop"), "track", dp)
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
