"""The ``files`` benchmark: the built-in tasks (seg, det, cls) read from disk, as the config points to them.

``data.root=DIR`` alone reads the data bundle of the Unified-OneHead Multi-Task Challenge, laid out as::

    DIR/mini_voc_seg/{train,val}/{JPEGImages,SegmentationClass}     segmentation, one folder per split
    DIR/mini_coco_det/{train,val}/ + annotations/instances_{train,val}*.json   detection (COCO)
    DIR/imagenette_160/{train,val}/<class folder>/                  classification

and the explicit keys (``data.seg.root``, ``data.det.train_images``, ``data.det.train_ann``, ``data.det.val_images``,
``data.det.val_ann``, ``data.cls.root``) point anywhere else, overriding what the root gives. Each task becomes a
data source of format voc, coco or folder (``clmtl.data.sources``), the same a ``tasks:`` entry can name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clmtl.data.formats import DataSource
from clmtl.errors import ConfigError
from clmtl.settings import AT_LEAST_ONE


@dataclass
class RootFiles:
    """A dataset under one folder: segmentation in the VOC layout (ImageSets) or one folder per split (``train/``,
    ``val/``); classification as ``root/{train,val}/<class folder>/<image>``."""

    root: str | None = None
    train_size: int | None = field(default=None, metadata=AT_LEAST_ONE)
    val_size: int | None = field(default=None, metadata=AT_LEAST_ONE)


@dataclass
class DetectionFiles:
    """Detection on disk: COCO images folders and instances JSON files, optionally a class subset by name."""

    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    classes: list[str] | None = None
    keep_empty: bool = True
    train_size: int | None = field(default=None, metadata=AT_LEAST_ONE)
    val_size: int | None = field(default=None, metadata=AT_LEAST_ONE)


BUNDLE = {"seg": "mini_voc_seg", "det": "mini_coco_det", "cls": "imagenette_160"}
"""Folder of each task in the three-dataset bundle."""


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


def resolve_paths(root: str | None, seg: RootFiles, det: DetectionFiles, cls: RootFiles) -> FilePaths:
    """Explicit keys first (``seg``, ``det``, ``cls``: ``data.seg`` ...), then what ``root`` (``data.root``) gives
    for the three-dataset bundle layout."""
    root = _path(root)
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
        "seg_root": _path(seg.root),
        "det_train_images": _path(det.train_images),
        "det_train_ann": _path(det.train_ann),
        "det_val_images": _path(det.val_images),
        "det_val_ann": _path(det.val_ann),
        "cls_root": _path(cls.root),
    }
    return FilePaths(**{key: explicit[key] or bundle.get(key) for key in explicit})


def _required(value: Path | None, key: str) -> str:
    if value is None:
        raise ConfigError(f"benchmark=files: {key} is not set (set it, or data.root for the three-dataset bundle)")
    if not value.exists():
        raise ConfigError(f"benchmark=files: {key}: {value} does not exist")
    return str(value)


def files_sources(root: str | None, seg: RootFiles, det: DetectionFiles,
                  cls: RootFiles) -> dict[str, Callable[[], DataSource]]:
    """The data source of each built-in task name (seg, det, cls) under ``benchmark=files``, from ``root`` and the
    explicit keys (``resolve_paths``); each is resolved when asked for, so a stream reads only the paths of the tasks
    it has."""
    paths = resolve_paths(root, seg, det, cls)
    return {
        "seg": lambda: DataSource(format="voc", root=_required(paths.seg_root, "data.seg.root"),
                                  train_size=seg.train_size, val_size=seg.val_size),
        "det": lambda: DataSource(
            format="coco", classes=det.classes, keep_empty=det.keep_empty,
            train_images=_required(paths.det_train_images, "data.det.train_images"),
            train_ann=_required(paths.det_train_ann, "data.det.train_ann"),
            val_images=_required(paths.det_val_images, "data.det.val_images"),
            val_ann=_required(paths.det_val_ann, "data.det.val_ann"),
            train_size=det.train_size, val_size=det.val_size),
        "cls": lambda: DataSource(format="folder", root=_required(paths.cls_root, "data.cls.root"),
                                  train_size=cls.train_size, val_size=cls.val_size),
    }
