"""Where a task's images come from: one loader per data format, all returning the task in its own label order.

A task's ``data`` names a format and that format's keys (``clmtl.data.formats.FORMAT_KEYS``):

- ``shapes``: the embedded synthetic benchmark (``clmtl.data.shapes``), any kind;
- ``coco``: COCO instances JSON + image folders (``clmtl.data.coco``), detection;
- ``voc``: VOC-style PNG masks (``clmtl.data.voc``), segmentation;
- ``folder``: ``root/{train,val}/<class>/<image>`` (``clmtl.data.folder``), classification;
- ``torchvision``: MNIST, FashionMNIST, CIFAR10, CIFAR100 or SVHN from a local folder
  (``clmtl.data.torchvision_sets``), classification.

``classes`` keeps a subset of the data's classes by name, in label order (``clmtl.data.relabel`` says what happens
to the others); ``train_size`` / ``val_size`` draw that many samples with the run's seed, after the subset.

A task a continued run inherits from its parent is only evaluated: ``load_task(..., train=False)`` reads its
validation data alone, so its training files may be gone.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch.utils.data import Dataset

from clmtl.data.coco import CocoDetection, category_names
from clmtl.data.folder import ImageFolderDataset, class_names
from clmtl.data.formats import DataSource
from clmtl.data.images import check_class_names
from clmtl.data.relabel import Relabelled
from clmtl.data.shapes import SHAPES_CLASSES, make_shapes_dataset
from clmtl.data.torchvision_sets import TorchvisionClassification, torchvision_classes
from clmtl.data.voc import VOC_CLASSES, VocSegmentation
from clmtl.errors import ConfigError, DataError
from clmtl.stream.tasks import CLASSIFICATION, SEGMENTATION, TaskSpec

SPLITS = ("train", "val")


@dataclass(frozen=True)
class LoadOptions:
    """What every loader reads besides the task's own ``data``: the run's image side, seed and sample policy, and
    the shapes sizes a shapes task takes unless it sets its own."""

    image_size: int
    seed: int
    on_bad_sample: str = "error"
    channels: int = 3
    shapes_train_size: int = 240
    shapes_val_size: int = 60
    splits: tuple[str, ...] = SPLITS
    """The splits to read; a loader returns None for the others."""


@dataclass
class TaskData:
    """One task: its description (its own classes, labels 0, 1, ...) and its train and validation datasets."""

    task: TaskSpec
    train: Dataset
    val: Dataset


def load_task(name: str, kind: str, source: DataSource, options: LoadOptions, train: bool = True) -> TaskData:
    """Task ``name`` of ``kind`` from ``source``, with the class subset and sizes it asks for; ``train=False`` reads
    the validation data only, which then stands in for the training data too (a task evaluated, never trained)."""
    loader = {"shapes": _shapes, "coco": _coco, "voc": _voc, "folder": _folder, "torchvision": _torchvision}
    options = options if train else replace(options, splits=("val",))
    try:
        splits, classes, category_ids = loader[source.format](kind, source, options)
    except (ConfigError, DataError) as error:  # say which task, the stream may read several files
        raise type(error)(f"task {name!r}: {error}") from None
    val = splits["val"]
    return TaskData(TaskSpec(name, kind, classes, category_ids), splits.get("train", val), val)


def source_classes(kind: str, source: DataSource) -> tuple[str, ...]:
    """The classes a ``split:`` deals into tasks: ``source.classes`` if given, else every class of the data
    (segmentation: the foreground classes; background belongs to every task)."""
    if source.classes is not None:
        return tuple(source.classes)
    if source.format == "shapes":
        return SHAPES_CLASSES[kind][1:] if kind == SEGMENTATION else SHAPES_CLASSES[kind]
    if source.format == "voc":
        return VOC_CLASSES[1:]
    if source.format == "coco":
        return category_names(_existing(source.train_ann, "train_ann"))
    if source.format == "folder":
        return class_names(_existing(source.root, "root"), "train")
    return torchvision_classes(source.dataset, _existing(source.root, "root"), source.download)


def _sizes(source: DataSource) -> dict[str, int | None]:
    return {"train": source.train_size, "val": source.val_size}


def _shapes(kind: str, source: DataSource, options: LoadOptions):
    _check_exclude(source)
    seed = options.seed if source.seed is None else source.seed
    sizes = {"train": source.train_size or options.shapes_train_size, "val": source.val_size or options.shapes_val_size}
    own = SHAPES_CLASSES[kind][1:] if kind == SEGMENTATION else SHAPES_CLASSES[kind]
    if source.classes is not None:
        check_class_names(source.classes, own, f"shapes {kind}")
    if kind == CLASSIFICATION:
        picked = tuple(source.classes) if source.classes is not None else None
        splits = {split: make_shapes_dataset(kind, split, sizes[split], options.image_size, seed, picked)
                  for split in options.splits}
        return splits, splits["val"].classes, None
    splits = {split: make_shapes_dataset(kind, split, sizes[split], options.image_size, seed)
              for split in options.splits}
    if source.classes is None:
        return splits, splits["val"].classes, None
    classes, mapping = _subset(kind, SHAPES_CLASSES[kind], source.classes)
    return {split: Relabelled(ds, kind, mapping, source.keep_empty,
                              exclude=_excluded(source, split, SHAPES_CLASSES[kind]))
            for split, ds in splits.items()}, classes, None


def _check_exclude(source: DataSource) -> None:
    if source.exclude and source.classes is None:
        raise ConfigError("data.exclude drops images of classes outside the task's; it needs data.classes")


def _excluded(source: DataSource, split: str, all_classes: Sequence[str]) -> list[int]:
    """The labels whose images a split drops: ``exclude``'s classes, in the training split only (evaluation keeps
    every image of a task's classes)."""
    if split != "train" or not source.exclude:
        return []
    check_class_names(source.exclude, all_classes, "exclude")
    return [all_classes.index(name) for name in source.exclude]


def _subset(kind: str, all_classes: Sequence[str], picked: Sequence[str]) -> tuple[tuple[str, ...], dict[int, int]]:
    """The task's classes and the mapping from the data's labels to the task's, for a subset picked by name."""
    offset = 1 if kind == SEGMENTATION else 0  # segmentation keeps background as label 0
    classes = (*all_classes[:offset], *picked)
    return classes, {all_classes.index(name): label for label, name in enumerate(classes)}


def _coco(kind: str, source: DataSource, options: LoadOptions):
    common = {"image_size": options.image_size, "on_bad_sample": options.on_bad_sample, "seed": options.seed,
              "classes": source.classes, "keep_empty": source.keep_empty}
    splits = {split: CocoDetection(_existing(getattr(source, f"{split}_images"), f"{split}_images"),
                                   _existing(getattr(source, f"{split}_ann"), f"{split}_ann"),
                                   subset=_sizes(source)[split], **common) for split in options.splits}
    val, train = splits["val"], splits.get("train", splits["val"])
    if (train.classes, train.category_ids) != (val.classes, val.category_ids):
        raise DataError(f"detection: {train.annotation_file} and {val.annotation_file} have different categories "
                        f"({list(train.classes)} vs {list(val.classes)}); pick the shared ones with classes")
    return splits, val.classes, tuple(val.category_ids)


def _voc(kind: str, source: DataSource, options: LoadOptions):
    _check_exclude(source)
    root = _existing(source.root, "root")
    common = {"image_size": options.image_size, "on_bad_sample": options.on_bad_sample, "seed": options.seed}
    if source.classes is None:
        splits = {split: VocSegmentation(root, split, subset=_sizes(source)[split], **common)
                  for split in options.splits}
        return splits, splits["val"].classes, None
    check_class_names(source.classes, VOC_CLASSES[1:], str(root))
    classes, mapping = _subset(kind, VOC_CLASSES, source.classes)
    splits = {split: Relabelled(VocSegmentation(root, split, **common), kind, mapping, source.keep_empty,
                                subset=_sizes(source)[split], seed=options.seed,
                                exclude=_excluded(source, split, VOC_CLASSES)) for split in options.splits}
    return splits, classes, None


def _folder(kind: str, source: DataSource, options: LoadOptions):
    root = _existing(source.root, "root")
    splits = {split: ImageFolderDataset(root, split, options.image_size, options.on_bad_sample, _sizes(source)[split],
                                        options.seed, source.classes, options.channels) for split in options.splits}
    return splits, splits["val"].classes, None


def _torchvision(kind: str, source: DataSource, options: LoadOptions):
    root = Path(source.root).expanduser()
    splits = {split: TorchvisionClassification(source.dataset, root, split, options.image_size, source.classes,
                                               _sizes(source)[split], options.seed, source.download, options.channels)
              for split in options.splits}
    return splits, splits["val"].classes, None


def _existing(value: str | None, key: str) -> Path:
    """A path key of a task's data, which must exist."""
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"data.{key}: {path} does not exist")
    return path
