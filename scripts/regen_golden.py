"""Regenerate the golden-loss files ``tests/golden/{text_pretrain,clip_pretrain,vl_alignment}.json`` (torchtitan style).

Run it only when a change of the training numerics is intended (a new init, loss, optimizer
default, data order...), and say so in the commit::

    python scripts/regen_golden.py --out tests/golden

It builds a tiny data set with the data stage (built-in synthetic pairs and their captions only,
no Debian package, plus a small fake Fashion-MNIST written here for the CLIP evaluation), runs a
tiny text-pretrain, a tiny CLIP-pretrain and a tiny vision-language alignment stage (fresh towers)
for ``GOLDEN_STEPS`` steps with ``log_every=1``
on ``THREADS`` torch thread(s), and stores each stage's per-step losses from its
``metrics.jsonl`` with the config, the torch version and the thread count.
``tests/test_golden.py`` imports :func:`golden_run` from this file and demands the same losses.

The stages are found by their name's suffix (``*_data``, ``*_text_pretrain``,
``*_clip_pretrain``, ``*_vl_alignment``) and configured through :func:`mmafm.stages.make_config`, so the script runs
against the library as it is on ``PYTHONPATH``: the golden files of a change are made from the
code before it with ``cd <clean checkout> && PYTHONPATH=. python <this repo>/scripts/regen_golden.py
--out <this repo>/tests/golden``. The step count is passed as ``max_steps``, or as ``steps`` where a
stage config still calls it that.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

GOLDEN_STEPS = 20  # losses compared per stage
THREADS = 1  # torch intra-op threads: the result of a float reduction depends on how it is split
STEP_FIELD = "max_steps"  # the step count's name in PARAMS; "steps" where a config has only that
FMNIST_IMAGES = 20

# 00_data: synthetic scenes at 32 px and their captions as the only text (fast, no Debian package).
DATA_PARAMS: dict[str, Any] = dict(
    image_sources="synthetic", synthetic_pairs=240, image_size=32, text_sources="captions",
    fashion_mnist=False, vocab_size=300, val_fraction=0.1, shard_size=100, seed=0,
)
# Tiny versions of the two training stages; `tokens_dir` / `pairs_dir` / `tokenizer` /
# `fashion_mnist` / `out_dir` are filled in from the data built by `build_data`.
PARAMS: dict[str, dict[str, Any]] = {
    "text_pretrain": dict(
        preset="afm_2024_device_tiny", seq_len=32, batch_size=4, max_steps=GOLDEN_STEPS, lr=1e-2,
        warmup_steps=2, eval_every=10, eval_batches=2, ckpt_every=0, log_every=1,
        sample_prompts="two small", sample_tokens=4, seed=0,
    ),
    "clip_pretrain": dict(
        image_size=32, batch_size=16, max_steps=GOLDEN_STEPS, warmup_steps=2, num_workers=0,
        threads=THREADS, eval_pairs=12, fmnist_images=FMNIST_IMAGES, ckpt_every=0, log_every=1, seed=0,
    ),
    # fresh towers (no upstream checkpoints), so the run needs only the data stage's pairs
    "vl_alignment": dict(
        image_size=32, image_tokens=4, batch_size=8, max_steps=GOLDEN_STEPS, warmup_steps=2, eval_every=10,
        eval_pairs=8, num_candidates=2, show_images=1, max_new_tokens=4, ckpt_every=0, log_every=1, seed=0,
    ),
}


def find_stage(suffix: str) -> str:
    """The one registered stage whose name ends with ``_<suffix>`` (stage numbers may change)."""
    from mmafm.stages import list_stages

    found = [name for name in list_stages() if name.endswith(f"_{suffix}")]
    if len(found) != 1:
        raise LookupError(f"expected one stage named '*_{suffix}', found {found} in {list_stages()}")
    return found[0]


def stage_config(stage: str, params: dict[str, Any]) -> Any:
    """The stage's validated config from flat ``params``; the step count goes to whichever of
    ``max_steps`` / ``steps`` the config has. Unknown keys are an error (the stages' own
    ``make_config`` would drop them silently and the run would differ from the golden one)."""
    from mmafm.stages import get_stage, make_config

    config_cls = get_stage(stage).config_cls
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = dict(params)
    if STEP_FIELD in values and STEP_FIELD not in fields and "steps" in fields:
        values["steps"] = values.pop(STEP_FIELD)
    unknown = sorted(set(values) - fields)
    if unknown:
        raise KeyError(f"{stage}: {config_cls.__name__} has no field(s) {unknown}; update scripts/regen_golden.py")
    return make_config(stage, values)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped IDX file (Fashion-MNIST's format): magic, big-endian dims, uint8 data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


def build_data(root: Path) -> dict[str, str]:
    """Run the data stage into ``root/data`` and write a fake Fashion-MNIST test split; returns
    the data stage's outputs with ``fashion_mnist`` pointing at the fake split."""
    stage = find_stage("data")
    from mmafm.stages import get_stage

    outputs = dict(get_stage(stage).run(stage_config(stage, {**DATA_PARAMS, "out_dir": str(root / "data")})))
    fmnist = root / "fashion_mnist"
    fmnist.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    _write_idx(fmnist / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (FMNIST_IMAGES, 28, 28)))
    _write_idx(fmnist / "t10k-labels-idx1-ubyte.gz", np.arange(FMNIST_IMAGES) % 10)
    outputs["fashion_mnist"] = str(fmnist)
    return outputs


def _inputs(kind: str, data: dict[str, str]) -> dict[str, str]:
    if kind == "text_pretrain":
        return {"tokens_dir": data["tokens_dir"], "tokenizer": data["tokenizer"]}
    if kind == "vl_alignment":
        return {"pairs_dir": data["pairs_dir"], "tokenizer": data["tokenizer"]}
    return {"pairs_dir": data["pairs_dir"], "tokenizer": data["tokenizer"], "fashion_mnist": data["fashion_mnist"]}


def read_losses(metrics_path: Path) -> list[float]:
    """The per-step training losses of a ``log_every=1`` run, checked to be steps 1..N."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if [step for step, _ in steps] != list(range(1, GOLDEN_STEPS + 1)):
        raise ValueError(f"{metrics_path}: expected loss records for steps 1..{GOLDEN_STEPS}, got {[s for s, _ in steps]}")
    return [loss for _, loss in steps]


def golden_run(kind: str, data: dict[str, str], out_dir: Path) -> dict[str, Any]:
    """Run stage ``kind`` (a key of ``PARAMS``) on ``data`` into ``out_dir`` with
    ``THREADS`` torch threads; returns the golden record (config, losses, versions)."""
    stage = find_stage(kind)
    config = stage_config(stage, {**PARAMS[kind], **_inputs(kind, data), "out_dir": str(out_dir)})
    from mmafm.stages import get_stage

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        get_stage(stage).run(config)
    finally:
        torch.set_num_threads(previous)
    return {
        "stage": stage,
        "config": PARAMS[kind],
        "data_config": DATA_PARAMS,
        "losses": read_losses(out_dir / "metrics.jsonl"),
        "torch": torch.__version__,
        "threads": THREADS,
        "regenerate": "python scripts/regen_golden.py --out tests/golden",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the <kind>.json files")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the tiny runs go (default: a temp folder)")
    args = parser.parse_args(argv)

    import mmafm
    from mmafm.io import atomic_write_json

    print(f"mmafm from {mmafm.__file__}, torch {torch.__version__}, {THREADS} thread(s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        data = build_data(work)
        args.out.mkdir(parents=True, exist_ok=True)
        for kind in PARAMS:
            record = golden_run(kind, data, work / kind)
            path = args.out / f"{kind}.json"
            atomic_write_json(path, record)
            print(f"{path}: {record['stage']} losses {record['losses'][0]:.6f} .. {record['losses'][-1]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
