"""Strategy registry: a name -> an Avalanche plugin class (or a function building one), with its hyperparameters and
defaults.

One registration style: ``@register(name, settings=...)`` on the plugin class itself, which the registry builds with
the settings' fields as keyword arguments, so a hyperparameter has one name as config key, settings field and plugin
argument (``clmtl.settings.setting``). Where no one class fits (the setting picks the class, or there is no plugin), the
decorated callable is a function taking the same keywords.

Built-in strategies live in the package ``clmtl.strategies`` (the folder ``strategies/`` at the repository's root,
mapped by setup.cfg) and register themselves on import;
third-party packages register theirs with the same ``register`` decorator, or through the entry point
group ``clmtl.strategies`` (each entry point names a module to import). ``a+b`` composes strategies by
concatenating their plugins, so hybrids need no code of their own.

Each strategy declares what it acts on (``ACTIONS``). The composer uses that to order plugins the same way
whatever order the user wrote (model changes first, then optimizer, data, loss terms, gradient changes; Avalanche runs
plugin callbacks in list order) and to refuse hybrids in which two plugins would both take over an exclusive part
(two plugins replacing the data a step sees, the optimizer, or the gradient), a clash Avalanche's plugin lists accept
silently.

Each strategy also declares the task kinds it handles (default: every kind). ``check_stream`` refuses, before
training, a strategy on a stream with a task of another kind (Avalanche's own plugins assume class-label targets and
one logits tensor per mini-batch, so they handle classification only); ``clmtl.builders.build_strategy`` calls it.

A strategy can also live in a plain Python file: ``use_strategy_files(paths)`` (``clmtl run --plugin-file PATH``)
imports it; a benchmark's worker processes are handed the same paths with each job (``clmtl.studies.grid``).

A plugin that needs the whole benchmark (``joint`` trains on every task's data) defines
``bind_benchmark(benchmark)``; ``clmtl run`` calls it before training.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import pkgutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from torch.nn import Module
from torch.nn.modules.batchnorm import _BatchNorm

import clmtl.strategies
from clmtl.errors import ConfigError
from clmtl.settings import make_settings, schema_defaults
from clmtl.stream.tasks import KINDS, TASK_KINDS

ENTRY_POINT_GROUP = "clmtl.strategies"

ACTIONS = ("model", "optimizer", "data", "targets", "criterion", "loss", "gradient")
"""What a strategy may act on, in the order the composer applies plugins:
``model`` changes the model or its mode (freezing, gating); ``optimizer`` reconfigures the optimizer or its
learning rates; ``data`` changes what a training step sees (mixes in stored or other tasks' samples);
``targets`` adds to the labels of a step's samples (pseudo-labels), after any samples are mixed in;
``criterion`` replaces the mini-batch's own loss (``Plugin.batch_loss``: ER-ACE's asymmetric cross-entropy, iCaRL's
binary one, MiB's unbiased one); ``loss`` adds a term to the loss; ``gradient`` changes the gradient between the
backward pass and the optimizer step (GEM's projection)."""
EXCLUSIVE_ACTIONS = frozenset({"optimizer", "data", "criterion", "gradient"})
"""Actions at most one component of a hybrid may hold."""

def _has_task_routes(model: Any) -> bool:
    return hasattr(model, "enable_routing")


def _has_pyramid(model: Any) -> bool:
    return isinstance(getattr(model, "backbone", None), Module) and isinstance(getattr(model, "neck", None), Module)


def _has_embeddings(model: Any) -> bool:
    return callable(getattr(model, "embed", None))


def _has_batchnorm(model: Any) -> bool:
    return any(isinstance(module, _BatchNorm) for module in model.modules())


MODEL_NEEDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task_routes": (_has_task_routes, "per-task channel gates on its shared layers (the unified model: "
                                      "model.backbone yolov8n, mobilenet_v3_small or efficientnet_b0)"),
    "batchnorm": (_has_batchnorm, "BatchNorm layers"),
    "pyramid": (_has_pyramid, "a backbone and an FPN neck whose maps a strategy distils (the unified model)"),
    "embeddings": (_has_embeddings, "embed(x, head), the features its classification heads read (the unified model, "
                                    "mlp, reduced_resnet18)"),
}
"""What a strategy may need of the model beyond a ``torch.nn.Module``: a test of the model, and what it names."""

PluginFactory = Callable[..., Any]
"""The plugin class, or a function: called with the strategy's settings as keyword arguments named as the fields of its
settings dataclass (none without one); returns one Avalanche plugin or ``None`` (no plugin)."""


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    factory: PluginFactory
    settings: type | None = None
    """The dataclass of its hyperparameters (``clmtl.settings.setting`` fields), or None: it has none."""
    summary: str = ""
    acts_on: tuple[str, ...] = ()
    kinds: tuple[str, ...] = KINDS
    """The task kinds it handles (full names); a stream with a task of another kind is refused (``check_stream``)."""
    check: Callable[[str, Sequence[Any]], None] | None = None
    """A further condition on the stream, ``check(name, tasks)`` raising ``ConfigError`` (``check_stream``)."""
    needs: tuple[str, ...] = ()
    """What it needs of the model beyond a ``torch.nn.Module`` (keys of ``MODEL_NEEDS``; ``check_model``)."""

    @property
    def defaults(self) -> dict[str, Any]:
        """The hyperparameters' defaults by config key."""
        return schema_defaults(self.settings)

    @property
    def rank(self) -> int:
        """Position in a composed plugin list: that of its earliest action (no action: last)."""
        return min((ACTIONS.index(action) for action in self.acts_on), default=len(ACTIONS))


_REGISTRY: dict[str, StrategyEntry] = {}
_discovered = False


def register(name: str, settings: type | None = None, acts_on: tuple[str, ...] = (), kinds: Sequence[str] = KINDS,
             check: Callable[[str, Sequence[Any]], None] | None = None,
             needs: Sequence[str] = ()) -> Callable[[PluginFactory], PluginFactory]:
    """Decorator registering ``factory`` under ``name``: the plugin class (or a function returning a plugin or None),
    built with the settings' fields as keyword arguments. Its first docstring line is the summary ``clmtl strategies``
    shows.

    ``settings`` is the dataclass of its hyperparameters (config keys ``strategy.<name>.<key>``, each a
    ``clmtl.settings.setting`` with its default, check and help: the one place they are declared and validated); the
    factory must take each field by its name, and need no other argument (checked here, ``TypeError`` otherwise);
    ``acts_on`` lists what its plugin changes, a subset of ``ACTIONS``; ``kinds`` the task kinds it handles (full or
    short names, ``("classification",)`` or ``("cls",)``; default every kind); ``check(name, tasks)`` any further
    condition on the stream's tasks (``clmtl.stream.tasks.TaskSpec``, placed in heads), raising a one-line
    ``ConfigError`` (``clmtl.stream.scenario.require_own_heads`` is one). Both are checked before training
    (``check_stream``). ``needs`` names what its plugin reads of the model beyond a ``torch.nn.Module`` (keys of
    ``MODEL_NEEDS``), checked once the model is built (``check_model``): a strategy reads nothing else of it.
    """
    if settings is not None and not dataclasses.is_dataclass(settings):
        raise TypeError(f"strategy {name!r}: settings must be a dataclass, got {settings!r}")
    unknown = sorted(set(acts_on) - set(ACTIONS))
    if unknown:
        raise ValueError(f"strategy {name!r}: unknown actions {unknown}; expected some of {ACTIONS}")
    if isinstance(kinds, str):
        kinds = (kinds,)
    handled = tuple(dict.fromkeys(TASK_KINDS.get(kind, kind) for kind in kinds))
    unknown = sorted(set(handled) - set(KINDS))
    if unknown or not handled:
        raise ValueError(f"strategy {name!r}: kinds must be some of {KINDS}, got {list(kinds)}")
    unknown = sorted(set(needs) - set(MODEL_NEEDS))
    if unknown:
        raise ValueError(f"strategy {name!r}: unknown needs {unknown}; expected some of {list(MODEL_NEEDS)}")

    def decorator(factory: PluginFactory) -> PluginFactory:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"strategy {name!r} is registered twice")
        _check_arguments(name, factory, settings)
        summary = (factory.__doc__ or "").strip().splitlines()[0] if factory.__doc__ else ""
        _REGISTRY[name] = StrategyEntry(name, factory, settings, summary, tuple(acts_on),
                                        tuple(kind for kind in KINDS if kind in handled), check, tuple(needs))
        return factory

    return decorator


def _check_arguments(name: str, factory: PluginFactory, settings: type | None) -> None:
    """Refuse a factory that does not take each settings field by its name, or that needs another argument."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): the first build will tell
        return
    fields = [field.name for field in dataclasses.fields(settings)] if settings is not None else []
    by_keyword = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
    lacking = [field for field in fields if field not in by_keyword and not any_keyword]
    required = [p.name for p in parameters if p.default is p.empty and p.name not in fields
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if lacking or required:
        problems = ([f"it lacks {', '.join(lacking)}"] if lacking else []) + (
            [f"it requires {', '.join(required)}"] if required else [])
        raise TypeError(f"strategy {name!r}: {getattr(factory, '__name__', factory)} is built with its settings as "
                        f"keyword arguments ({', '.join(fields) or 'none'}); {' and '.join(problems)}")


def settings_arguments(settings: Any) -> dict[str, Any]:
    """A settings dataclass instance as the keyword arguments its strategy's factory is built with (None: none)."""
    if settings is None:
        return {}
    return {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)}


def _discover() -> None:
    """Import the built-in strategy modules and every entry point of the ``clmtl.strategies`` group."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in pkgutil.iter_modules(clmtl.strategies.__path__):
        importlib.import_module(f"clmtl.strategies.{module.name}")
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()


def load_strategy_file(path: str | Path) -> None:
    """Import a Python file whose ``@register`` calls add strategies (once per file)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"strategy file {path} does not exist")
    # the same module name in every process: a dataclass of the file kept in a plugin's state is found again
    name = f"clmtl_strategy_file_{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a file that failed to import is not taken as loaded
        raise


def use_strategy_files(paths: Sequence[str | Path]) -> None:
    """Register the strategies of each file (``--plugin-file``); a missing file is a one-line error."""
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--plugin-file {path}: no such file")
        load_strategy_file(path)


def available() -> dict[str, StrategyEntry]:
    """All registered strategies by name."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def strategy_schemas() -> dict[str, type | None]:
    """The settings dataclass of every registered strategy, which the config checks ``strategy.<name>`` against."""
    return {name: entry.settings for name, entry in available().items()}


def parse_strategy(spec: str) -> list[str]:
    """Split ``a+b+c`` into registered names in composition order; clear errors for unknown names and clashes."""
    registry = available()
    names = [part.strip() for part in spec.split("+")]
    for name in names:
        if name not in registry:
            close = difflib.get_close_matches(name, registry, n=1)
            hint = f" — did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown strategy {name!r}{hint} (available: {', '.join(registry)})")
    if len(set(names)) != len(names):
        raise ValueError(f"strategy {spec!r} names a component twice")
    for action in sorted(EXCLUSIVE_ACTIONS):
        holders = [name for name in names if action in registry[name].acts_on]
        if len(holders) > 1:
            raise ValueError(
                f"strategy {spec!r} cannot compose {' and '.join(holders)}: each takes over the {action} "
                "of a training step, and only one component may"
            )
    return sorted(names, key=lambda name: registry[name].rank)  # stable: ties keep the user's order


def build_plugins(spec: str, params: Mapping[str, Mapping[str, Any]] | None = None) -> list[Any]:
    """Plugins of the (possibly composed) strategy ``spec``, each built from its settings: the defaults overridden by
    ``params[name]`` (config keys), checked as the config checks them."""
    registry = available()
    plugins = []
    for name in parse_strategy(spec):
        entry = registry[name]
        settings = make_settings(entry.settings, (params or {}).get(name), f"strategy.{name}")
        plugin = entry.factory(**settings_arguments(settings))
        if plugin is not None:
            plugins.append(plugin)
    return plugins


def check_stream(spec: str, tasks: Sequence[Any]) -> None:
    """Refuse (one-line ``ConfigError``) a strategy with a component that does not handle the kind of one of
    ``tasks`` (``clmtl.stream.tasks.TaskSpec``) or whose ``check`` refuses them, before anything trains."""
    registry = available()
    for name in parse_strategy(spec):
        entry = registry[name]
        for task in tasks:
            if task.kind not in entry.kinds:
                raise ConfigError(f"strategy {name} handles {' and '.join(entry.kinds)} tasks only; task {task.name!r} "
                                  f"is {task.kind}")
        if entry.check is not None:
            entry.check(name, tasks)


def check_model(spec: str, model: Any) -> None:
    """Refuse (one-line ``ConfigError``) a strategy with a component that needs something the model lacks."""
    registry = available()
    for name in parse_strategy(spec):
        for need in registry[name].needs:
            test, what = MODEL_NEEDS[need]
            if not test(model):
                model_name = getattr(model, "backbone_name", type(model).__name__)
                raise ConfigError(f"strategy {name} needs a model with {what}; this model ({model_name}) has none")
