"""Run reports and the reports' reproducible numbers."""

import pytest

from mmafm.report import reference_numbers, render
from mmafm.stages.base import ManifestError, StageDir


def test_reference_numbers_match_the_reports():
    table = reference_numbers()
    assert "without sharing: -37.5%" in table  # 35/56 of the KV cache
    assert "96 vs 12: -87.5%" in table  # 2L vs L/D with L=48, D=4
    assert "| 9 / 144 / 720 |" in table.splitlines()[4]


def test_render_lists_complete_stages_only(tmp_path):
    done = StageDir(tmp_path / "run" / "00_a", "00_a")
    done.write_manifest({"x": "1"}, summary={"acc": 0.5})
    StageDir(tmp_path / "run" / "01_b", "01_b")  # unfinished: no manifest
    text = render(tmp_path / "run")
    assert "## 00_a" in text and "| acc | 0.5 |" in text and "01_b" not in text
    with pytest.raises(ManifestError, match="no complete stage"):
        render(tmp_path / "run" / "01_b")


def test_stage_figure_saves_on_success_and_always_closes(tmp_path):
    import matplotlib.pyplot as plt

    from mmafm.report import stage_figure

    stage_dir = StageDir(tmp_path / "stage", "x")
    open_before = set(plt.get_fignums())
    with stage_figure(stage_dir, "pair", 1, 2, figsize=(4, 2)) as (fig, (left, right)):
        left.plot([0, 1], [1, 0])
        right.bar(["a"], [1])
        assert len(fig.axes) == 2
    assert (tmp_path / "stage" / "figures" / "pair.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RuntimeError, match="drawing failed"):
        with stage_figure(stage_dir, "broken") as (_, axis):
            axis.plot([0, 1], [0, 1])
            raise RuntimeError("drawing failed")
    assert not (tmp_path / "stage" / "figures" / "broken.png").exists()  # no half-drawn figure
    assert set(plt.get_fignums()) == open_before  # both closed
