"""The AFM optimizer's step time (mmafm.train.optim.AdaStar) against torch.optim.AdamW, same model.

    .venv/bin/python benchmarks/bench_optim.py                                   # both sizes, 1 thread
    .venv/bin/python benchmarks/bench_optim.py --threads 2 --repeats 21 --json benchmarks/results/optim.json

For each model (the tiny 2024 on-device preset, and a mid-size one: the same architecture at the
85M mu-param base width, 768 wide and ``--mid-layers`` deep, vocabulary 49,152), every trainable
parameter gets a fixed random gradient and each optimizer's ``step()`` alone is timed: AdaStar with
the AFM settings and mu-param groups (:func:`mmafm.train.optim.afm_param_groups`), AdamW with
``foreach=True``, with ``fused=True`` and with neither (what the trainer builds: PyTorch then
loops over the tensors on CPU and uses foreach on CUDA), with the trainer's AdamW param groups.
The four are interleaved (background load hits them alike), one warm-up step each, and the table reports
medians over ``--repeats`` and AdaStar's time over each AdamW's. Goal: AdaStar <= 1.2x AdamW.
AdaStar is
written with ``torch._foreach_*`` ops (its default multi-tensor path, ``foreach=None``): about a
dozen ops, each a pass over the parameter-sized tensors, where foreach AdamW has about ten, and
PyTorch's fused AdamW is one kernel per tensor, which no composition of PyTorch ops matches on
CPU. ``torch.compile`` of a fused per-tensor AdaStar update (two kernels per tensor, dynamic
shapes) reached fused AdamW's range on the tiny model (1.77 ms a step) but took 1,796 s of wall
time (46 s CPU) to compile on the shared machine on 2026-11-30, so the optimizer does not use it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import mmafm
from mmafm.io import atomic_write_json
from mmafm.train.optim import AdaStar, afm_param_groups, param_groups


def build_model(size: str, mid_layers: int) -> torch.nn.Module:
    """``tiny``: the afm_2024_device_tiny preset; ``mid``: afm_2024_device at width 768."""
    if size == "tiny":
        return mmafm.create_model("afm_2024_device_tiny")
    return mmafm.create_model("afm_2024_device", dim=768, n_layers=mid_layers, n_heads=6, n_kv_heads=2,
                              head_dim=128, ffn_dim=2048)


def optimizers(model: torch.nn.Module) -> dict[str, torch.optim.Optimizer]:
    lr = 1e-2
    return {
        "afm (AdaStar)": AdaStar(afm_param_groups(model, 3.16e-4), lr=lr),
        "AdamW foreach": torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), foreach=True),
        "AdamW fused": torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), fused=True),
        # what the trainer builds (no foreach/fused flag): a per-tensor loop on CPU, foreach on CUDA
        "AdamW default": torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95)),
    }


def time_steps(model: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Median seconds per ``step()`` of each optimizer, interleaved, after a warm-up step."""
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator) * 1e-3
    built = optimizers(model)
    with torch.no_grad():
        snapshot = [p.detach().clone() for p in model.parameters()]
    times: dict[str, list[float]] = {name: [] for name in built}
    for optimizer in built.values():
        optimizer.step()  # warm-up: allocates the state
    for _ in range(repeats):
        for name, optimizer in built.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
            with torch.no_grad():  # the same parameters for the next one
                for param, saved in zip(model.parameters(), snapshot):
                    param.copy_(saved)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per optimizer (median)")
    parser.add_argument("--mid-layers", type=int, default=6, help="layers of the mid-size model")
    parser.add_argument("--sizes", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = []
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} interleaved steps\n")
    print("| model | params | afm (AdaStar) ms | AdamW foreach ms | AdamW fused ms | AdamW default ms "
          "| afm / foreach | afm / fused | afm / default |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        model = build_model(size, args.mid_layers)
        count = sum(p.numel() for p in model.parameters())
        medians = time_steps(model, args.repeats)
        afm, foreach, fused, default = (
            medians[k] for k in ("afm (AdaStar)", "AdamW foreach", "AdamW fused", "AdamW default"))
        results.append({"model": size, "params": count, "seconds": medians, "afm_over_foreach": afm / foreach,
                        "afm_over_fused": afm / fused, "afm_over_default": afm / default})
        print(f"| {size} | {count / 1e6:.1f}M | {afm * 1e3:.2f} | {foreach * 1e3:.2f} | {fused * 1e3:.2f} | "
              f"{default * 1e3:.2f} | {afm / foreach:.2f}x | {afm / fused:.2f}x | {afm / default:.2f}x |", flush=True)
    if args.json:
        meta = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats}
        atomic_write_json(args.json, {**meta, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
