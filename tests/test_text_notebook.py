"""notebooks/text_models.ipynb runs end to end (papermill, mmafm kernel) on a tiny trained-format
checkpoint and on a random tiny model, writing its table, figures, samples and speeds."""

import json
from pathlib import Path

import nbformat
import papermill
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "text_models.ipynb"
SMALL = {"max_new_tokens": 6, "max_context": 8192, "speed_prompt_len": 8, "speed_new_tokens": 4}


def _printed(path: Path) -> str:
    executed = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_text_notebook_on_a_checkpoint(text_checkpoint, tmp_path):
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "out.ipynb"), kernel_name="mmafm", progress_bar=False,
        parameters={"source": str(text_checkpoint["stage_dir"]), "prompts": "a red|a blue square",
                    "out_dir": str(tmp_path), **SMALL},
    )
    assert "| `afm_2025_device` | 35+21 | 2048 |" in (tmp_path / "presets.md").read_text()
    assert (tmp_path / "kv_cache.png").stat().st_size > 10_000
    assert (tmp_path / "decode_speed.png").stat().st_size > 5_000
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert [row["prompt"] for row in samples] == ["a red", "a blue square"]
    speeds = json.loads((tmp_path / "decode_speed.json").read_text())["tok_s"]
    assert len(speeds) == 3 and all(value > 0 for value in speeds.values())
    printed = _printed(tmp_path / "out.ipynb")
    assert "without: 37.5% less" in printed and "'a red' -> " in printed


@pytest.mark.slow
def test_text_notebook_on_a_random_tiny_model(tmp_path):
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "out.ipynb"), kernel_name="mmafm", progress_bar=False,
        parameters={"preset": "afm_2025_server_tiny", "out_dir": str(tmp_path), **SMALL},
    )
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert len(samples) == 2 and all(len(row["completion"]) == SMALL["max_new_tokens"] for row in samples)
