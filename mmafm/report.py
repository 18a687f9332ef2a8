"""A run's report: every finished stage's summary numbers and figures in one Markdown file.

``mmafm report runs/tiny`` writes ``runs/tiny/REPORT.md``; the numbers quoted in README.md are
copied from such a report of a ``make demo`` run, never typed by hand.

Several runs of one pipeline under different seeds (``mmafm pipeline run ... --seeds 0,1,2``,
``make seeds``) are summarised together: ``mmafm report --seeds runs/tiny-seed*`` writes each
summary number's mean and sample standard deviation over the runs, with every run's value, to
``runs/tiny/RESULTS.md`` (:func:`write_seed_report`).

Stages draw their figures through :func:`stage_figure`, which saves them where the report finds
them (``<stage>/figures/<name>.png``).
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from mmafm.io import atomic_write_text
from mmafm.stages.base import ManifestError, read_manifest

__all__ = [
    "collect",
    "render",
    "write_report",
    "aggregate_seeds",
    "mean_std",
    "render_seeds",
    "write_seed_report",
    "seed_report_path",
    "stage_figure",
]


@contextlib.contextmanager
def stage_figure(stage_dir: Any, name: str, nrows: int = 1, ncols: int = 1, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """``with stage_figure(stage_dir, "loss", 1, 2, figsize=(10, 3.6)) as (fig, axes):`` a
    matplotlib figure (headless Agg backend) and its axes from ``plt.subplots(nrows, ncols,
    **subplots)``; saved by ``stage_dir.save_figure`` as ``figures/<name>.png`` when the block
    ends without an error, and closed either way (a long run draws many figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, **subplots)
    try:
        yield fig, axes
        stage_dir.save_figure(fig, name)
    finally:
        plt.close(fig)


def collect(run_dir: str | Path) -> dict[str, dict]:
    """``{stage: manifest}`` for the complete stages of a run, in stage order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ManifestError(f"no run folder {run_dir}")
    found = {}
    for stage_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        try:
            found[stage_dir.name] = read_manifest(stage_dir)
        except ManifestError:
            continue
    if not found:
        raise ManifestError(f"{run_dir} holds no complete stage")
    return found


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    lines = [f"# Report of `{run_dir.name}`", ""]
    for stage, manifest in collect(run_dir).items():
        lines += [f"## {stage}", "", f"finished {manifest.get('finished_at', '?')}", ""]
        summary = {  # scalars only: lists and tables live in the notebook and figures
            key: value
            for key, value in (manifest.get("summary") or {}).items()
            if isinstance(value, (int, float, str, bool))
        }
        if summary:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {key} | {_format(value)} |" for key, value in summary.items()]
            lines.append("")
        for figure in manifest.get("figures", []):
            relative = Path(figure).relative_to(run_dir) if Path(figure).is_absolute() else figure
            lines.append(f"![{Path(figure).stem}]({relative})")
        lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    path = Path(run_dir) / "REPORT.md"
    atomic_write_text(path, render(run_dir))
    return path


# ------------------------------------------------------------------------ over seeds
def _scalar_summary(manifest: dict) -> dict[str, Any]:
    return {
        key: value
        for key, value in (manifest.get("summary") or {}).items()
        if isinstance(value, (int, float, str, bool))
    }


def aggregate_seeds(run_dirs: Sequence[str | Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{stage: {metric: {run name: value}}}``: every scalar summary number of every run.

    A stage or metric missing from some runs is kept with the runs that have it.
    """
    if not run_dirs:
        raise ManifestError("no run folders to aggregate")
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for run_dir in run_dirs:
        for stage, manifest in collect(run_dir).items():
            for metric, value in _scalar_summary(manifest).items():
                table.setdefault(stage, {}).setdefault(metric, {})[Path(run_dir).name] = value
    return {stage: table[stage] for stage in sorted(table)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (divisor n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _spread(values: list[Any]) -> str:
    """``mean ± std`` of numbers, the value itself when every run has the same one."""
    if all(value == values[0] for value in values):
        return f"{_format(values[0])} (exact)"
    if all(_is_number(value) for value in values):
        mean, std = mean_std([float(v) for v in values])
        return f"{mean:.4g} ± {std:.2g}"
    return "varies"


def render_seeds(run_dirs: Sequence[str | Path]) -> str:
    """Markdown: per stage, each summary number's mean ± std over the runs and each run's value."""
    names = [Path(run_dir).name for run_dir in run_dirs]
    if len(set(names)) != len(names):
        raise ManifestError(f"run folders share a name: {names}")
    lines = [
        f"# Results over {len(names)} runs: {', '.join(f'`{n}`' for n in names)}",
        "",
        "Mean ± sample standard deviation (divisor n - 1) of every summary number over the runs; a",
        "number equal in every run is shown once and marked exact. n counts the runs that have it.",
        "",
    ]
    for stage, metrics in aggregate_seeds(run_dirs).items():
        lines += [f"## {stage}", "", "| metric | mean ± std | n | " + " | ".join(names) + " |"]
        lines.append("|---" * (3 + len(names)) + "|")
        for metric, by_run in metrics.items():
            values = list(by_run.values())
            cells = [_format(by_run[name]) if name in by_run else "" for name in names]
            lines.append(f"| {metric} | {_spread(values)} | {len(values)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


_SEED_RUN = re.compile(r"^(?P<run_id>.+)-seed\d+$")


def seed_report_path(run_dirs: Sequence[str | Path]) -> Path:
    """``runs/<run-id>/RESULTS.md`` for run folders named ``<run-id>-seed<k>`` in one folder.

    Raises:
        ManifestError: the folders do not share such a name and parent (pass the path instead).
    """
    matches = [_SEED_RUN.match(Path(run_dir).name) for run_dir in run_dirs]
    run_ids = {m.group("run_id") for m in matches if m}
    parents = {Path(run_dir).resolve().parent for run_dir in run_dirs}
    if not run_dirs or not all(matches) or len(run_ids) != 1 or len(parents) != 1:
        raise ManifestError(
            f"cannot tell where the results of {[str(d) for d in run_dirs]} go: expected folders "
            "<run-id>-seed<k> side by side; pass --out"
        )
    return parents.pop() / run_ids.pop() / "RESULTS.md"


def write_seed_report(run_dirs: Sequence[str | Path], path: str | Path | None = None) -> Path:
    """Write :func:`render_seeds` of ``run_dirs`` to ``path`` (default :func:`seed_report_path`)."""
    path = Path(path) if path is not None else seed_report_path(run_dirs)
    atomic_write_text(path, render_seeds(run_dirs))
    return path


def reference_numbers() -> str:
    """The reports' reproducible numbers, computed from the full-size configs (meta device).

    ``mmafm numbers`` prints this; README.md pastes its output.
    """
    import torch

    from mmafm.registry import create_model, get_config
    from mmafm.models.ptmoe import sync_points
    from mmafm.models.text import kv_cache_bytes

    device = get_config("afm_2025_device")
    shared = kv_cache_bytes(device, 4096, 1, torch.bfloat16)
    plain = kv_cache_bytes(get_config("afm_2025_device", kv_share_segments=None), 4096, 1, torch.bfloat16)
    sync = sync_points(get_config("afm_2025_server"))
    vl = create_model("afm_vl_2025_device", device="meta")
    adapter = sum(p.numel() for p in vl.adapter.parameters())
    tokens = {mode: vl.num_image_tokens(mode) for mode in ("rapid", "balanced", "high_res")}
    rows = [
        "| number | report | computed here |",
        "| --- | --- | --- |",
        f"| KV cache of `afm_2025_device`, 4,096 tokens, bf16 | -37.5% (5:3 sharing) | "
        f"{shared:,} B vs {plain:,} B without sharing: {shared / plain - 1:+.1%} |",
        f"| sync points of `afm_2025_server` (L={sync['tensor_parallel'] // 2} per track, D="
        f"{get_config('afm_2025_server').track_block_depth}) | 2L vs L/D (-87.5%) | "
        f"{sync['tensor_parallel']} vs {sync['parallel_track']}: {-sync['reduction']:+.1%} |",
        f"| image tokens per mode (rapid / balanced / high-res) | 9 / 144 / 720 | "
        f"{tokens['rapid']} / {tokens['balanced']} / {tokens['high_res']} |",
        f"| vision-language adapter, on device (ViTDet-L -> 2048) | [open] | {adapter:,} params |",
    ]
    reported = {  # ../shared/REFERENCE.md
        "vit_giant_patch14": "~1B",
        "vitdet_large_patch16": "~300M",
        "afm_2024_device": "2.58B non-embedding + 0.15B embedding",
        "afm_2025_device": "~3.11B",
    }
    for name, claim in reported.items():
        model = create_model(name, device="meta")
        count = sum(p.numel() for p in model.parameters())
        rows.append(f"| parameters of `{name}` | {claim} | {count:,} |")
    return "\n".join(rows)
