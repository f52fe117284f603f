"""Typed settings: dataclasses whose fields declare a default, a check and a help line, read from plain mappings (a
YAML file, ``key=value`` overrides, a dict of keyword arguments) and checked strictly.

A strategy declares its hyperparameters with ``setting`` fields; the run's config (``clmtl.config``) is built from
the same pieces. A wrong key or value is a one-line ``ConfigError`` that names the key, where it came from (a file,
an override) and, for a typo, the key that was probably meant. Nothing here knows what a run reads.

A field's name is its key, less the trailing underscore of a Python keyword (``lambda_`` is the key ``lambda``).
A settings dataclass may define two hooks: ``check_keys(data)`` (a static method) returns a problem with its keys
taken together (one excludes another, one needs another), or None; ``shorthand(value)`` (a class method) turns a
value given in place of the section's mapping (a single number for every entry) into that mapping.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import keyword
import operator
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from typing import Any

from clmtl.errors import ConfigError


def rule(test: Callable[[Any], bool], text: str) -> dict[str, Any]:
    """Field metadata: a range/choice check applied after the type check; ``text`` says what is allowed."""
    return {"rule": (test, text)}


def one_of(*choices: str) -> dict[str, Any]:
    return rule(lambda v: v in choices, "must be one of " + ", ".join(choices))


POSITIVE = rule(lambda v: v > 0, "must be > 0")
AT_LEAST_ONE = rule(lambda v: v >= 1, "must be >= 1")
NON_NEGATIVE = rule(lambda v: v >= 0, "must be >= 0")
FRACTION = rule(lambda v: 0 <= v <= 1, "must be between 0 and 1")
PER_EXPERIENCE = rule(lambda v: all(x >= 0 for x in (v if isinstance(v, list) else [v])),
                     "must be >= 0 (a number, or a list of numbers: one per experience)")


def setting(default: Any, check: dict[str, Any] | None = None, help: str = "", search: Sequence[Any] = ()) -> Any:
    """A field of a settings dataclass (a strategy's hyperparameters): its default, its ``rule`` / ``one_of``
    check, a one-line help, and the values hyperparameter selection tries (``search``; empty: the default is kept,
    ``clmtl.studies.tune``). The field's name is its key and the name of the plugin's argument
    (``clmtl.training.registry.register``); a Python keyword takes a trailing underscore (``lambda_`` is the key
    ``lambda``)."""
    return field(default=default, metadata={**(check or {}), "help": help, "search": tuple(search)})


def config_key(name: str) -> str:
    """The key of a settings field: its name, less the trailing underscore of a Python keyword (``lambda_``)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def fields_by_key(cls: type) -> dict[str, dataclasses.Field]:
    """A dataclass's fields by their key (``config_key``)."""
    return {config_key(f.name): f for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------------------------------- checking

class Checker:
    """Checks partial mappings (one file, one override) against settings dataclasses; its errors name ``source``.

    ``root`` is the outermost dataclass: an unknown key with no close sibling is compared with every key under it,
    so a key given at the wrong level (``lr`` for ``train.lr``) is named. A field typed ``dict[...]`` is checked by
    ``mapping``, which a subclass overrides to check the entries (by default any mapping passes).
    """

    def __init__(self, source: str, root: type | None = None) -> None:
        self.source = source
        self.root = root

    def section(self, data: Any, cls: type, path: str = "") -> dict[str, Any]:
        """Check a partial mapping against dataclass ``cls``; returns it with values normalised (int -> float...)."""
        if not isinstance(data, Mapping):
            raise self.error(path or "top level", f"expected a mapping of keys, got {describe(data)}")
        fields = fields_by_key(cls)
        hints = typing.get_type_hints(cls)
        checked = {}
        for key, value in data.items():
            key_path = join(path, key)
            if key not in fields:
                raise self.unknown_key(key_path, list(fields))
            hint = hints[fields[key].name]
            if isinstance(hint, type) and hasattr(hint, "shorthand"):
                value = hint.shorthand(value)
            if typing.get_origin(hint) is dict:
                checked[key] = self.mapping(value, hint, key_path)
                continue
            checked[key] = self.value(value, hint, key_path)
            check = fields[key].metadata.get("rule")
            if check is not None and checked[key] is not None and not check[0](checked[key]):
                raise self.error(key_path, f"{check[1]}, got {describe(checked[key], kind=False)}")
        problem = cls.check_keys(data) if hasattr(cls, "check_keys") else None
        if problem:
            raise ConfigError(f"{self.source}: {path + ': ' if path else ''}{problem}")
        return checked

    def value(self, value: Any, hint: Any, path: str) -> Any:
        """Check ``value`` against a dataclass, a union with one (``str | TaskConfig``, ``X | None``) or a plain
        type."""
        if dataclasses.is_dataclass(hint):
            return self.section(value, hint, path)
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        sections = [option for option in options if dataclasses.is_dataclass(option)]
        if sections and isinstance(value, Mapping):
            return self.section(value, sections[0], path)
        if typing.get_origin(hint) is list and isinstance(value, (list, tuple)):
            (item,) = typing.get_args(hint)
            return [self.value(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        plain = [option for option in options if not dataclasses.is_dataclass(option)]
        if sections and not plain:
            raise self.error(path, f"expected a mapping of keys, got {describe(value)}")
        return check_value(value, functools.reduce(operator.or_, plain) if sections else hint, path, self.source)

    def mapping(self, value: Any, hint: Any, path: str) -> Any:
        """A field typed ``dict[...]``: by default any mapping."""
        return check_value(value, dict, path, self.source)

    def settings(self, params: Any, schema: type | None, path: str) -> dict[str, Any]:
        """One strategy's parameters against its settings dataclass (``ewc:`` with nothing under it: the
        defaults; ``schema`` None: a strategy without hyperparameters)."""
        if params is None:
            return {}
        if schema is None:
            if params:
                raise self.error(path, f"this strategy has no hyperparameters, got {describe(params)}")
            return {}
        return Checker(self.source, self.root).section(params, schema, path)

    def error(self, path: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {problem}")

    def unknown_key(self, key_path: str, siblings: list[str]) -> ConfigError:
        """An unknown key, with the closest sibling or else a same-named key elsewhere under ``root`` (top-level
        ``lr``)."""
        parent, _, key = key_path.rpartition(".")
        close = difflib.get_close_matches(str(key), siblings, n=1)
        if close:
            hint = f"did you mean '{join(parent, close[0])}'?"
        else:
            leaves = {p.rpartition(".")[2]: p for p in reversed(leaf_paths(self.root))} if self.root else {}
            close = difflib.get_close_matches(str(key), list(leaves), n=1)
            hint = f"did you mean '{leaves[close[0]]}'?" if close else "known keys: " + ", ".join(siblings)
        return self.error(key_path, f"unknown key; {hint}")


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping"}


def check_value(value: Any, hint: Any, path: str, source: str) -> Any:
    """Type check one value against ``hint`` (int, float, bool, str, list, list[X], dict, or a union of them)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        options = [option for option in options if option is not type(None)]
        for option in options[:-1]:
            try:
                return check_value(value, option, path, source)
            except ConfigError:
                continue
        hint = options[-1]
    args = typing.get_args(hint)
    base = typing.get_origin(hint) or hint
    if base is float and is_int(value):
        return float(value)
    if base is list and isinstance(value, (list, tuple)):
        return [check_value(item, args[0], f"{path}[{i}]", source) if args else item
                for i, item in enumerate(value)]
    ok = isinstance(value, base) and not (isinstance(value, bool) and base is not bool)
    if not ok:
        expected = _EXPECTED.get(base, base.__name__)
        raise ConfigError(f"{source}: {path}: expected {expected}, got {describe(value)}")
    return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return is_int(value) or isinstance(value, float)


_KIND = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping",
         type(None): "null"}


def describe(value: Any, kind: bool = True) -> str:
    """A value as a message shows it: its YAML kind and a short JSON rendering."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    if not kind or value is None:
        return text
    return f"{_KIND.get(type(value), type(value).__name__)} {text}"


def leaf_paths(cls: type, prefix: str = "") -> list[str]:
    """Every key path under dataclass ``cls`` that holds a value, not a section (``train.lr``)."""
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = join(prefix, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            paths.extend(leaf_paths(hints[f.name], path))
        else:
            paths.append(path)
    return paths


def join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


# --------------------------------------------------------------------------------------------------- building

def merge(target: dict[str, Any], update: Mapping[str, Any]) -> None:
    """``update`` merged into ``target`` in place, section by section (a later layer over an earlier one)."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = plain_copy(value)


def plain_copy(value: Any) -> Any:
    """Deep copy of plain containers, tuples as lists (so a dataclass's ``asdict`` stays YAML-safe)."""
    if isinstance(value, Mapping):
        return {k: plain_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_copy(v) for v in value]
    return value


def build(cls: type, data: Mapping[str, Any]) -> Any:
    """Dataclass ``cls`` from checked ``data`` (by key); nested mappings become the dataclasses their fields name."""
    hints = typing.get_type_hints(cls)
    fields = fields_by_key(cls)
    return cls(**{fields[key].name: _build_value(hints[fields[key].name], value) for key, value in data.items()})


def _build_value(hint: Any, value: Any) -> Any:
    """``value`` (checked) as ``hint`` describes it: mappings become the dataclass the hint names, also in lists."""
    if isinstance(value, Mapping) and typing.get_origin(hint) is not dict:
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        sections = [option for option in options if dataclasses.is_dataclass(option)]
        if sections:
            return build(sections[0], value)
    if isinstance(value, list) and typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return [_build_value(item, v) for v in value]
    return value


# ----------------------------------------------------------------------------------------- strategy settings

def schema_defaults(schema: type | None) -> dict[str, Any]:
    """A settings dataclass's defaults by key (nothing for a strategy without hyperparameters)."""
    if schema is None:
        return {}
    return {key: plain_copy(f.default) for key, f in fields_by_key(schema).items()}


def make_settings(schema: type | None, params: Mapping[str, Any] | None, path: str) -> Any:
    """``params`` (keys, defaults for those missing) checked and built into ``schema`` (None without one); an error
    names ``path`` (``strategy.ewc``), as a config file's would."""
    checked = Checker("strategy parameters", schema).settings(dict(params or {}), schema, path)
    if schema is None:
        return None
    return build(schema, {**schema_defaults(schema), **checked})


def describe_settings(schema: type | None) -> list[dict[str, Any]]:
    """Each setting's key, type, default, check, help and search values, for ``clmtl strategies``."""
    if schema is None:
        return []
    hints = typing.get_type_hints(schema)
    return [{"key": key, "type": _type_name(hints[f.name]), "default": f.default,
             "check": f.metadata["rule"][1] if "rule" in f.metadata else "", "help": f.metadata.get("help", ""),
             "search": f.metadata.get("search", ())}
            for key, f in fields_by_key(schema).items()]


def search_space(schema: type | None) -> dict[str, tuple[Any, ...]]:
    """The values hyperparameter selection tries, by key, for the settings that declare some."""
    return {s["key"]: s["search"] for s in describe_settings(schema) if s["search"]}


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " | ".join(_type_name(option) for option in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
