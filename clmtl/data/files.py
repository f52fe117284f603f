"""The ``files`` benchmark: the three tasks' datasets read from disk, as the config points to them.

``data.root=DIR`` alone reads the challenge bundle of the seed report::

    DIR/mini_voc_seg/{train,val}/{JPEGImages,SegmentationClass}     segmentation, one folder per split
    DIR/mini_coco_det/{train,val}/ + annotations/instances_{train,val}*.json   detection (COCO)
    DIR/imagenette_160/{train,val}/<class folder>/                  classification

and the explicit keys (``data.seg.root``, ``data.det.train_images``, ``data.det.train_ann``, ``data.det.val_images``,
``data.det.val_ann``, ``data.cls.root``) point anywhere else, overriding what the root gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from clmtl.config import Config, ConfigError, DataConfig
from clmtl.data.coco import CocoDetection
from clmtl.data.folder import ImageFolderDataset
from clmtl.data.voc import VocSegmentation
from clmtl.tasks import CLASSIFICATION, DETECTION, SEGMENTATION, TASK_KINDS, TaskSpec

BUNDLE = {"seg": "mini_voc_seg", "det": "mini_coco_det", "cls": "imagenette_160"}
"""Folder of each task in the challenge bundle."""


@dataclass
class TaskData:
    """One task of the benchmark: its description and its train and validation datasets."""

    task: TaskSpec
    train: Dataset
    val: Dataset


@dataclass(frozen=True)
class FilePaths:
    """Where each dataset lives, after ``data.root`` and the explicit keys are combined."""

    seg_root: Path | None
    det_train_images: Path | None
    det_train_ann: Path | None
    det_val_images: Path | None
    det_val_ann: Path | None
    cls_root: Path | None


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value).expanduser()


def _bundle_annotation(root: Path, split: str) -> Path | None:
    """The one ``annotations/instances_<split>*.json`` of the bundle's detection folder (None if absent)."""
    matches = sorted((root / BUNDLE["det"] / "annotations").glob(f"instances_{split}*.json"))
    if len(matches) > 1:
        raise ConfigError(f"data.root: several annotation files for split {split!r}: "
                          f"{', '.join(m.name for m in matches)}; set data.det.{split}_ann")
    return matches[0] if matches else None


def resolve_paths(data: DataConfig) -> FilePaths:
    """Explicit keys first, then what ``data.root`` gives for the challenge bundle layout."""
    root = _path(data.root)
    bundle = {}
    if root is not None:
        if not root.is_dir():
            raise ConfigError(f"data.root: {root} is not a folder")
        bundle = {
            "seg_root": root / BUNDLE["seg"],
            "det_train_images": root / BUNDLE["det"] / "train",
            "det_train_ann": _bundle_annotation(root, "train"),
            "det_val_images": root / BUNDLE["det"] / "val",
            "det_val_ann": _bundle_annotation(root, "val"),
            "cls_root": root / BUNDLE["cls"],
        }
    explicit = {
        "seg_root": _path(data.seg.root),
        "det_train_images": _path(data.det.train_images),
        "det_train_ann": _path(data.det.train_ann),
        "det_val_images": _path(data.det.val_images),
        "det_val_ann": _path(data.det.val_ann),
        "cls_root": _path(data.cls.root),
    }
    return FilePaths(**{key: explicit[key] or bundle.get(key) for key in explicit})


def _required(value: Path | None, key: str) -> Path:
    if value is None:
        raise ConfigError(f"benchmark=files: {key} is not set (set it, or data.root for the challenge layout)")
    if not value.exists():
        raise ConfigError(f"benchmark=files: {key}: {value} does not exist")
    return value


def load_task(name: str, config: Config, paths: FilePaths) -> TaskData:
    """Task ``name`` (seg, det or cls) from disk, with the subsets the config asks for."""
    data, kind = config.data, TASK_KINDS[name]
    common = {"image_size": data.image_size, "on_bad_sample": data.on_bad_sample, "seed": config.seed}
    if kind == SEGMENTATION:
        root = _required(paths.seg_root, "data.seg.root")
        train = VocSegmentation(root, "train", subset=data.seg.train_size, **common)
        val = VocSegmentation(root, "val", subset=data.seg.val_size, **common)
        return TaskData(TaskSpec(name, kind, train.classes), train, val)
    if kind == DETECTION:
        det = data.det
        options = {"classes": det.classes, "keep_empty": det.keep_empty, **common}
        train = CocoDetection(_required(paths.det_train_images, "data.det.train_images"),
                              _required(paths.det_train_ann, "data.det.train_ann"), subset=det.train_size, **options)
        val = CocoDetection(_required(paths.det_val_images, "data.det.val_images"),
                            _required(paths.det_val_ann, "data.det.val_ann"), subset=det.val_size, **options)
        if (train.classes, train.category_ids) != (val.classes, val.category_ids):
            raise ConfigError(f"detection: {train.annotation_file} and {val.annotation_file} have different "
                              f"categories ({train.classes} vs {val.classes}); set data.det.classes")
        return TaskData(TaskSpec(name, kind, train.classes, tuple(train.category_ids)), train, val)
    assert kind == CLASSIFICATION
    root = _required(paths.cls_root, "data.cls.root")
    train = ImageFolderDataset(root, "train", subset=data.cls.train_size, **common)
    val = ImageFolderDataset(root, "val", subset=data.cls.val_size, **common)
    return TaskData(TaskSpec(name, kind, train.classes), train, val)


def files_benchmark(config: Config) -> list[TaskData]:
    """Every task of ``config.tasks``, in stream order."""
    paths = resolve_paths(config.data)
    return [load_task(name, config, paths) for name in config.tasks]
