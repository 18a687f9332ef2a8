"""Speed of mmafm's vision encoders against timm's same-shape models, in one run.

    .venv/bin/python benchmarks/bench_vision.py                      # short: ViT-B and ViT-L, 224
    .venv/bin/python benchmarks/bench_vision.py --iters 10 --batch 8 --pairs vit_b,vit_l,vitdet_l

For each pair (ours vs timm) and precision (fp32, bf16 autocast) it prints forward and training-step
(forward + backward + AdamW step) images/s as medians over ``--iters`` timed iterations after
``--warmup``, the ratio ours/timm (>= 1.0 is the goal, issue 4), the fraction of the measured
matmul peak each training step reaches (training FLOPs counted by ``torch.utils.flop_counter``),
and peak memory: ``torch.cuda.max_memory_allocated`` on GPU, on CPU the growth of the peak RSS of
a fresh (spawned) process that builds the model and runs the measurement.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import time
from contextlib import nullcontext

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import mmafm

# name -> (mmafm preset, timm model name, timm kwargs, image size)
PAIRS = {
    "vit_b": ("vit_base_patch16", "vit_base_patch16_224", {}, 224),
    "vit_l": ("vit_large_patch16", "vit_large_patch16_224", {}, 224),
    "vitdet_l": ("vitdet_large_patch16", "samvit_large_patch16", {"img_size": 448, "neck_chans": 0}, 448),  # 0: timm drops None kwargs
}


def build(kind: str, pair: str, device: str) -> torch.nn.Module:
    preset, timm_name, timm_kwargs, _ = PAIRS[pair]
    if kind == "mmafm":
        return mmafm.create_model(preset, device=device, num_classes=1000)
    with torch.device(device):
        return timm.create_model(timm_name, pretrained=False, num_classes=1000, **timm_kwargs)


def autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(kind: str, pair: str, mode: str, precision: str, args: argparse.Namespace) -> dict:
    """Images/s (median) and peak memory of one model in one mode ("forward" or "train")."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    start_rss = _rss_bytes()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = build(kind, pair, args.device)
    size = PAIRS[pair][3]
    images = torch.randn(args.batch, 3, size, size, device=args.device)
    labels = torch.randint(0, 1000, (args.batch,), device=args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if mode == "train" else None
    model.train(mode == "train")

    def step() -> None:
        if mode == "forward":
            with torch.no_grad(), autocast(args.device, precision):
                model(images)
            return
        with autocast(args.device, precision):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for index in range(args.warmup + args.iters):
        _sync(args.device)
        began = time.perf_counter()
        step()
        _sync(args.device)
        if index >= args.warmup:
            times.append(time.perf_counter() - began)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss
    return {"images_per_s": args.batch / statistics.median(times), "peak_mb": peak / 2**20}


def _child(queue, *call) -> None:
    queue.put(measure(*call))


def measure_isolated(*call) -> dict:
    """Run :func:`measure` in a fresh process so each peak-RSS reading is its own (spawned: a
    fork after OpenMP has run can deadlock)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, *call))
    process.start()
    result = queue.get()
    process.join()
    return result


def flops_per_image(pair: str) -> dict[str, float]:
    """Forward and forward+backward FLOPs of one image, counted on a meta-device copy."""
    model = mmafm.create_model(PAIRS[pair][0], device="meta", num_classes=1000)
    size = PAIRS[pair][3]
    images = torch.empty(1, 3, size, size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(images)
    forward = counter.get_total_flops()
    with counter:
        logits.sum().backward()
    return {"forward": forward, "train": forward + counter.get_total_flops()}


def matmul_peak_flops(device: str, precision: str, size: int = 2048, repeats: int = 5) -> float:
    """Median FLOP/s of a square matmul: the roofline the training step is compared with."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        began = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - began)
    return 2 * size**3 / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default="vit_b,vit_l", help=f"comma list of {sorted(PAIRS)}")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32,bf16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (this machine: 2 cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.pairs.split(",")) - set(PAIRS))
    if unknown:
        parser.error(f"unknown pairs {unknown}; expected some of {sorted(PAIRS)}")

    torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} "
          f"warmup={args.warmup} iters={args.iters} (medians)")
    header = (f"{'pair':9s} {'prec':5s} {'mode':8s} {'ours img/s':>10s} {'timm img/s':>10s} "
              f"{'ratio':>6s} {'ours %pk':>8s} {'timm %pk':>8s} {'ours MB':>8s} {'timm MB':>8s}")
    print(header)
    for precision in args.precisions.split(","):
        peak = matmul_peak_flops(args.device, precision)
        for pair in args.pairs.split(","):
            flops = flops_per_image(pair)
            for mode in ("forward", "train"):
                ours = measure_isolated("mmafm", pair, mode, precision, args)
                theirs = measure_isolated("timm", pair, mode, precision, args)
                fraction = lambda r: 100 * r["images_per_s"] * flops[mode] / peak  # noqa: E731
                print(f"{pair:9s} {precision:5s} {mode:8s} {ours['images_per_s']:10.2f} "
                      f"{theirs['images_per_s']:10.2f} {ours['images_per_s'] / theirs['images_per_s']:6.2f} "
                      f"{fraction(ours):7.1f}% {fraction(theirs):7.1f}% {ours['peak_mb']:8.0f} "
                      f"{theirs['peak_mb']:8.0f}", flush=True)
        print(f"  matmul peak {precision}: {peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
