"""Config loading: strict keys, types and ranges, with errors naming file, key and expectation."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from mmafm.config import ConfigError, dump_yaml, from_dict, load_yaml, parse_overrides


@dataclass
class Inner:
    width: int = 8


@dataclass
class Example:
    lr: float = field(default=1e-3, metadata={"min": 0.0})
    steps: int = field(default=10, metadata={"min": 1})
    loss: str = field(default="clip", metadata={"choices": ("clip", "siglip")})
    mode: Literal["a", "b"] = "a"
    window: Optional[int] = None
    shape: tuple[int, int] = (3, 1)
    inner: Inner = field(default_factory=Inner)
    use_bf16: bool = False


def test_defaults_and_valid_values():
    cfg = from_dict(Example, {"lr": 1, "steps": 3, "shape": [5, 2], "inner": {"width": 4}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # int widened to float
    assert cfg.shape == (5, 2) and cfg.inner == Inner(4)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"lrr": 1.0}, "unknown key(s) ['lrr']"),
        ({"steps": "ten"}, "key 'steps': expected int"),
        ({"steps": 2.5}, "key 'steps': expected int"),
        ({"use_bf16": 1}, "key 'use_bf16': expected bool"),
        ({"lr": -1.0}, "key 'lr': expected >= 0.0"),
        ({"steps": 0}, "key 'steps': expected >= 1"),
        ({"loss": "triplet"}, "expected one of ['clip', 'siglip']"),
        ({"mode": "c"}, "expected one of ['a', 'b']"),
        ({"shape": [1, 2, 3]}, "expected 2 items"),
        ({"inner": {"depth": 3}}, "unknown key(s) ['depth']"),
        ({"window": "big"}, "key 'window': expected"),
    ],
)
def test_bad_values_name_the_key(data, expected):
    with pytest.raises(ConfigError) as info:
        from_dict(Example, data, source="my.yaml")
    assert expected in str(info.value)
    assert "my.yaml" in str(info.value)


def test_yaml_roundtrip_and_errors(tmp_path):
    path = tmp_path / "cfg.yaml"
    dump_yaml(Example(steps=7), path)
    assert from_dict(Example, load_yaml(path)).steps == 7
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml(tmp_path / "bad.yaml")


def test_parse_overrides():
    assert parse_overrides(["lr=1e-3", "steps=5", "loss=siglip", "flag=true", "shape=[1, 2]"]) == {
        "lr": 1e-3, "steps": 5, "loss": "siglip", "flag": True, "shape": [1, 2],
    }
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["lr"])
