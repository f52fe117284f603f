"""The configured stream as one Avalanche benchmark: task entries -> task datasets -> scenario -> experiences.

A stream is ``tasks:`` (built-in shapes tasks ``seg``, ``det``, ``cls`` and ``{name, kind, data}`` entries, any
number, kinds may repeat) or ``split:`` (one dataset's classes dealt into tasks with disjoint class sets). Each
task's data is loaded in the task's own labels (``clmtl.data.sources``), the scenario places every task in a head of
the model (``clmtl.stream.scenario``), and ``clmtl.stream.experiences`` makes the experiences.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from clmtl.config import Config, DomainsConfig, SplitConfig, TaskConfig, TransformConfig
from clmtl.data.formats import DataSource
from clmtl.data.domains import DomainShifted
from clmtl.data.files import files_sources
from clmtl.data.holdout import carve
from clmtl.data.relabel import Relabelled
from clmtl.data.sources import LoadOptions, TaskData, load_task, source_classes
from clmtl.data.transforms import train_augmentation
from clmtl.errors import ConfigError, DataError
from clmtl.stream.experiences import build_stream
from clmtl.stream.scenario import plan_stream
from clmtl.stream.tasks import CLASSIFICATION, TASK_KINDS, TaskSpec, kind_name, short_kind


@dataclass
class Benchmark:
    """The stream plus the task descriptions it holds, their training epochs and the raw validation datasets."""

    tasks: list[TaskSpec]
    stream: Any  # avalanche CLScenario with train_stream / test_stream
    val_sets: list[Dataset]
    """Validation datasets in task order, in head labels (real-format ones know each sample's file: ``meta(i)``)."""
    epochs: list[int]
    """Training epochs of each task: its entry's ``epochs``, else ``train.epochs`` of its kind."""
    name: str
    """What results call the stream (``benchmark_name``; ``avalanche`` for a user's Avalanche benchmark)."""
    scenario: str
    """``task``, ``class`` or ``domain``: how the tasks share the model's heads (``clmtl.stream.scenario``)."""
    held_out: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """With ``data.holdout``: each task's training samples evaluated on instead of trained on (``val_sets``)."""
    iterations: list[int | None] = dataclasses.field(default_factory=list)
    """Training iterations of each task, where its budget counts them instead of epochs (``Benchmark.budget``)."""
    fixed_samples: bool = False
    """Every training sample is the same each time it is read (classification, no random augmentation): training may
    read an experience into memory once (``MultiTaskTemplate(preload=)``)."""
    inherited: int = 0
    """A continued run's first tasks, its parent's: evaluated, never trained. Their training experiences hold their
    validation data in place of training data, which the run does not read (an Avalanche experience cannot be
    empty); a plugin that reads every experience's training data refuses such a stream."""

    def budget(self, label: int) -> tuple[int, int | None]:
        """Task ``label``'s training budget as ``MultiTaskTemplate.train_for`` takes it: (epochs, iterations)."""
        iterations = self.iterations[label] if label < len(self.iterations) else None
        return self.epochs[label], iterations


def build_benchmark(config: Config) -> Benchmark:
    """The configured stream as one Avalanche benchmark; the same config and seed always give the same data."""
    entries = task_entries(config)
    data = config.data
    options = load_options(config)
    inherited = config.continues.tasks if config.continues is not None else 0  # evaluated only: no training data
    loaded = [shifted(load_inherited(entry, options) if index < inherited else
                      load_task(entry.name, kind_name(entry.kind), entry.data, options), entry, config.seed)
              for index, entry in enumerate(entries)]
    positional = config.split is not None and config.scenario == "domain"
    tasks = plan_stream([task_data.task for task_data in loaded], config.scenario, positional)
    train = [in_head_labels(task_data.train, task) for task_data, task in zip(loaded, tasks)]
    val = [in_head_labels(task_data.val, task) for task_data, task in zip(loaded, tasks)]
    held_out = {}
    if data.holdout:
        train, val = map(list, zip(*(carve(dataset, data.holdout, config.seed, i) for i, dataset in enumerate(train))))
        held_out = {task.name: part.indices for task, part in zip(tasks, val)}
    augmented = [train_augmentation(ds, t.kind, data.hflip, data.hue[t.kind]) for ds, t in zip(train, tasks)]
    epochs, iterations = zip(*(task_budget(entry, config) for entry in entries))
    fixed = all(ds is plain for ds, plain in zip(augmented, train)) and all(t.kind == CLASSIFICATION for t in tasks)
    return Benchmark(tasks, build_stream(tasks, augmented, val), val, list(epochs), benchmark_name(config),
                     config.scenario, held_out, list(iterations), fixed, inherited)


def load_options(config: Config) -> LoadOptions:
    """How the config's tasks are read: their size, channels, seed, sample counts and what a bad sample does."""
    data = config.data
    return LoadOptions(data.image_size, config.seed, data.on_bad_sample, data.channels, data.train_size, data.val_size)


def load_inherited(entry: TaskConfig, options: LoadOptions) -> TaskData:
    """A task a continued run inherits from its parent: its validation data only, with a way out if it moved."""
    try:
        return load_task(entry.name, kind_name(entry.kind), entry.data, options, train=False)
    except (ConfigError, DataError) as error:
        raise type(error)(f"{error} (a task of the parent run: if its data moved, continue with "
                          "continues.moved='{OLD_FOLDER: NEW_FOLDER}')") from None


def task_budget(entry: TaskConfig, config: Config) -> tuple[int, int | None]:
    """(epochs, iterations) of a task: its entry's epochs or iterations, else ``train.iterations``, else
    ``train.epochs`` of its kind; iterations, where set, end the training (the epochs then only bound it)."""
    if entry.epochs is not None:
        return entry.epochs, None
    iterations = entry.iterations if entry.iterations is not None else config.train.iterations
    return config.train.epochs[entry.kind], iterations


def shifted(task_data: TaskData, entry: TaskConfig, seed: int) -> TaskData:
    """The task with its entry's domain shift (``transform``) applied to every image, and recorded in its spec."""
    transform = entry.transform
    if transform is None:
        return task_data
    if task_data.task.kind != CLASSIFICATION:
        raise ConfigError(f"task {entry.name!r}: transform applies to classification tasks; a {task_data.task.kind} "
                          "task's label maps or boxes would need the same change")
    if transform.permute is not None:
        shift, record = {"permute": transform.permute}, {"permute": transform.permute, "seed": seed}
    else:
        shift = record = {"rotate": transform.rotate}
    return TaskData(dataclasses.replace(task_data.task, transform=record),
                    DomainShifted(task_data.train, seed, **shift), DomainShifted(task_data.val, seed, **shift))


def in_head_labels(dataset: Dataset, task: TaskSpec) -> Dataset:
    """``dataset`` (in the task's own labels) labelled as the task's head counts its classes."""
    if task.labels == tuple(range(len(task.classes))):
        return dataset
    return Relabelled(dataset, task.kind, dict(enumerate(task.labels)))


def task_entries(config: Config) -> list[TaskConfig]:
    """The stream's tasks as full entries: built-in names resolved (shapes, or the ``files`` datasets), or the
    tasks a ``split:`` deals."""
    if config.split is not None:
        return split_entries(config.split, config.seed)
    if config.domains is not None:
        return domain_entries(config.domains)
    sources = None
    if config.benchmark == "files":
        sources = files_sources(config.data.root, config.data.seg, config.data.det, config.data.cls)
    entries = []
    for entry in config.tasks:
        if isinstance(entry, str):
            data = sources[entry]() if sources is not None else TaskConfig().data
            entry = TaskConfig(name=entry, kind=TASK_KINDS[entry], data=data)
        entries.append(entry)
    return entries


def split_entries(split: SplitConfig, seed: int) -> list[TaskConfig]:
    """The tasks of a ``split:``: its data's classes, in label order or shuffled by ``seed``, dealt into
    ``experiences`` tasks named ``<kind><n>`` (``cls1``, ``cls2``...), each with its classes as a subset."""
    kind = kind_name(split.kind)
    classes = list(source_classes(kind, split.data))
    if split.class_order == "seed":
        classes = [classes[i] for i in torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))]
    sizes = split.experiences
    if isinstance(sizes, int):
        if sizes > len(classes):
            raise ConfigError(f"split: {sizes} experiences, but the data has {len(classes)} classes "
                              f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}); each task "
                              "needs at least one")
        share, extra = divmod(len(classes), sizes)
        sizes = [share + (i < extra) for i in range(sizes)]
    elif sum(sizes) != len(classes):
        raise ConfigError(f"split: experiences {sizes} deal {sum(sizes)} classes, but the data has {len(classes)}")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [TaskConfig(name=f"{short_kind(kind)}{i + 1}", kind=kind,
                       data=step_data(split, classes[start:start + size], classes[start + size:]))
            for i, (start, size) in enumerate(zip(starts, sizes))]


def step_data(split: SplitConfig, own: list[str], later: list[str]) -> DataSource:
    """One step's data: its classes, and the training images its ``setting`` shows (``SplitConfig``)."""
    if split.setting is None:
        return dataclasses.replace(split.data, classes=own)
    exclude = later if split.setting == "disjoint" and later else None
    return dataclasses.replace(split.data, classes=own, keep_empty=False, exclude=exclude)


def domain_entries(domains: DomainsConfig) -> list[TaskConfig]:
    """The tasks of a ``domains:`` stream: the same data and classes, a transform each (``perm1`` the identity, then
    ``perm2`` ...; or ``rot<angle>``)."""
    kind = kind_name(domains.kind)
    if domains.permute is not None:
        return [TaskConfig(name=f"perm{index + 1}", kind=kind, data=domains.data,
                           transform=TransformConfig(permute=index)) for index in range(domains.permute)]
    return [TaskConfig(name=f"rot{angle:g}", kind=kind, data=domains.data, transform=TransformConfig(rotate=angle))
            for angle in domains.rotate]


def benchmark_name(config: Config) -> str:
    """What results and default output folders call the stream: ``shapes`` or ``files`` for the built-in tasks,
    else the data formats it reads (``folder``, ``shapes+torchvision``...)."""
    generated = config.split or config.domains
    entries = config.tasks if generated is None else [generated]
    if all(isinstance(entry, str) for entry in entries):
        return config.benchmark
    formats = dict.fromkeys("shapes" if isinstance(e, str) and config.benchmark == "shapes" else
                            "files" if isinstance(e, str) else e.data.format for e in entries)
    return "+".join(formats)
