"""Golden losses (torchtitan style): the first 20 training losses of a tiny text-pretrain, a
tiny CLIP-pretrain and a tiny vision-language alignment stage run must equal the stored ones in
``tests/golden/*.json``.

A refactor that keeps the numerics passes; any change of init, loss, data order, optimizer or
schedule fails here, with the per-step drift. If the change is intended, regenerate the files
and say so in the commit::

    python scripts/regen_golden.py --out tests/golden

(to make them from the code *before* a change: ``cd <clean checkout> && PYTHONPATH=. python
<repo>/scripts/regen_golden.py --out <repo>/tests/golden``). The runs, their config and the data
they train on are defined once, in ``scripts/regen_golden.py``, which this test imports.

Tolerance: relative 1e-5. Three runs of the generator gave bit-identical losses; running the
same stages on 2 threads instead of 1 (a different split of every float32 reduction) moved the
CLIP losses by at most 1.7e-7 relative (1-2 float32 ulps) and the text losses not at all, so
1e-5 leaves a ~60x margin over reassociation noise, while a 0.01% change of the text learning rate
already moves the losses by 2.7e-5.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "golden"
RTOL = 1e-5


def _load_generator():
    spec = importlib.util.spec_from_file_location("regen_golden", ROOT / "scripts" / "regen_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


regen = _load_generator()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    return regen.build_data(tmp_path_factory.mktemp("golden_data"))


@pytest.mark.parametrize("kind", sorted(regen.PARAMS))
def test_losses_match_golden(kind, data, tmp_path):
    golden = json.loads((GOLDEN_DIR / f"{kind}.json").read_text())
    stale = "the golden run's settings changed: regenerate with `python scripts/regen_golden.py --out tests/golden`"
    assert golden["config"] == regen.PARAMS[kind], stale
    assert golden["data_config"] == regen.DATA_PARAMS, stale
    assert golden["threads"] == regen.THREADS and len(golden["losses"]) == regen.GOLDEN_STEPS, stale

    losses = np.array(regen.golden_run(kind, data, tmp_path / kind)["losses"])
    expected = np.array(golden["losses"])
    drift = np.abs(losses - expected) / np.abs(expected)
    bad = np.flatnonzero(drift > RTOL)
    assert not bad.size, (
        f"{kind}: losses drifted from tests/golden/{kind}.json beyond rtol {RTOL} at steps "
        f"{(bad + 1).tolist()} (first: step {bad[0] + 1}, {losses[bad[0]]!r} vs {expected[bad[0]]!r}; "
        f"max relative drift {drift.max():.2e}). Golden made with torch {golden['torch']}, running "
        f"torch {torch.__version__}. If the change is intended: python scripts/regen_golden.py --out tests/golden"
    )

