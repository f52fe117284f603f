"""Task descriptions shared by data, model, losses and metrics.

A task is identified in the stream by its position (the Avalanche task label); everything else
that differs between tasks — the kind of target, its classes and the metric that scores it — lives here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SEGMENTATION = "segmentation"
DETECTION = "detection"
CLASSIFICATION = "classification"
KINDS = (SEGMENTATION, DETECTION, CLASSIFICATION)

PRIMARY_METRIC = {SEGMENTATION: "mIoU", DETECTION: "mAP50_95", CLASSIFICATION: "top1"}
EXTRA_METRICS = {SEGMENTATION: ("mIoU_fg",), DETECTION: ("mAP50",), CLASSIFICATION: ()}

TASK_KINDS = {"seg": SEGMENTATION, "det": DETECTION, "cls": CLASSIFICATION}
"""Short name of each kind: the built-in shapes tasks a config names, and the keys of per-kind settings
(``train.epochs``, ``data.hue``, ``data.seg`` ...)."""


def kind_name(kind: str) -> str:
    """The full kind name of ``kind`` given as a full or short name (``cls`` -> ``classification``)."""
    return TASK_KINDS.get(kind, kind)


def short_kind(kind: str) -> str:
    """The short name of a full kind name (``classification`` -> ``cls``)."""
    return {full: short for short, full in TASK_KINDS.items()}[kind_name(kind)]


IGNORE_INDEX = 255
"""Label-map value that no loss or metric counts (VOC's void border)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task of the stream: its short name, kind and class names, and where its outputs live.

    For segmentation ``classes[0]`` is the background class, as VOC counts it. ``category_ids[label]`` is the
    annotation file's own id of a detection class (e.g. COCO's non-contiguous ids), so scores use the file's terms.

    ``head`` is the model's output space the task uses, which is also its Avalanche task label, and ``labels[i]`` the
    index of the task's class ``i`` in that space (``clmtl.stream.scenario``): in the task scenario every task has a
    head of its own and ``labels`` is ``0, 1, ...``; in the class scenario tasks of one kind share a head whose classes
    grow. A task not placed yet (``head`` None) takes the head of its position in the stream (the task scenario).
    """

    name: str
    kind: str
    classes: tuple[str, ...]
    category_ids: tuple[int, ...] | None = None
    head: int | None = None
    labels: tuple[int, ...] | None = None
    transform: dict | None = field(default=None, compare=False, hash=False)
    """The task's domain shift, as ``clmtl.data.domains`` applies it: ``{"permute": index, "seed": seed}`` or
    ``{"rotate": degrees}``; None for the data as it is."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: unknown kind {self.kind!r}; expected one of {KINDS}")
        if len(self.classes) < 1:
            raise ValueError(f"task {self.name!r}: needs at least one class")
        if self.category_ids is not None and len(self.category_ids) != len(self.classes):
            raise ValueError(
                f"task {self.name!r}: {len(self.category_ids)} category ids for {len(self.classes)} classes")
        if self.labels is None:
            object.__setattr__(self, "labels", tuple(range(len(self.classes))))
        if len(self.labels) != len(self.classes):
            raise ValueError(f"task {self.name!r}: {len(self.labels)} head labels for {len(self.classes)} classes")

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
        entry["head"] = self.head
        entry["labels"] = list(self.labels)
        if self.transform is not None:
            entry["transform"] = dict(self.transform)
        return entry

    @classmethod
    def from_dict(cls, entry: dict, position: int = 0) -> TaskSpec:
        """The task an ``as_dict`` entry describes; an entry without ``head`` gets the head ``position``."""
        ids, labels = entry.get("category_ids"), entry.get("labels")
        return cls(entry["name"], entry["kind"], tuple(entry["classes"]), None if ids is None else tuple(ids),
                   entry.get("head", position), None if labels is None else tuple(labels), entry.get("transform"))


@dataclass(frozen=True)
class OutputSpace:
    """One head of a model: its kind, every class it holds once the stream is over, and its starting size.

    A model is built from its output spaces; which tasks share one is the scenario's business
    (``clmtl.stream.scenario``).
    """

    kind: str
    classes: tuple[str, ...]
    category_ids: tuple[int, ...] | None
    initial: int
    """Classes the head has before its tasks add any: those of its first task."""
    name: str = ""
    """The head's name: its task's, or its kind's short name when several tasks share it (exported outputs)."""
