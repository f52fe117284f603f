"""Strategy registry: names, composition, one typed settings schema per strategy, clear errors."""
import dataclasses
import inspect
import re

import pytest
from clmtl.strategies.ewc import MultiTaskEWCPlugin

from clmtl.errors import ConfigError
from clmtl.settings import setting
from clmtl.training.registry import available, build_plugins, parse_strategy, register, strategy_schemas


@pytest.fixture(autouse=True)
def _isolated(isolated_registry):
    """Every test here registers probes; they disappear after it."""


def test_builtins_are_registered_with_their_defaults():
    names = available()
    assert {"naive", "ewc"} <= set(names)
    assert names["ewc"].defaults == {"lambda": 1000.0, "mode": "separate", "decay": 0.9, "fisher": "empirical",
                                     "fisher_samples": 1, "fisher_max_samples": 0}
    assert strategy_schemas()["naive"] is None  # no hyperparameters


def test_unknown_strategy_lists_what_exists_and_suggests():
    with pytest.raises(ValueError, match=r"unknown strategy 'ewk' — did you mean 'ewc'\?.*available: .*naive"):
        parse_strategy("ewk")


def test_composition_concatenates_plugins_with_overridden_params():
    calls = []

    @register("recorder_for_test")
    def recorder(**arguments):
        """Test plugin."""
        calls.append(arguments)
        return "recorder-plugin"

    plugins = build_plugins("ewc+recorder_for_test+naive", {"ewc": {"lambda": 5.0}})
    assert isinstance(plugins[0], MultiTaskEWCPlugin) and plugins[0].ewc_lambda == 5.0
    assert plugins[1:] == ["recorder-plugin"]
    assert calls == [{}]  # no settings dataclass: no hyperparameters


def test_a_component_named_twice_is_an_error():
    with pytest.raises(ValueError, match="twice"):
        parse_strategy("ewc+ewc")


@pytest.mark.parametrize("name, params, message", [
    ("ewc", {"mode": "sometimes"}, 'strategy.ewc.mode: must be one of separate, online, got "sometimes"'),
    ("ewc", {"lambda": -1}, "strategy.ewc.lambda: must be >= 0, got -1.0"),
    ("ewc", {"fisher_samples": 0}, "strategy.ewc.fisher_samples: must be >= 1, got 0"),
    ("lwf", {"temperature": 0}, "strategy.lwf.temperature: must be > 0, got 0.0"),
    ("replay", {"per_task_cap": 0}, "strategy.replay.per_task_cap: must be >= 1, got 0"),
    ("replay", {"mem_size": 2.5}, "strategy.replay.mem_size: expected an integer, got number 2.5"),
    ("routing", {"s_max": 0.5}, "strategy.routing.s_max: must be >= 1, got 0.5"),
    ("layerlr", {"from_experience": 1.5}, "strategy.layerlr.from_experience: expected an integer, got number 1.5"),
    ("bnfreeze", {"mode": "thaw"}, "strategy.bnfreeze.mode: must be one of freeze, per_task"),
    ("naive", {"x": 1}, "strategy.naive: this strategy has no hyperparameters"),
])
def test_every_schema_checks_its_settings_in_one_line(name, params, message):
    """Each strategy's settings are checked by the config machinery, from Python as from a config file."""
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        build_plugins(name, {name: params})
    assert "\n" not in str(error.value)


def _register_probe(name, acts_on):
    register(name, acts_on=acts_on)(lambda: name)


def test_composition_order_follows_declared_actions_not_spelling():
    _register_probe("probe_loss", ("loss",))
    _register_probe("probe_model", ("model",))
    _register_probe("probe_data", ("data", "loss"))
    expected = ["probe_model", "probe_data", "probe_loss"]
    assert parse_strategy("probe_loss+probe_data+probe_model") == expected
    assert parse_strategy("probe_data+probe_model+probe_loss") == expected
    assert build_plugins("probe_loss+probe_model") == ["probe_model", "probe_loss"]


def test_two_components_taking_over_the_data_clash():
    _register_probe("probe_data_a", ("data",))
    _register_probe("probe_data_b", ("data",))
    with pytest.raises(ValueError, match="cannot compose probe_data_a and probe_data_b: each takes over the data"):
        parse_strategy("probe_data_a+ewc+probe_data_b")


def test_an_unknown_action_is_refused_at_registration():
    with pytest.raises(ValueError, match="unknown actions \\['weights'\\]"):
        register("probe_bad", acts_on=("weights",))


def test_one_registration_style_the_plugin_class_built_with_its_settings_by_name():
    """Every built-in with a plugin class of its own registers that class; only where a setting picks the class
    (bnfreeze) or there is no plugin (naive) is the registered callable a function. Each is built with its settings'
    fields as keyword arguments, so a hyperparameter has one name as settings field and plugin argument."""
    builtins = {name: entry for name, entry in available().items()  # other tests' modules register probes
                if entry.factory.__module__.startswith("clmtl.strategies.")}
    assert {"ewc", "lwf", "replay", "si", "avalanche.GEM"} <= set(builtins)
    assert {name for name, entry in builtins.items() if not inspect.isclass(entry.factory)} == {"bnfreeze", "naive"}
    for name, entry in builtins.items():
        fields = [field.name for field in dataclasses.fields(entry.settings)] if entry.settings else []
        assert set(fields) <= set(inspect.signature(entry.factory).parameters), name
        assert entry.summary, name  # the class's (or function's) first docstring line


def test_ewc_lambda_is_one_name_the_config_key_lambda_and_the_field_and_argument_lambda_():
    """``lambda`` is a Python keyword: the settings field and the plugin's argument are ``lambda_``, the config key
    ``lambda``; there is no other spelling."""
    from clmtl.strategies.ewc import EWCSettings

    assert [field.name for field in dataclasses.fields(EWCSettings)][0] == "lambda_"
    assert list(inspect.signature(MultiTaskEWCPlugin).parameters)[:3] == ["lambda_", "mode", "decay"]
    (plugin,) = build_plugins("ewc", {"ewc": {"lambda": 5.0, "mode": "online", "decay": 0.5}})
    assert (plugin.ewc_lambda, plugin.decay_factor) == (5.0, 0.5)  # Avalanche's names, inside Avalanche's EWCPlugin
    with pytest.raises(ConfigError, match="strategy.ewc.lambda_: unknown key; did you mean 'strategy.ewc.lambda'"):
        build_plugins("ewc", {"ewc": {"lambda_": 5.0}})


def test_a_factory_that_does_not_take_its_settings_by_name_is_refused_at_registration():
    @dataclasses.dataclass(frozen=True)
    class Settings:
        lambda_: float = setting(1.0)
        batch_size: int = setting(4)

    class TakesTheSettingsObject:
        def __init__(self, settings): ...

    with pytest.raises(TypeError, match=r"^strategy 'probe_old': TakesTheSettingsObject is built with its settings as "
                                        r"keyword arguments \(lambda_, batch_size\); it lacks lambda_, batch_size and "
                                        r"it requires settings$"):
        register("probe_old", settings=Settings)(TakesTheSettingsObject)
    with pytest.raises(TypeError, match=r"it lacks batch_size$"):
        register("probe_renamed", settings=Settings)(lambda lambda_, size=1: None)
    with pytest.raises(TypeError, match=r"\(none\); it requires params$"):
        register("probe_no_settings")(lambda params: None)
    register("probe_ok", settings=Settings)(lambda lambda_, batch_size, extra=0: (lambda_, batch_size))
    assert build_plugins("probe_ok", {"probe_ok": {"lambda": 2.0}}) == [(2.0, 4)]


def test_entry_point_plugin_of_an_installed_package_is_found(tmp_path, monkeypatch):
    """A tiny distribution on sys.path declaring the entry point group is discovered by name."""
    import clmtl.training.registry as registry

    (tmp_path / "thirdparty_probe.py").write_text(
        "from clmtl.training.registry import register\n\n"
        "from dataclasses import dataclass\n\nfrom clmtl.settings import setting\n\n"
        "@dataclass\nclass Settings:\n    alpha: float = setting(0.5)\n\n"
        "@register('thirdparty', settings=Settings, acts_on=('loss',))\n"
        "def thirdparty(alpha):\n    '''A strategy from another package.'''\n"
        "    return ('thirdparty', alpha)\n"
    )
    dist_info = tmp_path / "thirdparty_probe-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-probe\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[clmtl.strategies]\nthirdparty = thirdparty_probe\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_discovered", False)

    assert "thirdparty" in available()
    assert build_plugins("ewc+thirdparty", {"thirdparty": {"alpha": 2.0}})[1] == ("thirdparty", 2.0)
