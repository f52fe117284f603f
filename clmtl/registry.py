"""Strategy registry: a name -> a factory of Avalanche plugins, with its hyperparameters and defaults.

Built-in strategies live in the top-level ``strategies`` package and register themselves on import;
third-party packages register theirs with the same ``register`` decorator, or through the entry point
group ``clmtl.strategies`` (each entry point names a module to import). ``a+b`` composes strategies by
concatenating their plugins, so hybrids need no code of their own.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "clmtl.strategies"

PluginFactory = Callable[[dict[str, Any]], Any]
"""Takes the resolved hyperparameters, returns one Avalanche plugin or ``None`` (no plugin)."""


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    factory: PluginFactory
    defaults: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""


_REGISTRY: dict[str, StrategyEntry] = {}
_discovered = False


def register(name: str, defaults: Mapping[str, Any] | None = None) -> Callable[[PluginFactory], PluginFactory]:
    """Decorator registering ``factory`` under ``name``; ``defaults`` are its hyperparameters (config keys)."""

    def decorator(factory: PluginFactory) -> PluginFactory:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"strategy {name!r} is registered twice")
        summary = (factory.__doc__ or "").strip().splitlines()[0] if factory.__doc__ else ""
        _REGISTRY[name] = StrategyEntry(name, factory, dict(defaults or {}), summary)
        return factory

    return decorator


def _discover() -> None:
    """Import the built-in strategy modules and every entry point of the ``clmtl.strategies`` group."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import strategies

    for module in pkgutil.iter_modules(strategies.__path__):
        importlib.import_module(f"strategies.{module.name}")
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()


def available() -> dict[str, StrategyEntry]:
    """All registered strategies by name."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def strategy_defaults() -> dict[str, dict[str, Any]]:
    """Hyperparameter defaults of every registered strategy, as the config validates them."""
    return {name: dict(entry.defaults) for name, entry in available().items()}


def parse_strategy(spec: str) -> list[str]:
    """Split ``a+b+c`` into registered names, with a clear error listing what exists."""
    registry = available()
    names = [part.strip() for part in spec.split("+")]
    for name in names:
        if name not in registry:
            close = difflib.get_close_matches(name, registry, n=1)
            hint = f" — did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown strategy {name!r}{hint} (available: {', '.join(registry)})")
    if len(set(names)) != len(names):
        raise ValueError(f"strategy {spec!r} names a component twice")
    return names


def build_plugins(spec: str, params: Mapping[str, Mapping[str, Any]] | None = None) -> list[Any]:
    """Plugins of the (possibly composed) strategy ``spec``, each built with its defaults overridden by ``params``."""
    registry = available()
    plugins = []
    for name in parse_strategy(spec):
        entry = registry[name]
        resolved = {**entry.defaults, **dict((params or {}).get(name, {}))}
        plugin = entry.factory(resolved)
        if plugin is not None:
            plugins.append(plugin)
    return plugins
