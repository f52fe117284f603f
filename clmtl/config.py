"""Run configuration: the schema of everything a run reads, its defaults, and the one loader that checks a config
strictly.

A typo in a key or a value of the wrong type should stop a run before it trains for an hour, with one line
that names the key, where it came from (file or override) and, for a typo, the key that was probably meant.
Precedence: ``clmtl/default.yaml`` < the ``--config`` file < overrides, in the order given.

The pieces live apart: typed settings and their checking in ``clmtl.settings`` (which a strategy's hyperparameters
use too), reading YAML and overrides in ``clmtl.config_files``, a task's data source in ``clmtl.data.formats``, the
errors in ``clmtl.errors``.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from clmtl.config_files import DEFAULTS_SOURCE, parse_override, read_defaults, read_file
from clmtl.data.files import DetectionFiles, RootFiles
from clmtl.data.formats import FORMAT_KINDS, DataSource
from clmtl.errors import ConfigError

# Names users import from here (a strategy's ``setting`` fields, ``ConfigError``), kept for them; clmtl's own code
# imports them from their homes, ``clmtl.settings``, ``clmtl.errors`` and ``clmtl.data.formats``.
from clmtl.settings import (  # noqa: F401
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    PER_EXPERIENCE,
    POSITIVE,
    Checker,
    build,
    config_key,
    describe,
    describe_settings,
    is_number,
    join,
    make_settings,
    merge,
    one_of,
    rule,
    schema_defaults,
    search_space,
    setting,
)
from clmtl.stream.scenario import SCENARIOS
from clmtl.stream.tasks import TASK_KINDS, kind_name, short_kind
from clmtl.training.registry import strategy_schemas

STREAM_KEYS = ("tasks", "split", "domains")
"""The three ways to describe a stream; a config uses one (a saved config lists the default tasks beside the others)."""
DEFAULT_TASKS = list(TASK_KINDS)

BACKBONE_NAMES = ("yolov8n", "mobilenet_v3_small", "efficientnet_b0")
"""The keys of ``clmtl.models.backbone.BACKBONES`` (a test keeps them equal): listed here so that checking a config
does not import torchvision and ultralytics (5 s) before the first error can be shown."""
CLASSIFIER_NAMES = ("mlp", "reduced_resnet18")
"""``clmtl.models.classifier.CLASSIFIER_BACKBONES``: the papers' classifiers, for classification streams."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""``clmtl.training.precision.PRECISIONS`` (a test keeps them equal), listed here so that a config is checked without
torch."""

_UNIFIED_IMAGE_SIZE = rule(lambda v: v >= 64 and v % 32 == 0, "must be a multiple of 32 and >= 64")
"""The unified model's backbones need three pyramid levels of strides 8 / 16 / 32."""
_TASK_KIND = rule(lambda v: v in TASK_KINDS.values() or v in TASK_KINDS,
                  "must be one of " + ", ".join(TASK_KINDS.values()) + " (or " + ", ".join(TASK_KINDS) + ")")


class PerKind:
    """A setting per task kind (the dataclass fields seg, det, cls); a single number in a file or override sets all."""

    def __getitem__(self, kind: str) -> Any:
        """``epochs["detection"]`` or ``epochs["det"]``: look up by a kind held in a variable."""
        if kind_name(kind) not in TASK_KINDS.values():
            raise KeyError(kind)
        return getattr(self, short_kind(kind))

    @classmethod
    def shorthand(cls, value: Any) -> Any:
        """A single number stands for the same value for every kind."""
        return dict.fromkeys(TASK_KINDS, value) if is_number(value) else value


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
    data: DataSource = field(default_factory=DataSource)
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
SPLIT_SETTINGS = ("overlapped", "disjoint")
"""How a class-incremental segmentation split picks each step's training images (``SplitConfig.setting``)."""


@dataclass
class SplitConfig:
    """A stream generated from one dataset: its classes dealt into ``experiences`` tasks with disjoint class sets.

    ``experiences`` is a number of equal tasks (the remainder to the first ones) or a list of task sizes in classes
    (``[15, 5]``: VOC 15-5). ``class_order`` deals the classes in their label order or shuffled by the run's seed.
    ``setting`` (segmentation) picks each step's training images as the segmentation literature does (Cermelli et
    al. 2020): ``overlapped``, those showing at least one of the step's classes, other classes' pixels background;
    ``disjoint``, of those, only the ones showing no class of a later step. Unset: every image.
    """

    kind: str = field(default="", metadata=_TASK_KIND)
    data: DataSource = field(default_factory=DataSource)
    experiences: int | list[int] = field(default=2, metadata=rule(
        lambda v: (v >= 1) if isinstance(v, int) else (len(v) >= 1 and min(v) >= 1),
        "must be a number of tasks >= 1 or a list of class counts >= 1"))
    class_order: str = field(default="sorted", metadata=one_of(*_CLASS_ORDERS))
    setting: str | None = field(default=None, metadata=one_of(*SPLIT_SETTINGS))

    @staticmethod
    def check_keys(data: Mapping[str, Any]) -> str | None:
        if data.get("setting") is not None and TASK_KINDS.get(data.get("kind"), data.get("kind")) != "segmentation":
            return f"setting {data['setting']!r} is a segmentation split's; this split is {data.get('kind')!r}"
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
    data: DataSource = field(default_factory=DataSource)
    permute: int | None = field(default=None, metadata=AT_LEAST_ONE)
    rotate: list[float] | None = field(default=None, metadata=rule(lambda v: len(v) >= 1, "must list an angle"))

    @staticmethod
    def check_keys(data: Mapping[str, Any]) -> str | None:
        if all(data.get(key) is not None for key in ("permute", "rotate")):
            return "domains take permute: N or rotate: [DEGREES, ...], not both"
        return TaskConfig.check_keys({"name": "domains", "kind": "classification", **data})


@dataclass
class ContinuesConfig:
    """A continued run (``clmtl continue``): its first ``tasks`` tasks are the parent run's, in the folder ``run``;
    it starts from that run's final model and strategy state, evaluates those tasks on their validation data and
    trains the tasks after them only."""

    run: str = ""
    tasks: int = field(default=1, metadata=AT_LEAST_ONE)
    moved: dict[str, str] = field(default_factory=dict)
    """Folders of the parent's data that moved, ``{OLD: NEW}``: a data path of an inherited task that starts with
    ``OLD`` is read under ``NEW`` instead."""


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
    seg: RootFiles = field(default_factory=RootFiles)
    det: DetectionFiles = field(default_factory=DetectionFiles)
    cls: RootFiles = field(default_factory=RootFiles)


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
    continues: ContinuesConfig | None = None
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
    (``clmtl.training.registry.strategy_schemas``).
    """
    if strategies is None:
        strategies = strategy_schemas()
    layers = [(read_defaults(), DEFAULTS_SOURCE)]
    if base is not None:
        layers.append((base, base_source))
    if isinstance(source, Config):
        layers.append((source.to_dict(), "Config"))
    elif isinstance(source, Mapping):
        layers.append((source, "config dict"))
    elif source is not None:
        layers.append((read_file(Path(source)), str(source)))
    layers.extend(parse_override(text) for text in overrides)
    merged: dict[str, Any] = {}
    stream_source: dict[str, str] = {}
    for data, source in layers:
        checked = _ConfigChecker(source, strategies).section(data, Config)
        merge(merged, checked)
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
    config = build(Config, merged)
    if config.data.root is not None:
        config.benchmark = "files"  # the three-dataset bundle is on disk: data.root alone is enough
    sources = [entry.data for entry in config.tasks if isinstance(entry, TaskConfig)]
    sources += [generated.data for generated in (config.split, config.domains) if generated is not None]
    for source in sources:
        problem = DataSource.check_keys(dataclasses.asdict(source))
        if problem:
            raise ConfigError(f"config: {problem}")
    if config.split is not None and not config.split.kind:
        raise ConfigError("config: split: needs kind (classification, segmentation or detection)")
    if config.domains is not None and config.domains.permute is None and config.domains.rotate is None:
        raise ConfigError("config: domains: needs permute: N (tasks) or rotate: [DEGREES, ...]")
    if config.continues is not None and config.data.holdout:
        raise ConfigError("config: data.holdout carves validation data from training data, which a continued run "
                          "does not have for the tasks it inherits; set data.holdout=0")
    return config


class _ConfigChecker(Checker):
    """Checks a config layer; ``strategy`` maps each strategy to its parameters, checked against its settings
    dataclass (``strategies``: name -> dataclass, None for a strategy without hyperparameters)."""

    def __init__(self, source: str, strategies: Mapping[str, type | None]) -> None:
        super().__init__(source, Config)
        self.strategies = strategies

    def mapping(self, value: Any, hint: Any, path: str) -> dict[str, Any]:
        if path != "strategy":
            return super().mapping(value, hint, path)
        if not isinstance(value, Mapping):
            raise self.error(path, f"expected a mapping of strategy names to parameters, got {describe(value)}")
        checked = {}
        for name, params in _dotted_names(value, self.strategies).items():
            name_path = join(path, name)
            if name not in self.strategies:
                known = list(self.strategies)
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = (f"did you mean '{join(path, close[0])}'?" if close
                        else "registered: " + (", ".join(known) or "none"))
                raise self.error(name_path, f"unknown strategy; {hint}")
            checked[name] = self.settings(params, self.strategies[name], name_path)
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
