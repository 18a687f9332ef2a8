"""GPU check: full-size training steps on one GPU, timed, with their model FLOPs utilization.

    python benchmarks/gpu_check.py --out gpu_check.json     # on a CUDA machine (~1-3 minutes)
    python benchmarks/gpu_check.py --dry-run                # anywhere: meta device, nothing allocated
    python benchmarks/gpu_check.py --smoke                  # the timed path on tiny presets, CPU + gloo

Two workloads, each trained for ``--warmup`` + ``--steps`` steps by the one trainer
(:class:`mmafm.train.Trainer`) with bf16 autocast, in a one-process group that the trainer
joins through :mod:`mmafm.train.distributed` (the script sets ``RANK=0``, ``WORLD_SIZE=1`` as
torchrun would; under a real ``torchrun`` its variables are kept):

- ``text``: ``afm_2025_device`` at full size (3.11B parameters), ``--text-batch`` rows of
  ``--seq-len`` random tokens, next-token loss (the model's cross-entropy + z-loss), with
  ``parallel="fsdp"``: FSDP2 ``fully_shard`` on each decoder layer, then the root;
- ``clip``: ``clip_vit_giant_patch14`` (ViT-g/14 at 448 px with FLIP masking 0.5, 1024-wide
  text tower), ``--clip-batch`` random images and captions, the symmetric CLIP loss, with
  ``parallel="ddp"``: the plain model, as before. The CLIP stage itself also offers
  ``parallel="fsdp"`` (``fully_shard`` refuses scalar parameters, so the stage first makes
  ``logit_scale`` a one-element vector, ``scalars_as_vectors``); this check has not been moved to
  it because no GPU run has tried that path yet (a ViT-g replica fits one H200).

Reported per workload: the median step time after warm-up (each step timed from one step's start
to the next, with the GPU synchronized there, so forward, backward, clipping, the optimizer and
the trainer's logging all count), tokens/s (images/s for CLIP), achieved TFLOP/s and MFU, and
peak GPU memory; printed as a table and, with ``--out``, written as JSON.

MFU = model FLOPs per step / step time / peak. Model FLOPs per step = 6 x parameters x tokens
(2 per parameter and token forward, 4 backward; Kaplan et al. 2020, as nanoGPT and torchtitan
count it). For CLIP each tower's parameters are multiplied by the tokens that tower processes
(image tokens the blocks see after FLIP masking, plus the class token; the caption length), the
projections by one. The count leaves out the attention score / value products; ``--dry-run``
also counts every matmul of a forward and backward with ``torch.utils.flop_counter`` on the meta
device, which shows how much they add (about 15% for the text model at 2,048 tokens), so the
MFU here is the conservative one. Peak: ``--peak-tflops`` defaults to 989, the dense (no 2:4
sparsity) bf16 tensor-core peak of an H200 SXM (and H100 SXM) from NVIDIA's datasheet; pass the
peak of another GPU (A100: 312, H200 NVL: 835).

``--dry-run`` builds both models full size on the meta device, runs their forward and backward
there (shapes only, under the FLOP counter), and prints the parameter counts, the FLOPs and the
trainer settings it would run, then the full-size PT-MoE server's track x FSDP plan on 8, 64 and
512 GPUs (docs/distributed.md). ``--smoke`` runs the timed path itself on ``afm_2025_device_tiny``
and ``clip_tiny`` on the CPU (gloo), so a lent GPU's minutes are not spent finding a script error.
``tests/test_gpu_check.py`` runs both. Without ``--dry-run`` / ``--smoke`` and without a visible
CUDA GPU the script exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import mmafm

H200_PEAK_BF16_TFLOPS = 989.0  # dense bf16 tensor-core peak, H200 SXM (NVIDIA datasheet; 1,979 is with sparsity)
TEXT_PRESET = "afm_2025_device"
CLIP_PRESET = "clip_vit_giant_patch14"
# FSDP2 for the decoder; DDP for CLIP (its stage's fsdp path, which turns the scalar logit_scale
# into a one-element vector for fully_shard, has not been run on a GPU yet)
PARALLEL = {"text": "fsdp", "clip": "ddp"}


@dataclass
class Workload:
    """One model, its dummy batch shape and its FLOP count per optimizer step."""

    name: str  # "text" or "clip"
    preset: str
    batch: int  # rows (text) or image-caption pairs (clip) per step
    unit: str  # what throughput counts: "tokens" or "images"
    items_per_step: int  # tokens (text) or images (clip) per step
    params: int
    model_flops_per_step: float  # 6 x parameters x tokens


# ------------------------------------------------------------------------------- FLOP counts
def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def clip_tokens(model: nn.Module) -> tuple[int, int]:
    """(tokens the image tower's blocks see per image, caption tokens) of a training forward.

    FLIP keeps ``round(patches * (1 - mask_ratio))`` patches (at least one), as
    :func:`mmafm.models.vit.random_masking` does, then the prefix ([CLS]) token joins them.
    """
    visual = model.visual.config
    patches = (visual.img_size // visual.patch_size) ** 2
    ratio = getattr(visual, "mask_ratio", 0.0)
    kept = max(1, int(round(patches * (1 - ratio)))) if ratio > 0 else patches
    return kept + model.visual.num_prefix_tokens, model.config.text.context_length


def text_workload(preset: str, model: nn.Module, batch: int, seq_len: int) -> Workload:
    params = count_params(model)
    tokens = batch * seq_len
    return Workload("text", preset, batch, "tokens", tokens, params, 6.0 * params * tokens)


def clip_workload(preset: str, model: nn.Module, batch: int) -> Workload:
    image_tokens, text_tokens = clip_tokens(model)
    visual, text, params = count_params(model.visual), count_params(model.text), count_params(model)
    per_image = visual * image_tokens + text * text_tokens + (params - visual - text)  # projections: one token
    return Workload("clip", preset, batch, "images", batch, params, 6.0 * per_image * batch)


# ------------------------------------------------------------------------------- batches, losses
def text_batch(model: nn.Module, batch: int, seq_len: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token rows: ``(input_ids (B, T), targets (B, T))``, targets shifted by one."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
    return ids[:, :-1], ids[:, 1:]


def clip_batch(model: nn.Module, batch: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalized images ``(B, 3, S, S)`` and captions ``(B, T)`` ending in the end token."""
    side, text = model.config.image_size, model.config.text
    images = torch.randn(batch, 3, side, side, device=device)
    tokens = torch.randint(1, min(text.eot_id, text.vocab_size), (batch, text.context_length), device=device)
    tokens[:, -1] = text.eot_id  # full-length captions: the end token is the pooled one
    return images, tokens


def text_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    input_ids, targets = batch
    loss, _ = model.loss(model(input_ids), targets)  # (B, T, V) logits -> CE + z-loss
    return loss


def contrastive_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (CLIP's loss, one rank) from ``CLIP.forward``'s dict."""
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T  # (B, B)
    if "logit_bias" in out:
        logits = logits + out["logit_bias"]
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits.float(), targets) + F.cross_entropy(logits.float().T, targets)) / 2


def clip_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return contrastive_loss(model(*batch))


class TimedTask:
    """A trainer task that synchronizes the GPU when a step starts and notes the time: the gap
    between two starts is one whole optimizer step (the trainer has no step callback)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, items: int):
        self.model = model
        self.loss_fn = loss_fn
        self.items = items
        self.starts: list[float] = []

    def training_forward(self, batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())
        return {"objective": self.loss_fn(self.model, batch)}, {}

    def count_items(self, batch: Any) -> int:
        return self.items


# ------------------------------------------------------------------------------- dry run
def meta_pass(name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[str, float]:
    """Forward + backward on the meta device under the FLOP counter: (output shapes, FLOPs).

    The text loss here is plain cross-entropy: ``model.loss`` reads its metrics with ``.item()``,
    which meta tensors cannot answer (the z-loss it adds is one logsumexp, no matmul FLOPs).
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    with FlopCounterMode(display=False) as counter:
        if name == "text":
            logits = model(batch[0])  # (B, T, V)
            shapes = f"logits {tuple(logits.shape)}"
            loss = F.cross_entropy(logits.flatten(0, 1), batch[1].flatten())
        else:
            out = model(*batch)
            shapes = f"image_features {tuple(out['image_features'].shape)}, text_features {tuple(out['text_features'].shape)}"
            loss = contrastive_loss(out)
        loss.backward()
    return shapes, float(counter.get_total_flops())


def dry_run(args: argparse.Namespace) -> list[dict]:
    """Both models full size on meta: parameter counts, 6N FLOPs and counted FLOPs per step."""
    results = []
    for name in args.only:
        preset = args.text_preset if name == "text" else args.clip_preset
        model = mmafm.create_model(preset, device="meta")
        if name == "text":
            workload = text_workload(preset, model, args.text_batch, args.seq_len)
            batch = text_batch(model, args.text_batch, args.seq_len, "meta")
        else:
            workload = clip_workload(preset, model, args.clip_batch)
            batch = clip_batch(model, args.clip_batch, "meta")
        shapes, counted = meta_pass(name, model, batch)
        print(f"{workload.name}: {workload.preset} parameters {workload.params:,}; batch {workload.batch}, "
              f"{workload.items_per_step:,} {workload.unit}/step; {shapes}")
        print(f"{workload.name}: model FLOPs/step (6N) {workload.model_flops_per_step:.4e}; "
              f"flop_counter fwd+bwd {counted:.4e} (x{counted / workload.model_flops_per_step:.3f})")
        results.append(asdict(workload) | {"counted_flops_per_step": counted, "parallel": PARALLEL[name]})
    print(f"would run: Trainer(parallel={PARALLEL}, precision='bf16', device={args.device!r}), {args.warmup} warm-up + "
          f"{args.steps} timed steps per workload, MFU against {args.peak_tflops:g} TFLOP/s")
    return results


def print_track_plan() -> list[dict]:
    """The full-size PT-MoE server on a track x FSDP mesh of 8, 64 and 512 GPUs (closed forms of
    :func:`mmafm.train.parallel.track_plan`, docs/distributed.md): memory per GPU, bytes per step."""
    from mmafm.train.parallel import plan_table, track_plan

    plans = [track_plan(mmafm.get_config("afm_2025_server"), gpus) for gpus in (8, 64, 512)]
    print("\nafm_2025_server, track x FSDP (seq 4096, 4096 rows per step, 1 row per micro-batch):")
    print(plan_table(plans))
    return [asdict(plan) for plan in plans]


# ------------------------------------------------------------------------------- GPU run
def _join_one_process_group() -> None:
    """torchrun's variables for a single process, unless torchrun already set them."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


def run_workload(name: str, args: argparse.Namespace) -> dict:
    """Train workload ``name`` for warm-up + timed steps (bf16, ``PARALLEL[name]``); its timing row."""
    from mmafm.train import Trainer, TrainConfig

    on_gpu = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    torch.manual_seed(0)
    built = time.perf_counter()
    preset = args.text_preset if name == "text" else args.clip_preset
    model = mmafm.create_model(preset, device=device)  # initialized where it trains: no host copy
    if name == "text":
        workload = text_workload(preset, model, args.text_batch, args.seq_len)
        batch, loss_fn = text_batch(model, args.text_batch, args.seq_len, device), text_loss
    else:
        workload = clip_workload(preset, model, args.clip_batch)
        batch, loss_fn = clip_batch(model, args.clip_batch, device), clip_loss
    build_seconds = time.perf_counter() - built
    task = TimedTask(model, loss_fn, workload.items_per_step)
    config = TrainConfig(
        max_steps=args.warmup + args.steps + 1,  # the extra step's start ends the last timed one
        lr=1e-5, warmup_steps=0, schedule="constant", precision="bf16", parallel=PARALLEL[name],
        log_every=1, eval_every=0, ckpt_every=0, device=args.device,
    )
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    records = Trainer(task, [batch], config).fit()  # stage_dir None: no checkpoints written
    step_seconds = [b - a for a, b in zip(task.starts, task.starts[1:])][args.warmup:]
    median = statistics.median(step_seconds)
    achieved = workload.model_flops_per_step / median
    losses = [r["loss"] for r in records if "loss" in r]
    return asdict(workload) | {
        "parallel": PARALLEL[name],
        "build_seconds": round(build_seconds, 2),
        "step_seconds": [round(s, 4) for s in step_seconds],
        "median_step_seconds": median,
        "throughput": workload.items_per_step / median,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (args.peak_tflops * 1e12),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def print_table(rows: list[dict], peak_tflops: float) -> None:
    print(f"\n| workload | preset | params | batch | median step | throughput | TFLOP/s | MFU (peak {peak_tflops:g}) | peak mem |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        memory = "" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f} GiB"
        print(f"| {row['name']} | {row['preset']} | {row['params']:,} | {row['batch']} | "
              f"{row['median_step_seconds'] * 1e3:.0f} ms | {row['throughput']:,.0f} {row['unit']}/s | "
              f"{row['achieved_tflops']:.3g} | {row['mfu']:.1%} | {memory} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="meta device only: shapes, parameter and FLOP counts")
    parser.add_argument("--only", nargs="+", choices=("text", "clip"), default=["text", "clip"])
    parser.add_argument("--text-batch", type=int, default=2, help="rows per text step")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per text row")
    parser.add_argument("--clip-batch", type=int, default=32, help="image-caption pairs per CLIP step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--peak-tflops", type=float, default=H200_PEAK_BF16_TFLOPS,
                        help="the GPU's dense bf16 peak for MFU (default: H200 SXM)")
    parser.add_argument("--text-preset", default=TEXT_PRESET, help="text model preset")
    parser.add_argument("--clip-preset", default=CLIP_PRESET, help="CLIP preset")
    parser.add_argument("--smoke", action="store_true",
                        help="test the script itself: tiny presets, CPU, gloo, a few short steps")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.device = "cuda"
    if args.smoke:
        args.device = "cpu"
        args.text_preset, args.clip_preset = "afm_2025_device_tiny", "clip_tiny"
        args.text_batch, args.seq_len, args.clip_batch, args.warmup, args.steps = 2, 32, 4, 1, 2

    report: dict[str, Any] = {"args": vars(args), "torch": torch.__version__, "dry_run": args.dry_run}
    if args.dry_run:
        report["results"] = dry_run(args)
        report["track_plan"] = print_track_plan()
    else:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
        if not args.smoke and not torch.cuda.is_available():
            print("gpu_check.py: no CUDA GPU is visible; it times full-size models on one. "
                  "Use --dry-run for the CPU check (meta device).", file=sys.stderr)
            return 2
        _join_one_process_group()
        from mmafm.train import cleanup_distributed

        report["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        try:
            rows = []
            for name in args.only:
                rows.append(run_workload(name, args))
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                print(f"{name}: median step {rows[-1]['median_step_seconds']:.3f} s, MFU {rows[-1]['mfu']:.1%}", flush=True)
        finally:
            cleanup_distributed()
        report["results"] = rows
        print_table(rows, args.peak_tflops)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
