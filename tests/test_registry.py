"""The model registry: every family's presets by name, configs with validated overrides."""

import pytest

import mmafm
from mmafm.config import ConfigError
from mmafm.registry import UnknownModelError


def test_list_models_is_sorted_and_filterable():
    names = mmafm.list_models()
    assert names == sorted(names) and len(names) == len(set(names))
    assert all(n.endswith("_tiny") for n in mmafm.list_models("*_tiny"))


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(UnknownModelError, match="unknown model preset 'no_such_model'"):
        mmafm.create_model("no_such_model")


@pytest.mark.parametrize("name", mmafm.list_models())
def test_get_config_and_overrides(name):
    config = mmafm.get_config(name)
    first = next(iter(vars(config)))
    with pytest.raises(ConfigError, match="unknown key"):
        mmafm.get_config(name, definitely_not_a_field=1)
    again = mmafm.get_config(name, **{first: getattr(config, first)})
    assert again == config


def test_override_type_checked():
    tiny = [n for n in mmafm.list_models("*_tiny")]
    if not tiny:
        pytest.skip("no presets registered yet")
    config = mmafm.get_config(tiny[0])
    int_field = next(k for k, v in vars(config).items() if isinstance(v, int) and not isinstance(v, bool))
    with pytest.raises(ConfigError, match=f"key '{int_field}': expected int"):
        mmafm.get_config(tiny[0], **{int_field: "many"})
