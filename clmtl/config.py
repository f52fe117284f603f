"""Run configuration: typed defaults, YAML files and ``key=value`` overrides, validated strictly.

A typo in a key or a value of the wrong type should stop a run before it trains for an hour, with one line
that names the key, where it came from (file or override) and, for a typo, the key that was probably meant.
Precedence: ``clmtl/default.yaml`` < the ``--config`` file < overrides, in the order given.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import keyword
import operator
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from clmtl.tasks import TASK_KINDS


SCENARIOS = ("task", "class", "domain")
"""van de Ven & Tolias (2019): task labels at test time (task), none and one growing output space per kind
(class), none and the same classes in every task (domain)."""

STREAM_KEYS = ("tasks", "split", "domains")
"""The three ways to describe a stream; a config uses one (a saved config lists the default tasks beside the others)."""
DEFAULT_TASKS = list(TASK_KINDS)

DATA_FORMATS = ("shapes", "coco", "voc", "folder", "torchvision")
FORMAT_KINDS = {"coco": ("detection",), "voc": ("segmentation",), "folder": ("classification",),
                "torchvision": ("classification",), "shapes": tuple(TASK_KINDS.values())}
"""The task kinds each data format can describe."""
FORMAT_KEYS = {
    "shapes": ("classes", "keep_empty", "train_size", "val_size", "seed"),
    "coco": ("train_images", "train_ann", "val_images", "val_ann", "classes", "keep_empty", "train_size", "val_size"),
    "voc": ("root", "classes", "keep_empty", "train_size", "val_size"),
    "folder": ("root", "classes", "train_size", "val_size"),
    "torchvision": ("dataset", "root", "download", "classes", "train_size", "val_size"),
}
"""The keys each data format reads besides ``format``; a key of another format is a mistake worth reporting."""
FORMAT_REQUIRED = {"shapes": (), "coco": ("train_images", "train_ann", "val_images", "val_ann"), "voc": ("root",),
                   "folder": ("root",), "torchvision": ("dataset", "root")}

BACKBONE_NAMES = ("yolov8n", "mobilenet_v3_small", "efficientnet_b0")
"""The keys of ``clmtl.models.backbone.BACKBONES`` (a test keeps them equal): listed here so that checking a config
does not import torchvision and ultralytics (5 s) before the first error can be shown."""
CLASSIFIER_NAMES = ("mlp", "reduced_resnet18")
"""``clmtl.models.classifier.CLASSIFIER_BACKBONES``: the papers' classifiers, for classification streams."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""``train.precision``: resolved by ``clmtl.precision`` (listed here so that a config is checked without torch)."""

DEFAULTS_SOURCE = "clmtl/default.yaml"


class ConfigError(ValueError):
    """A config file, override or value that clmtl refuses; the message is a single line."""


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
_UNIFIED_IMAGE_SIZE = rule(lambda v: v >= 64 and v % 32 == 0, "must be a multiple of 32 and >= 64")
"""The unified model's backbones need three pyramid levels of strides 8 / 16 / 32."""
_TASK_KIND = rule(lambda v: v in TASK_KINDS.values() or v in TASK_KINDS,
                  "must be one of " + ", ".join(TASK_KINDS.values()) + " (or " + ", ".join(TASK_KINDS) + ")")


def setting(default: Any, check: dict[str, Any] | None = None, help: str = "", search: Sequence[Any] = ()) -> Any:
    """A field of a settings dataclass (a strategy's hyperparameters): its default, its ``rule`` / ``one_of``
    check, a one-line help, and the values hyperparameter selection tries (``search``; empty: the default is kept,
    ``clmtl.tune``). The field's name is its config key and the name of the plugin's argument
    (``clmtl.registry.register``); a Python keyword takes a trailing underscore (``lambda_`` is the key ``lambda``)."""
    return field(default=default, metadata={**(check or {}), "help": help, "search": tuple(search)})


@dataclass
class RootFilesConfig:
    """A dataset under one folder: segmentation in the VOC layout (ImageSets) or one folder per split (``train/``,
    ``val/``); classification as ``root/{train,val}/<class folder>/<image>``."""

    root: str | None = None
    train_size: int | None = field(default=None, metadata=AT_LEAST_ONE)
    val_size: int | None = field(default=None, metadata=AT_LEAST_ONE)


@dataclass
class DetFilesConfig:
    """Detection on disk: COCO images folders and instances JSON files, optionally a class subset by name."""

    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    classes: list[str] | None = None
    keep_empty: bool = True
    train_size: int | None = field(default=None, metadata=AT_LEAST_ONE)
    val_size: int | None = field(default=None, metadata=AT_LEAST_ONE)


def kind_name(kind: str) -> str:
    """The full kind name of ``kind`` given as a full or short name (``cls`` -> ``classification``)."""
    return TASK_KINDS.get(kind, kind)


def short_kind(kind: str) -> str:
    """The short name of a full kind name (``classification`` -> ``cls``)."""
    return {full: short for short, full in TASK_KINDS.items()}[kind_name(kind)]


class PerKind:
    """A setting per task kind (the dataclass fields seg, det, cls); a single number in a file or override sets all."""

    def __getitem__(self, kind: str) -> Any:
        """``epochs["detection"]`` or ``epochs["det"]``: look up by a kind held in a variable."""
        if kind_name(kind) not in TASK_KINDS.values():
            raise KeyError(kind)
        return getattr(self, short_kind(kind))


@dataclass
class EpochsConfig(PerKind):
    """Training epochs per task kind (a task entry's own ``epochs`` overrides it)."""

    seg: int = field(default=15, metadata=NON_NEGATIVE)
    det: int = field(default=25, metadata=NON_NEGATIVE)
    cls: int = field(default=60, metadata=NON_NEGATIVE)


_HUE_TURNS = rule(lambda v: 0 <= v <= 0.5, "must be between 0 and 0.5 (turns of the colour wheel)")


@dataclass
class HueConfig(PerKind):
    """Largest random hue rotation of training images per task kind, in turns (0.5: any hue). None by default: on
    shapes it does not help classification beyond seed noise and costs segmentation and detection much of their score
    (docs/studies.md, Training recipe)."""

    seg: float = field(default=0.0, metadata=_HUE_TURNS)
    det: float = field(default=0.0, metadata=_HUE_TURNS)
    cls: float = field(default=0.0, metadata=_HUE_TURNS)


@dataclass
class DataSourceConfig:
    """Where one task's images come from: a ``format`` and that format's keys (``FORMAT_KEYS``).

    ``classes`` picks a subset by name, in label order (segmentation: the foreground classes; background is always
    label 0). ``keep_empty`` keeps images that show none of the picked classes (segmentation, detection).
    """

    format: str = field(default="shapes", metadata=one_of(*DATA_FORMATS))
    root: str | None = None
    dataset: str | None = None
    download: bool = False
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    classes: list[str] | None = None
    keep_empty: bool = True
    train_size: int | None = field(default=None, metadata=AT_LEAST_ONE)
    val_size: int | None = field(default=None, metadata=AT_LEAST_ONE)
    seed: int | None = field(default=None, metadata=NON_NEGATIVE)

    @staticmethod
    def check_keys(data: Mapping[str, Any]) -> str | None:
        """The keys another format reads, or a required key left out, as a problem (None if fine). A layer without
        ``format`` (an override of one key) is judged once merged (``load_config``)."""
        if "format" not in data:
            return None
        fmt = data["format"]
        if fmt not in FORMAT_KEYS:
            return None  # the format's own check names it
        defaults = DataSourceConfig()
        foreign = [key for key in data if key != "format" and key not in FORMAT_KEYS[fmt]
                   and data[key] != getattr(defaults, key, None)]  # a saved config lists every key at its default
        if foreign:
            return f"{foreign[0]!r} is not a key of format {fmt} (its keys: {', '.join(FORMAT_KEYS[fmt])})"
        missing = [key for key in FORMAT_REQUIRED[fmt] if data.get(key) is None]
        if missing:
            return f"format {fmt} needs {', '.join(missing)}"
        return None


@dataclass
class TransformConfig:
    """A fixed change of every image of a task, training and validation alike: the domain of a domain-shift stream.

    ``permute: N`` shuffles the pixels by the N-th permutation drawn from the run's seed (0: the identity), as
    Permuted MNIST does; ``rotate: DEGREES`` turns the images counter-clockwise (Rotated MNIST).
    """

    permute: int | None = field(default=None, metadata=NON_NEGATIVE)
    rotate: float | None = None

    @staticmethod
    def check_keys(data: Mapping[str, Any]) -> str | None:
        if sum(data.get(key) is not None for key in ("permute", "rotate")) != 1:
            return "a transform is one of permute: N or rotate: DEGREES"
        return None


@dataclass
class TaskConfig:
    """One task of the stream: a unique name, its kind and its data (embedded shapes unless ``data`` says).

    Its training budget is ``epochs`` or ``iterations`` (else ``train.iterations``, else ``train.epochs`` of its kind).
    """

    name: str = ""
    kind: str = field(default="", metadata=_TASK_KIND)
    data: DataSourceConfig = field(default_factory=DataSourceConfig)
    epochs: int | None = field(default=None, metadata=NON_NEGATIVE)
    iterations: int | None = field(default=None, metadata=AT_LEAST_ONE)
    transform: TransformConfig | None = None

    @staticmethod
    def check_keys(data: Mapping[str, Any]) -> str | None:
        missing = [key for key in ("name", "kind") if not data.get(key)]
        if missing:
            return f"a task needs {' and '.join(missing)}"
        if data.get("epochs") is not None and data.get("iterations") is not None:
            return "a task's budget is epochs or iterations, not both"
        fmt = (data.get("data") or {}).get("format", "shapes") if isinstance(data.get("data"), Mapping) else None
        if fmt in FORMAT_KINDS and kind_name(str(data["kind"])) not in FORMAT_KINDS[fmt]:
            return f"format {fmt} holds {' or '.join(FORMAT_KINDS[fmt])} data, not {data['kind']}"
        return None


_CLASS_ORDERS = ("sorted", "seed")


@dataclass
class SplitConfig:
    """A stream generated from one dataset: its classes dealt into ``experiences`` tasks with disjoint class sets.

    ``experiences`` is a number of equal tasks (the remainder to the first ones) or a list of task sizes in classes
    (``[15, 5]``: VOC 15-5). ``class_order`` deals the classes in their label order or shuffled by the run's seed.
    """

    kind: str = field(default="", metadata=_TASK_KIND)
    data: DataSourceConfig = field(default_factory=DataSourceConfig)
    experiences: int | list[int] = field(default=2, metadata=rule(
        lambda v: (v >= 1) if isinstance(v, int) else (len(v) >= 1 and min(v) >= 1),
        "must be a number of tasks >= 1 or a list of class counts >= 1"))
    class_order: str = field(default="sorted", metadata=one_of(*_CLASS_ORDERS))

    @staticmethod
    def check_keys(data: Mapping[str, Any]) -> str | None:
        if "kind" not in data:  # an override of one key (split.data.root=DIR); the merged config must have a kind
            return None
        return TaskConfig.check_keys({"name": "split", **data})


@dataclass
class DomainsConfig:
    """A domain-shift stream generated from one dataset: the same classes in every task, each task's images under its
    own transform (``TransformConfig``). ``permute: N``: N tasks ``perm1`` ... ``permN``, the first one the identity
    and the others pixel permutations drawn from the run's seed (Permuted MNIST); ``rotate: [DEGREES, ...]``: a task
    per angle, ``rot<angle>`` (Rotated MNIST)."""

    kind: str = field(default="classification", metadata=_TASK_KIND)
    data: DataSourceConfig = field(default_factory=DataSourceConfig)
    permute: int | None = field(default=None, metadata=AT_LEAST_ONE)
    rotate: list[float] | None = field(default=None, metadata=rule(lambda v: len(v) >= 1, "must list an angle"))

    @staticmethod
    def check_keys(data: Mapping[str, Any]) -> str | None:
        if all(data.get(key) is not None for key in ("permute", "rotate")):
            return "domains take permute: N or rotate: [DEGREES, ...], not both"
        return TaskConfig.check_keys({"name": "domains", "kind": "classification", **data})


@dataclass
class DataConfig:
    image_size: int = field(default=128, metadata=rule(lambda v: v >= 8, "must be >= 8"))
    channels: int = field(default=3, metadata=rule(lambda v: v in (1, 3), "must be 1 (grey) or 3 (RGB)"))
    train_size: int = field(default=240, metadata=AT_LEAST_ONE)
    val_size: int = field(default=60, metadata=AT_LEAST_ONE)
    num_workers: int = field(default=0, metadata=NON_NEGATIVE)
    hflip: float = field(default=0.5, metadata=FRACTION)
    hue: HueConfig = field(default_factory=HueConfig)
    root: str | None = None
    on_bad_sample: str = field(default="error", metadata=one_of("error", "skip"))
    holdout: float = field(default=0.0, metadata=rule(lambda v: 0 <= v < 1, "must be >= 0 and < 1"))
    seg: RootFilesConfig = field(default_factory=RootFilesConfig)
    det: DetFilesConfig = field(default_factory=DetFilesConfig)
    cls: RootFilesConfig = field(default_factory=RootFilesConfig)


@dataclass
class ModelConfig:
    backbone: str = field(default="yolov8n", metadata=one_of(*BACKBONE_NAMES, *CLASSIFIER_NAMES))
    hidden: list[int] = field(default_factory=lambda: [400, 400], metadata=rule(
        lambda v: all(size >= 1 for size in v), "must list hidden layer sizes >= 1"))
    fpn_channels: int = field(default=64, metadata=AT_LEAST_ONE)
    fpn_smooth: bool = True
    weights: str | None = None


@dataclass
class TrainConfig:
    optimizer: str = field(default="adam", metadata=one_of("adam", "adamw", "sgd"))
    schedule: str = field(default="constant", metadata=one_of("constant", "cosine"))
    warmup: float = field(default=3.0, metadata=NON_NEGATIVE)
    ema: float = field(default=0.999, metadata=rule(lambda v: 0 <= v < 1, "must be >= 0 and < 1 (0 = off)"))
    ema_tau: float = field(default=200.0, metadata=POSITIVE)
    lr: float = field(default=0.002, metadata=POSITIVE)
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)
    clip_grad_norm: float = field(default=0.0, metadata=NON_NEGATIVE)
    batch_size: int = field(default=16, metadata=AT_LEAST_ONE)
    eval_batch_size: int = field(default=32, metadata=AT_LEAST_ONE)
    epochs: EpochsConfig = field(default_factory=EpochsConfig)
    iterations: int | None = field(default=None, metadata=AT_LEAST_ONE)
    reset_optimizer: bool = True
    threads: int | str = field(default="auto", metadata=rule(
        lambda v: v == "auto" or (isinstance(v, int) and v >= 1), "must be auto or a number >= 1"))
    device: str = field(default="auto", metadata=rule(
        lambda v: v in ("auto", "cpu", "cuda", "mps") or v.startswith("cuda:"),
        "must be auto, cpu, cuda, cuda:N or mps"))
    precision: str = field(default="auto", metadata=one_of(*PRECISIONS))
    channels_last: bool = True
    parallel_baselines: bool = True


@dataclass
class EvalConfig:
    score_threshold: float = field(default=0.01, metadata=FRACTION)
    iou_threshold: float = field(default=0.5, metadata=FRACTION)
    max_detections: int = field(default=100, metadata=AT_LEAST_ONE)


@dataclass
class OutputConfig:
    checkpoints: bool = True
    checkpoint_every: int = field(default=0, metadata=NON_NEGATIVE)
    overlays: int = field(default=4, metadata=NON_NEGATIVE)
    tensorboard: bool = False


@dataclass
class Config:
    """Everything a run reads. ``strategy`` maps a strategy name to its parameters (defaults merged in)."""

    benchmark: str = field(default="shapes", metadata=one_of("shapes", "files"))
    seed: int = field(default=0, metadata=NON_NEGATIVE)
    scenario: str = field(default="task", metadata=one_of(*SCENARIOS))
    tasks: list[str | TaskConfig] = field(default_factory=lambda: list(DEFAULT_TASKS), metadata=rule(
        lambda v: len(v) >= 1, "must list at least one task"))
    split: SplitConfig | None = None
    domains: DomainsConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @staticmethod
    def check_keys(data: Mapping[str, Any]) -> str | None:
        """Task names: a string must name a built-in task, and no name may come twice."""
        tasks = data.get("tasks")
        if not isinstance(tasks, list):
            return None
        names = []
        for index, entry in enumerate(tasks):
            if isinstance(entry, str) and entry not in TASK_KINDS:
                return (f"tasks[{index}]: {entry!r} is not a built-in task ({', '.join(TASK_KINDS)}); "
                        "describe other tasks as {name, kind, data}")
            names.append(entry if isinstance(entry, str) else entry.get("name"))
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            return f"tasks: duplicate task name(s) {', '.join(map(str, repeated))}; every task needs its own name"
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON- and YAML-safe) that load_config accepts back as a file."""
        return dataclasses.asdict(self)


def load_config(source: Config | Mapping[str, Any] | str | Path | None = None, overrides: Sequence[str] = (),
                strategies: Mapping[str, type | None] | None = None,
                base: Mapping[str, Any] | None = None, base_source: str = "saved config") -> Config:
    """Defaults, then ``base`` (a saved ``Config.to_dict()``, if any), then ``source`` (a ``Config``, a dict of config
    keys as the YAML file holds them, a YAML file, or None), then each ``key=value`` override, all validated: the one
    loader of ``clmtl run``, ``clmtl.load_config`` and the benchmark scripts.

    ``strategies`` maps each strategy name to its settings dataclass (None: no hyperparameters), which
    ``strategy.<name>.<key>`` values are checked against like any section; by default the registered strategies
    (``clmtl.registry.strategy_schemas``).
    """
    if strategies is None:
        from clmtl.registry import strategy_schemas  # the registry imports this module

        strategies = strategy_schemas()
    layers = [(_read_defaults(), DEFAULTS_SOURCE)]
    if base is not None:
        layers.append((base, base_source))
    if isinstance(source, Config):
        layers.append((source.to_dict(), "Config"))
    elif isinstance(source, Mapping):
        layers.append((source, "config dict"))
    elif source is not None:
        layers.append((_read_file(Path(source)), str(source)))
    layers.extend(_parse_override(text) for text in overrides)
    merged: dict[str, Any] = {}
    stream_source: dict[str, str] = {}
    for data, source in layers:
        checked = _check_section(data, Config, "", source, strategies)
        _deep_merge(merged, checked)
        if source != DEFAULTS_SOURCE:
            stream_source.update({key: source for key in STREAM_KEYS
                                  if checked.get(key) not in (None, DEFAULT_TASKS)})
    generated = [key for key in STREAM_KEYS[1:] if merged.get(key) is not None]
    if len(stream_source) > 1 and generated:
        others = [f"{key} set in {source}" for key, source in stream_source.items() if key != generated[-1]]
        raise ConfigError(f"{stream_source[generated[-1]]}: {generated[-1]}: a stream comes from one of "
                          f"{', '.join(STREAM_KEYS)}, not several ({'; '.join(others)})")
    chosen = merged.get("strategy", {})
    merged["strategy"] = {name: {**schema_defaults(strategies[name]), **params} for name, params in chosen.items()}
    config = _build(Config, merged)
    if config.data.root is not None:
        config.benchmark = "files"  # the three-dataset bundle is on disk: data.root alone is enough
    sources = [entry.data for entry in config.tasks if isinstance(entry, TaskConfig)]
    sources += [generated.data for generated in (config.split, config.domains) if generated is not None]
    for source in sources:
        problem = DataSourceConfig.check_keys(dataclasses.asdict(source))
        if problem:
            raise ConfigError(f"config: {problem}")
    if config.split is not None and not config.split.kind:
        raise ConfigError("config: split: needs kind (classification, segmentation or detection)")
    if config.domains is not None and config.domains.permute is None and config.domains.rotate is None:
        raise ConfigError("config: domains: needs permute: N (tasks) or rotate: [DEGREES, ...]")
    return config



def check_model_input(config: Config) -> None:
    """The unified model's backbones need RGB images whose side is a multiple of 32 (>= 64): checked before a run
    loads its data, unless the run trains a model of the user's own."""
    if config.model.backbone in CLASSIFIER_NAMES:
        return
    size_rule = _UNIFIED_IMAGE_SIZE["rule"]
    if not size_rule[0](config.data.image_size):
        raise ConfigError(f"config: data.image_size: {size_rule[1]} for model.backbone {config.model.backbone}, "
                          f"got {config.data.image_size} (mlp and reduced_resnet18 take any size)")
    if config.data.channels != 3:
        raise ConfigError(f"config: data.channels: model.backbone {config.model.backbone} takes RGB images "
                          "(channels 3); grey images (1) are for mlp and reduced_resnet18")


# ----------------------------------------------------------------------------------------------- reading YAML

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.2), not as the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _load_yaml(text: str, source: str, positions: bool = True) -> Any:
    """Parse YAML; an error names the source and, for files (``positions``), the line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if positions and mark is not None else source
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{where}: invalid YAML: {' '.join(problem.split())}") from None


def _read_defaults() -> Any:
    return _load_yaml(resources.files("clmtl").joinpath("default.yaml").read_text(encoding="utf-8"), DEFAULTS_SOURCE)


def _read_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeError) as error:
        raise ConfigError(f"{path}: cannot read config file: {error}") from None
    data = _load_yaml(text, str(path))
    return {} if data is None else data  # an empty file means "all defaults"


_OVERRIDE_KEY = re.compile(r"^[\w-]+(\.[\w-]+)*$")


def _parse_override(text: str) -> tuple[dict[str, Any], str]:
    """``train.epochs.det=30`` -> ({"train": {"epochs": {"det": 30}}}, source name for messages)."""
    source = f"override '{text}'"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"{source}: expected KEY=VALUE, e.g. train.lr=0.001")
    if not _OVERRIDE_KEY.match(key):
        raise ConfigError(f"{source}: malformed key '{key}'; expected dotted names like train.epochs.det")
    value = _load_yaml(raw, source, positions=False)
    for part in reversed(key.split(".")):
        value = {part: value}
    return value, source


# --------------------------------------------------------------------------------------------------- checking

def _check_section(data: Any, cls: type, path: str, source: str,
                   strategies: Mapping[str, type | None]) -> dict[str, Any]:
    """Check a partial mapping against dataclass ``cls``; returns it with values normalised (int -> float...)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {path or 'top level'}: expected a mapping of keys, got {_describe(data)}")
    fields = _fields_by_key(cls)
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in data.items():
        key_path = _join(path, key)
        if key not in fields:
            raise _unknown_key(source, key_path, list(fields), _leaf_paths(Config))
        hint = hints[fields[key].name]
        if isinstance(hint, type) and issubclass(hint, PerKind) and _is_number(value):
            value = dict.fromkeys(TASK_KINDS, value)
        if typing.get_origin(hint) is dict:
            checked[key] = _check_strategies(value, key_path, source, strategies)
        else:
            checked[key] = _check_any(value, hint, key_path, source, strategies)
            rule = fields[key].metadata.get("rule")
            if rule is not None and checked[key] is not None and not rule[0](checked[key]):
                raise ConfigError(f"{source}: {key_path}: {rule[1]}, got {_describe(checked[key], kind=False)}")
    problem = cls.check_keys(data) if hasattr(cls, "check_keys") else None
    if problem:
        raise ConfigError(f"{source}: {path + ': ' if path else ''}{problem}")
    return checked


def _check_any(value: Any, hint: Any, path: str, source: str, strategies: Mapping[str, type | None]) -> Any:
    """Check ``value`` against a dataclass, a union with one (``str | TaskConfig``, ``X | None``) or a plain type."""
    if dataclasses.is_dataclass(hint):
        return _check_section(value, hint, path, source, strategies)
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
    sections = [option for option in options if dataclasses.is_dataclass(option)]
    if sections and isinstance(value, Mapping):
        return _check_section(value, sections[0], path, source, strategies)
    if typing.get_origin(hint) is list and isinstance(value, (list, tuple)):
        (item,) = typing.get_args(hint)
        return [_check_any(v, item, f"{path}[{i}]", source, strategies) for i, v in enumerate(value)]
    plain = [option for option in options if not dataclasses.is_dataclass(option)]
    if sections and not plain:
        raise ConfigError(f"{source}: {path}: expected a mapping of keys, got {_describe(value)}")
    return _check_value(value, functools.reduce(operator.or_, plain) if sections else hint, path, source)


def _check_strategies(data: Any, path: str, source: str,
                      strategies: Mapping[str, type | None]) -> dict[str, dict[str, Any]]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {path}: expected a mapping of strategy names to parameters, "
                          f"got {_describe(data)}")
    checked = {}
    for name, params in _dotted_names(data, strategies).items():
        name_path = _join(path, name)
        if name not in strategies:
            known = list(strategies)
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = (f"did you mean '{_join(path, close[0])}'?" if close
                    else "registered: " + (", ".join(known) or "none"))
            raise ConfigError(f"{source}: {name_path}: unknown strategy; {hint}")
        checked[name] = _check_settings(params, strategies[name], name_path, source)
    return checked


def _dotted_names(data: Mapping[str, Any], strategies: Mapping[str, type | None]) -> dict[str, Any]:
    """``data`` with strategies whose names hold dots (``avalanche.GEM``) under their full name: the override
    ``strategy.avalanche.GEM.memory_strength=1`` nests ``{"avalanche": {"GEM": {...}}}``, which YAML may also write."""
    flat = {}
    for name, params in data.items():
        prefix = f"{name}."
        if name not in strategies and isinstance(params, Mapping) and any(s.startswith(prefix) for s in strategies):
            nested = _dotted_names({prefix + str(key): value for key, value in params.items()}, strategies)
            flat.update(nested)
        else:
            flat[name] = params
    return flat


def _check_settings(params: Any, schema: type | None, path: str, source: str) -> dict[str, Any]:
    """One strategy's parameters against its settings dataclass (``ewc:`` with nothing under it: the defaults)."""
    if params is None:
        return {}
    if schema is None:
        if params:
            raise ConfigError(f"{source}: {path}: this strategy has no hyperparameters, got {_describe(params)}")
        return {}
    return _check_section(params, schema, path, source, {})


def config_key(name: str) -> str:
    """The config key of a settings field: its name, less the trailing underscore of a Python keyword (``lambda_``)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _fields_by_key(cls: type) -> dict[str, dataclasses.Field]:
    """A dataclass's fields by their config key (``config_key``)."""
    return {config_key(f.name): f for f in dataclasses.fields(cls)}


def schema_defaults(schema: type | None) -> dict[str, Any]:
    """A settings dataclass's defaults by config key (nothing for a strategy without hyperparameters)."""
    if schema is None:
        return {}
    return {key: _copy(f.default) for key, f in _fields_by_key(schema).items()}


def make_settings(schema: type | None, params: Mapping[str, Any] | None, path: str) -> Any:
    """``params`` (config keys, defaults for those missing) checked and built into ``schema`` (None without one);
    an error names ``path`` (``strategy.ewc``), as a config file's would."""
    checked = _check_settings(dict(params or {}), schema, path, "strategy parameters")
    if schema is None:
        return None
    return _build(schema, {**schema_defaults(schema), **checked})


def describe_settings(schema: type | None) -> list[dict[str, Any]]:
    """Each setting's key, type, default, check, help and search values, for ``clmtl strategies``."""
    if schema is None:
        return []
    hints = typing.get_type_hints(schema)
    return [{"key": key, "type": _type_name(hints[f.name]), "default": f.default,
             "check": f.metadata["rule"][1] if "rule" in f.metadata else "", "help": f.metadata.get("help", ""),
             "search": f.metadata.get("search", ())}
            for key, f in _fields_by_key(schema).items()]


def search_space(schema: type | None) -> dict[str, tuple[Any, ...]]:
    """The values hyperparameter selection tries, by config key, for the settings that declare some."""
    return {s["key"]: s["search"] for s in describe_settings(schema) if s["search"]}


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " | ".join(_type_name(option) for option in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping"}


def _check_value(value: Any, hint: Any, path: str, source: str) -> Any:
    """Type check one value against ``hint`` (int, float, bool, str, list, list[X], dict, or a union of them)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        options = [option for option in options if option is not type(None)]
        for option in options[:-1]:
            try:
                return _check_value(value, option, path, source)
            except ConfigError:
                continue
        hint = options[-1]
    args = typing.get_args(hint)
    base = typing.get_origin(hint) or hint
    if base is float and _is_int(value):
        return float(value)
    if base is list and isinstance(value, (list, tuple)):
        return [_check_value(item, args[0], f"{path}[{i}]", source) if args else item
                for i, item in enumerate(value)]
    ok = isinstance(value, base) and not (isinstance(value, bool) and base is not bool)
    if not ok:
        expected = _EXPECTED.get(base, base.__name__)
        raise ConfigError(f"{source}: {path}: expected {expected}, got {_describe(value)}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


_KIND = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping",
         type(None): "null"}


def _describe(value: Any, kind: bool = True) -> str:
    """A value as a message shows it: its YAML kind and a short JSON rendering."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    if not kind or value is None:
        return text
    return f"{_KIND.get(type(value), type(value).__name__)} {text}"


def _unknown_key(source: str, key_path: str, siblings: list[str], all_paths: Sequence[str]) -> ConfigError:
    """An unknown key, with the closest sibling or else a same-named key elsewhere (top-level ``lr``)."""
    parent, _, key = key_path.rpartition(".")
    close = difflib.get_close_matches(str(key), siblings, n=1)
    if close:
        hint = f"did you mean '{_join(parent, close[0])}'?"
    else:
        leaves = {p.rpartition(".")[2]: p for p in reversed(all_paths)}
        close = difflib.get_close_matches(str(key), list(leaves), n=1)
        hint = f"did you mean '{leaves[close[0]]}'?" if close else "known keys: " + ", ".join(siblings)
    return ConfigError(f"{source}: {key_path}: unknown key; {hint}")


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = _join(prefix, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            paths.extend(_leaf_paths(hints[f.name], path))
        else:
            paths.append(path)
    return paths


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


# --------------------------------------------------------------------------------------------------- building

def _deep_merge(target: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = _copy(value)


def _copy(value: Any) -> Any:
    """Deep copy of plain containers, tuples as lists (so to_dict stays YAML-safe)."""
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


def _build(cls: type, data: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = _fields_by_key(cls)
    return cls(**{fields[key].name: _build_value(hints[fields[key].name], value) for key, value in data.items()})


def _build_value(hint: Any, value: Any) -> Any:
    """``value`` (checked) as ``hint`` describes it: mappings become the dataclass the hint names, also in lists."""
    if isinstance(value, Mapping) and typing.get_origin(hint) is not dict:
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        sections = [option for option in options if dataclasses.is_dataclass(option)]
        if sections:
            return _build(sections[0], value)
    if isinstance(value, list) and typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return [_build_value(item, v) for v in value]
    return value
