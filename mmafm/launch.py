"""Run one stage's ``run(config)`` directly, without its notebook: the entry point for torchrun.

Papermill executes a notebook in one kernel process, so multi-process training launches the
stage function itself, once per rank::

    torchrun --standalone --nproc_per_node 8 -m mmafm.launch 01_clip_pretrain \\
        --run-id clip-8gpu -p parallel=ddp -p max_steps=20000

The config is resolved exactly as ``mmafm run`` does (dataclass defaults <- ``--config`` YAML <-
``-p key=value``) with ``out_dir = RUNS_DIR/RUN_ID/STAGE``. Every rank must agree on the run id:
the default is torchrun's rendezvous id (``TORCHELASTIC_RUN_ID``), else a timestamp.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from mmafm.cli import add_stage_arguments

    parser = argparse.ArgumentParser(prog="python -m mmafm.launch", description=__doc__.split("\n")[0])
    add_stage_arguments(parser, run_id_default="torchrun's run id or a timestamp")
    return parser


def _default_run_id() -> str:
    rendezvous = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rendezvous and rendezvous != "none":
        return rendezvous
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Resolve the stage config, run the stage on this rank, return its outputs."""
    from mmafm.config import dump_yaml, parse_overrides
    from mmafm.runner import resolve_stage_config
    from mmafm.stages import get_stage
    from mmafm.stages.base import CONFIG_FILE, check_resume
    from mmafm.train.distributed import cleanup_distributed, get_rank

    args = _parser().parse_args(argv)
    run_id = args.run_id or _default_run_id()
    out_dir = Path(args.runs_dir).resolve() / run_id / args.stage
    config = resolve_stage_config(args.stage, args.config, parse_overrides(args.param), out_dir=out_dir)
    # as `mmafm run` does: never continue a folder's run under another config (every rank reads
    # the same folder, so all refuse alike); rank 0 records the config the run is made with
    check_resume(out_dir, config)
    if os.environ.get("RANK", "0") == "0":
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(config, out_dir / CONFIG_FILE)
    try:
        outputs = get_stage(args.stage).run(config)
    finally:
        cleanup_distributed()
    if get_rank() == 0:
        print(json.dumps({"stage": args.stage, "out_dir": str(out_dir), "outputs": outputs}, indent=2))
    return outputs


if __name__ == "__main__":
    main(sys.argv[1:])
