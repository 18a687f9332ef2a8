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
