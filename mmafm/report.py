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
        summary = manifest.get("summary") or {}
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
