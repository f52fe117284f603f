"""Reading a config's layers as plain mappings: ``clmtl/default.yaml``, a YAML file, ``KEY=VALUE`` overrides.

Each reader returns the mapping and raises a one-line ``ConfigError`` naming where the text came from (a file's line
and column for invalid YAML). Checking the mappings against the schema is ``clmtl.config``'s job.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from clmtl.errors import ConfigError

DEFAULTS_SOURCE = "clmtl/default.yaml"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.2), not as the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str, source: str, positions: bool = True) -> Any:
    """Parse YAML; an error names the source and, for files (``positions``), the line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if positions and mark is not None else source
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{where}: invalid YAML: {' '.join(problem.split())}") from None


def read_defaults() -> Any:
    """The packaged defaults, ``clmtl/default.yaml``."""
    return load_yaml(resources.files("clmtl").joinpath("default.yaml").read_text(encoding="utf-8"), DEFAULTS_SOURCE)


def read_file(path: Path) -> Any:
    """A YAML config file; an empty file means "all defaults" (an empty mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeError) as error:
        raise ConfigError(f"{path}: cannot read config file: {error}") from None
    data = load_yaml(text, str(path))
    return {} if data is None else data


_OVERRIDE_KEY = re.compile(r"^[\w-]+(\.[\w-]+)*$")


def parse_override(text: str) -> tuple[dict[str, Any], str]:
    """``train.epochs.det=30`` -> ({"train": {"epochs": {"det": 30}}}, source name for messages)."""
    source = f"override '{text}'"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"{source}: expected KEY=VALUE, e.g. train.lr=0.001")
    if not _OVERRIDE_KEY.match(key):
        raise ConfigError(f"{source}: malformed key '{key}'; expected dotted names like train.epochs.det")
    value = load_yaml(raw, source, positions=False)
    for part in reversed(key.split(".")):
        value = {part: value}
    return value, source
