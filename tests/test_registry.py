"""Strategy registry: names, composition, clear errors."""
import pytest

from clmtl.registry import available, build_plugins, parse_strategy, register, strategy_defaults
from strategies.ewc import MultiTaskEWCPlugin


def test_builtins_are_registered_with_their_defaults():
    names = available()
    assert {"naive", "ewc"} <= set(names)
    assert strategy_defaults()["ewc"] == {"lambda": 1000.0, "mode": "separate", "decay": 0.9, "fisher": "empirical"}


def test_unknown_strategy_lists_what_exists_and_suggests():
    with pytest.raises(ValueError, match=r"unknown strategy 'ewk' — did you mean 'ewc'\?.*available: .*naive"):
        parse_strategy("ewk")


def test_composition_concatenates_plugins_with_overridden_params():
    calls = []

    @register("recorder_for_test")
    def recorder(params):
        """Test plugin."""
        calls.append(params)
        return "recorder-plugin"

    plugins = build_plugins("ewc+recorder_for_test+naive", {"ewc": {"lambda": 5.0}})
    assert isinstance(plugins[0], MultiTaskEWCPlugin) and plugins[0].ewc_lambda == 5.0
    assert plugins[1:] == ["recorder-plugin"]
    assert calls == [{}]


def test_a_component_named_twice_is_an_error():
    with pytest.raises(ValueError, match="twice"):
        parse_strategy("ewc+ewc")


def test_ewc_rejects_a_bad_mode():
    with pytest.raises(ValueError, match="strategy.ewc.mode"):
        build_plugins("ewc", {"ewc": {"mode": "sometimes"}})
