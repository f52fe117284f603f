"""The description of a data source: which format a task's images come in, and the keys that format reads.

Light on purpose (no torch): the run's config describes each task's ``data`` with ``DataSource`` and checks it before
anything is loaded; ``clmtl.data.sources`` loads it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clmtl.settings import AT_LEAST_ONE, NON_NEGATIVE, one_of
from clmtl.stream.tasks import TASK_KINDS

DATA_FORMATS = ("shapes", "coco", "voc", "folder", "torchvision")
FORMAT_KINDS = {"coco": ("detection",), "voc": ("segmentation",), "folder": ("classification",),
                "torchvision": ("classification",), "shapes": tuple(TASK_KINDS.values())}
"""The task kinds each data format can describe."""
FORMAT_KEYS = {
    "shapes": ("classes", "keep_empty", "exclude", "train_size", "val_size", "seed"),
    "coco": ("train_images", "train_ann", "val_images", "val_ann", "classes", "keep_empty", "train_size", "val_size"),
    "voc": ("root", "classes", "keep_empty", "exclude", "train_size", "val_size"),
    "folder": ("root", "classes", "train_size", "val_size"),
    "torchvision": ("dataset", "root", "download", "classes", "train_size", "val_size"),
}
"""The keys each data format reads besides ``format``; a key of another format is a mistake worth reporting."""
FORMAT_REQUIRED = {"shapes": (), "coco": ("train_images", "train_ann", "val_images", "val_ann"), "voc": ("root",),
                   "folder": ("root",), "torchvision": ("dataset", "root")}


@dataclass
class DataSource:
    """Where one task's images come from: a ``format`` and that format's keys (``FORMAT_KEYS``).

    ``classes`` picks a subset by name, in label order (segmentation: the foreground classes; background is always
    label 0). ``keep_empty`` keeps images that show none of the picked classes (segmentation, detection).
    ``exclude`` drops the training images that show any of these classes (segmentation: the ``disjoint`` setting of
    a class-incremental split, where a step never sees the classes still to come).
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
    exclude: list[str] | None = None
    train_size: int | None = field(default=None, metadata=AT_LEAST_ONE)
    val_size: int | None = field(default=None, metadata=AT_LEAST_ONE)
    seed: int | None = field(default=None, metadata=NON_NEGATIVE)

    @staticmethod
    def check_keys(data: Mapping[str, Any]) -> str | None:
        """The keys another format reads, or a required key left out, as a problem (None if fine). A layer without
        ``format`` (an override of one key) is judged once the layers are merged."""
        if "format" not in data:
            return None
        fmt = data["format"]
        if fmt not in FORMAT_KEYS:
            return None  # the format's own check names it
        defaults = DataSource()
        foreign = [key for key in data if key != "format" and key not in FORMAT_KEYS[fmt]
                   and data[key] != getattr(defaults, key, None)]  # a saved config lists every key at its default
        if foreign:
            return f"{foreign[0]!r} is not a key of format {fmt} (its keys: {', '.join(FORMAT_KEYS[fmt])})"
        missing = [key for key in FORMAT_REQUIRED[fmt] if data.get(key) is None]
        if missing:
            return f"format {fmt} needs {', '.join(missing)}"
        return None
