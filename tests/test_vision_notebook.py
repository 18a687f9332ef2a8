"""notebooks/vision_encoders.ipynb runs end to end with a tiny preset (papermill, mmafm kernel)."""

from pathlib import Path

import nbformat
import papermill
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "vision_encoders.ipynb"


@pytest.mark.slow
def test_vision_notebook_runs_with_a_tiny_preset(tmp_path):
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "out.ipynb"), kernel_name="mmafm", progress_bar=False,
        parameters={"preset": "vitdet_large_patch16_rw_tiny", "image_size": 112,
                    "resolutions": "224", "out_dir": str(tmp_path)},
    )
    table = (tmp_path / "presets.md").read_text()
    assert "| vitdet_large_patch16_rw | 304.0 | 197 |" in table  # params (M), tokens at 224
    assert (tmp_path / "register_window_attention.png").stat().st_size > 10_000
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "image: " in printed and "2 register(s)" in printed
