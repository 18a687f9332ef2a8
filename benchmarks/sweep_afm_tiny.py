"""Short sweeps of the AFM optimizer's settings at the tiny size, against the AdamW baseline.

    nice .venv/bin/python benchmarks/sweep_afm_tiny.py --tokens runs/<run-id>/00_data/tokens \
        --steps 400 --runs afm,adamw,afm_lr3e-3 --json benchmarks/results/afm_tiny_sweep.json

Each run trains ``02_text_pretrain``'s model (the tiny 2024 on-device preset, 16 x 128-token rows)
with the stage's own training code (:func:`mmafm.stages.text_pretrain.train_text_model`) for
``--steps`` steps (warm-up 50, cosine to 0.005 of the peak, grad clip 1.0, skip guard 100), and
reports the held-out perplexity on ``--val-batches`` batches of ``val.bin``. A run is named
``afm`` or ``adamw`` plus ``_key=value`` changes: ``lr``, ``wd`` (weight decay), ``b2``
(gradient-square EMA), ``b1`` (update EMA; ``none`` = off), ``g1`` (a debiased gradient EMA
before the normalisation, Adam's momentum; off in AFM), ``clip`` (per-block update clip
threshold; ``none`` = off), ``base`` (mu-param base width), ``warm`` (warm-up steps), e.g.
``afm_lr3e-3_wd0``. The AdamW baseline is 02's: lr 2e-3, weight decay 0.1, betas (0.9, 0.95).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mmafm.io import atomic_write_text

KEYS = {"lr": "lr", "wd": "weight_decay", "b2": "gradient_square_ema_decay", "b1": "update_ema_decay",
        "g1": "gradient_ema_decay",
        "clip": "update_clip_threshold", "base": "mup_base_width", "warm": "warmup_steps"}


def parse_run(name: str) -> tuple[str, dict]:
    """``"afm_lr3e-3_b1none"`` -> ``("afm", {"lr": 3e-3, "update_ema_decay": None})``."""
    optimizer, *changes = name.split("_")
    if optimizer not in ("afm", "adamw"):
        raise ValueError(f"run {name!r}: starts with afm or adamw")
    values: dict = {}
    for change in changes:
        key = next((k for k in sorted(KEYS, key=len, reverse=True) if change.startswith(k)), None)
        if key is None:
            raise ValueError(f"run {name!r}: unknown change {change!r}; known: {sorted(KEYS)}")
        text = change[len(key):]
        values[KEYS[key]] = None if text == "none" else (int(text) if key in ("base", "warm") else float(text))
    return optimizer, values


def train_once(name: str, tokens: Path, tokenizer: Path, steps: int, val_batches: int, seed: int) -> dict:
    from mmafm.stages.text_pretrain import TextPretrainConfig, build_text_model, train_text_model
    from mmafm.stages.base import StageDir
    from mmafm.train import seed_everything
    from mmafm.train.optim import AdaStar, afm_param_groups

    optimizer, values = parse_run(name)
    lr = values.pop("lr", 1e-2 if optimizer == "afm" else 2e-3)
    decay = values.pop("weight_decay", 3.16e-4 if optimizer == "afm" else 0.1)
    warmup = values.pop("warmup_steps", 50)
    base_width = values.pop("mup_base_width", 768)
    with tempfile.TemporaryDirectory() as out:
        cfg = TextPretrainConfig(tokens_dir=str(tokens), tokenizer=str(tokenizer), seq_len=128, batch_size=16,
                                 max_steps=steps, warmup_steps=warmup, optimizer=optimizer, lr=lr,
                                 weight_decay=decay, eval_every=0, eval_batches=val_batches, ckpt_every=0,
                                 log_every=50, seed=seed, out_dir=out)

        def factory(model, config):
            groups = afm_param_groups(model, decay, base_width=base_width)
            return AdaStar(groups, lr=lr, weight_decay=decay, **values)

        seed_everything(seed)
        model, _ = build_text_model(cfg, 2048)
        start = time.time()
        _, records = train_text_model(cfg, model, StageDir(out, "sweep"), factory if optimizer == "afm" else None)
    final = [r for r in records if "eval/val_ppl" in r][-1]
    train = [r for r in records if "ce" in r]
    return {"run": name, "steps": steps, "lr": lr, "weight_decay": decay, "warmup": warmup, "base_width": base_width,
            **values, "val_ppl": round(final["eval/val_ppl"], 2), "train_ce_last": round(train[-1]["ce"], 4),
            "seconds": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=Path, required=True, help="the data stage's tokens_dir")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: TOKENS/../tokenizer/tokenizer.model")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--runs", default="adamw,afm", help="comma-separated run names (see the module docstring)")
    parser.add_argument("--val-batches", type=int, default=16, help="held-out batches of 16 x 128 tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="append each result as a JSON line here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = args.tokenizer or args.tokens.parent / "tokenizer" / "tokenizer.model"
    for name in args.runs.split(","):
        parse_run(name)  # a typo fails before the first run
    print("| run | steps | held-out ppl | last train CE | seconds |\n|---|---:|---:|---:|---:|", flush=True)
    for name in args.runs.split(","):
        result = train_once(name, args.tokens, tokenizer, args.steps, args.val_batches, args.seed)
        print(f"| {name} | {args.steps} | {result['val_ppl']:.2f} | {result['train_ce_last']:.3f} | {result['seconds']} |",
              flush=True)
        if args.json:
            previous = args.json.read_text() if args.json.exists() else ""
            atomic_write_text(args.json, previous + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
