"""A run's report: every finished stage's summary numbers and figures in one Markdown file.

``mmafm report runs/tiny`` writes ``runs/tiny/REPORT.md``; the numbers quoted in README.md are
copied from such a report of a ``make demo`` run, never typed by hand.
"""

from __future__ import annotations

from pathlib import Path

from mmafm.io import atomic_write_text
from mmafm.stages.base import ManifestError, read_manifest

__all__ = ["collect", "render", "write_report"]


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
