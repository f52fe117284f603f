"""Task descriptions shared by data, model, losses and metrics.

A task is identified in the stream by its position (the Avalanche task label); everything else
that differs between tasks — the kind of target, its classes and the metric that scores it — lives here.
"""
from __future__ import annotations

from dataclasses import dataclass

SEGMENTATION = "segmentation"
DETECTION = "detection"
CLASSIFICATION = "classification"
KINDS = (SEGMENTATION, DETECTION, CLASSIFICATION)

PRIMARY_METRIC = {SEGMENTATION: "mIoU", DETECTION: "mAP50_95", CLASSIFICATION: "top1"}
EXTRA_METRICS = {SEGMENTATION: (), DETECTION: ("mAP50",), CLASSIFICATION: ()}

TASK_KINDS = {"seg": SEGMENTATION, "det": DETECTION, "cls": CLASSIFICATION}
"""The task names a config uses, and the kind each one is."""

IGNORE_INDEX = 255
"""Label-map value that no loss or metric counts (VOC's void border)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task of the stream: its short name, kind and class names.

    For segmentation ``classes[0]`` is the background class, as VOC counts it. ``category_ids[label]`` is the
    annotation file's own id of a detection class (e.g. COCO's non-contiguous ids), so scores use the file's terms.
    """

    name: str
    kind: str
    classes: tuple[str, ...]
    category_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}; expected one of {KINDS}")
        if len(self.classes) < 1:
            raise ValueError(f"task {self.name!r}: needs at least one class")
        if self.category_ids is not None and len(self.category_ids) != len(self.classes):
            raise ValueError(
                f"task {self.name!r}: {len(self.category_ids)} category ids for {len(self.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def metric(self) -> str:
        """Name of the primary metric, the one in the accuracy matrix."""
        return PRIMARY_METRIC[self.kind]

    @property
    def extra_metrics(self) -> tuple[str, ...]:
        return EXTRA_METRICS[self.kind]

    def as_dict(self) -> dict:
        """The task as results.json describes it (``from_dict`` reads it back)."""
        entry = {"name": self.name, "kind": self.kind, "metric": self.metric}
        if self.extra_metrics:
            entry["extra"] = list(self.extra_metrics)
        entry["classes"] = list(self.classes)
        if self.category_ids is not None:
            entry["category_ids"] = list(self.category_ids)
        return entry

    @classmethod
    def from_dict(cls, entry: dict) -> TaskSpec:
        """The task an ``as_dict`` entry describes."""
        ids = entry.get("category_ids")
        return cls(entry["name"], entry["kind"], tuple(entry["classes"]), None if ids is None else tuple(ids))
