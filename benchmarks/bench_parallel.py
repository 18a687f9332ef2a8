"""Track parallelism against tensor parallelism on CPU processes (gloo): step time and collectives.

    .venv/bin/python benchmarks/bench_parallel.py                      # 1, 2 and 4 processes
    .venv/bin/python benchmarks/bench_parallel.py --worlds 2 --steps 20 --out parallel.json

For each number of processes (``--worlds``) the script starts that many gloo processes (one torch
thread each) and trains, interleaved step by step so that background load hits both alike:

- ``track``: the PT-MoE server architecture at tiny size (``afm_2025_server_tiny`` with
  ``--tracks`` tracks of 8 layers in blocks of D = 4, MoE every other layer), its tracks split over
  the processes by :func:`mmafm.train.parallel.shard_tracks` (the plain model in one process);
- ``tensor``: the dense decoder of the same depth and width (one track, dense FFN, as many KV
  heads as query heads so that they divide over 4 ranks), split by PyTorch's own
  ``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel``
  (:func:`mmafm.train.parallel.tensor_parallelize`).

A step is forward, backward and an AdamW update on ``--batch`` rows of ``--seq`` tokens. Reported
per world and mode: the median step time after ``--warmup`` steps, the speed-up over the same
mode in one process, the all-reduces of one forward and one backward and their payload (bytes of
the buffers handed to the collectives, counted by :class:`~mmafm.train.parallel.CollectiveCounter`
around one step) per token. The two models are not the same size (the track model has
``--tracks`` x the layers and its experts): compare each mode's own scaling and the
collectives, not one step time with the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmafm.models.ptmoe import PTMoEModel
from mmafm.models.text import TextConfig, TextModel
from mmafm.registry import get_config


def track_config(tracks: int) -> TextConfig:
    return dataclasses.replace(get_config("afm_2025_server_tiny"), num_tracks=tracks)


def dense_config(tracks: int) -> TextConfig:
    config = track_config(tracks)
    return dataclasses.replace(config, num_tracks=1, num_experts=0, n_kv_heads=config.n_heads)


def _build(mode: str, args: argparse.Namespace, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    from mmafm.train.parallel import shard_tracks, tensor_parallelize, track_mesh

    torch.manual_seed(0)
    if mode == "track":
        model = PTMoEModel(track_config(args.tracks))
        return shard_tracks(model, track_mesh(args.tracks, device_type="cpu")) if world > 1 else model
    model = TextModel(dense_config(args.tracks))
    return tensor_parallelize(model, init_device_mesh("cpu", (world,))) if world > 1 else model


def _step(model, optimizer, batch) -> torch.Tensor:
    ids, targets = batch
    loss, _ = model.loss(model(ids), targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One process of a ``world``-process run; rank 0 writes the rows to ``out``."""
    from mmafm.train.parallel import CollectiveCounter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(1)
    vocab = track_config(args.tracks).vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=generator)
    batch = (ids[:, :-1], ids[:, 1:])
    tokens = batch[0].numel()
    runs = {}
    for mode in ("track", "tensor"):
        model = _build(mode, args, world)
        runs[mode] = {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3), "times": []}
    rows = []
    for index in range(args.warmup + args.steps):
        for mode, run in runs.items():  # interleaved: the same background load on both
            dist.barrier()
            started = time.perf_counter()
            _step(run["model"], run["optimizer"], batch)
            dist.barrier()
            if index >= args.warmup:
                run["times"].append(time.perf_counter() - started)
    for mode, run in runs.items():
        model = run["model"]
        ids_, targets = batch
        with CollectiveCounter() as forward:
            logits = model(ids_)
        loss, _ = model.loss(logits, targets)
        with CollectiveCounter() as backward:
            loss.backward()
        params = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        rows.append({
            "world": world, "mode": mode, "params_per_rank": params,
            "median_step_s": statistics.median(run["times"]),
            "forward_all_reduces": forward.count("all_reduce"),
            "backward_all_reduces": backward.count("all_reduce"),
            "forward_bytes_per_token": forward.bytes("all_reduce") / tokens,
            "step_bytes_per_token": (forward.bytes("all_reduce") + backward.bytes("all_reduce")) / tokens,
        })
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_world(world: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "rows.json")
        mp.spawn(worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def print_table(rows: list[dict]) -> None:
    base = {row["mode"]: row["median_step_s"] for row in rows if row["world"] == 1}
    print("\n| processes | mode | params/rank | median step | speed-up vs 1 | all-reduces fwd / bwd "
          "| bytes/token fwd | bytes/token fwd+bwd |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        speedup = f"{base[row['mode']] / row['median_step_s']:.2f}x" if row["mode"] in base else ""
        print(f"| {row['world']} | {row['mode']} | {row['params_per_rank']:,} | {row['median_step_s'] * 1e3:.1f} ms "
              f"| {speedup} | {row['forward_all_reduces']} / {row['backward_all_reduces']} "
              f"| {row['forward_bytes_per_token']:,.1f} | {row['step_bytes_per_token']:,.1f} |")
    for world in sorted({row["world"] for row in rows if row["world"] > 1}):
        pair = {row["mode"]: row for row in rows if row["world"] == world}
        if {"track", "tensor"} <= set(pair):
            saved = 1 - pair["track"]["forward_bytes_per_token"] / pair["tensor"]["forward_bytes_per_token"]
            print(f"{world} processes: track parallel moves {saved:.2%} fewer bytes per token per forward "
                  f"than tensor parallel ({pair['track']['forward_all_reduces']} vs "
                  f"{pair['tensor']['forward_all_reduces']} all-reduces)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="process counts to run")
    parser.add_argument("--tracks", type=int, default=4, help="tracks of the PT-MoE model (divisible by each world)")
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    for world in args.worlds:
        if args.tracks % world:
            parser.error(f"--tracks {args.tracks} does not split over {world} processes")
    rows = []
    for world in args.worlds:
        started = time.perf_counter()
        rows += run_world(world, args)
        print(f"{world} process(es): {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
