"""Training-step speed of mmafm's CLIP against open_clip's own CLIP of the same shape, in one run.

    .venv/bin/python benchmarks/bench_clip.py                    # ViT-B/32 + 512x12 text, batch 8
    .venv/bin/python benchmarks/bench_clip.py --threads 2 --batch 16 --repeats 5
    .venv/bin/python benchmarks/bench_clip.py --small            # a 2-block toy, for a smoke test

Both models are built from scratch (no weights): ours as ``clip_vit_base_patch16`` with
``image_patch_size=32`` (ViT-B/32 at 224, a 512-wide 12-layer causal text tower, 77 tokens,
512-d embeddings), theirs with ``open_clip.create_model`` from the equivalent custom config dict
(open_clip's ``ViT-B-32``). A training step is: forward both towers on the same images and
captions, open_clip's ``ClipLoss``, backward, ``AdamW`` step. Reported per model: median
images/s over ``--repeats`` steps after ``--warmup`` steps, ours and theirs interleaved so
background load hits both alike; the ratio ours/theirs (issue 6's goal: >= 1.0); and the
achieved matmul FLOP/s against a measured square-matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import mmafm
from mmafm.tokenizer import load_caption_tokenizer

CAPTIONS = ["a small red circle on the left", "two large blue squares at the top and a green star",
            "emoji of a grinning face", "a picture of three yellow triangles in the center"]


def open_clip_config(model) -> dict:
    """open_clip's model config dict for the shape of our ``model``."""
    cfg, text = model.config, model.config.text
    visual = model.visual.config
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": visual.img_size, "layers": visual.depth, "width": visual.embed_dim,
                       "patch_size": visual.patch_size, "mlp_ratio": visual.mlp_dim / visual.embed_dim,
                       "head_width": visual.embed_dim // visual.num_heads},
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                     "heads": text.num_heads, "layers": text.depth, "mlp_ratio": text.mlp_dim / text.width},
    }


def create_open_clip(config: dict, name: str = "mmafm-bench-clip"):
    import open_clip

    folder = tempfile.mkdtemp()
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as handle:
        json.dump(config, handle)
    open_clip.add_model_config(path)
    return open_clip.create_model(name)


def matmul_peak_gflops(size: int = 1024, repeats: int = 5) -> float:
    """Median fp32 GFLOP/s of a square matmul (the CPU's practical peak)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def make_step(model, images, tokens):
    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        scale = model.logit_scale.exp()
        loss_fn(image_features, text_features, scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_flops(step) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="image-caption pairs per step")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per model (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (set deliberately)")
    parser.add_argument("--small", action="store_true", help="2-block towers at 64 px (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.small:
        ours = mmafm.create_model("clip_tiny", text=mmafm.models.clip.text_tower_config("tiny", context_length=77))
    else:
        ours = mmafm.create_model("clip_vit_base_patch16", image_patch_size=32)
    theirs = create_open_clip(open_clip_config(ours), name="mmafm-bench-clip-small" if args.small else "mmafm-bench-clip")
    tokenizer = load_caption_tokenizer("openclip", ours.config.text.context_length)
    size = ours.config.image_size
    images = torch.randn(args.batch, 3, size, size)
    tokens = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)])
    steps = {"mmafm": make_step(ours.train(), images, tokens), "open_clip": make_step(theirs.train(), images, tokens)}
    params = {"mmafm": sum(p.numel() for p in ours.parameters()), "open_clip": sum(p.numel() for p in theirs.parameters())}

    flops = {name: step_flops(step) for name, step in steps.items()}  # also the first warm-up step
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():  # interleaved
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    peak = matmul_peak_gflops()

    print(f"CLIP training step, batch {args.batch}, {size}px, patch {ours.visual.config.patch_size}, "
          f"text {ours.config.text.width}x{ours.config.text.depth} @ {ours.config.text.context_length} tokens, "
          f"threads {args.threads}; median of {args.repeats}")
    print(f"{'model':10s} {'params':>12s} {'s/step':>8s} {'images/s':>9s} {'GFLOP/step':>11s} {'GFLOP/s':>8s} {'% peak':>7s}")
    speed = {}
    for name in steps:
        seconds = statistics.median(times[name])
        speed[name] = args.batch / seconds
        gflops = flops[name] / 1e9
        print(f"{name:10s} {params[name]:12,d} {seconds:8.3f} {speed[name]:9.2f} {gflops:11.1f} "
              f"{gflops / seconds:8.1f} {100 * gflops / seconds / peak:6.0f}%")
    print(f"matmul peak {peak:.1f} GFLOP/s; ratio mmafm/open_clip images/s = {speed['mmafm'] / speed['open_clip']:.2f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
