"""Every YAML under configs/ loads into its dataclass (so a typo in a shipped config fails here,
not an hour into a run)."""

from pathlib import Path

import pytest
import torch

import mmafm
from mmafm.config import from_dict, load_yaml
from mmafm.runner import load_pipeline
from mmafm.stages import get_stage, list_stages

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "models").glob("*.yaml")), ids=lambda p: p.name)
def test_model_config_builds_on_meta(path):
    config = mmafm.get_config(str(path))
    model = mmafm.create_model(str(path), device="meta")
    assert all(p.device == torch.device("meta") for p in model.parameters())
    assert config is not None


@pytest.mark.parametrize("path", sorted((CONFIGS / "stages").glob("*.yaml")), ids=lambda p: p.name)
def test_stage_config_validates(path):
    stage = path.stem.removesuffix("_real")
    stage = next((name for name in list_stages() if stage.startswith(name + "_")), stage)  # a variant: 05_long_context_65k
    from_dict(get_stage(stage).config_cls, load_yaml(path), source=str(path))


@pytest.mark.parametrize("path", sorted((CONFIGS / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_pipeline_validates(path):
    pipeline = load_pipeline(path)
    for entry in pipeline.stages:
        if entry.config:
            assert (CONFIGS.parent / entry.config).is_file(), f"{path.name}: missing {entry.config}"


def test_model_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: afm_2025_device_tiny\noverides: {dim: 8}\n")
    with pytest.raises(mmafm.config.ConfigError, match="'preset' \\(required\\)"):
        mmafm.get_config(str(bad))
    bad.write_text("preset: afm_2025_device_tiny\noverrides: {dim: eight}\n")
    with pytest.raises(mmafm.config.ConfigError, match="key 'dim': expected int"):
        mmafm.get_config(str(bad))
