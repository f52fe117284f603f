"""Per-task score accumulators: mIoU, COCO mAP and top-1.

Plain objects with ``reset()``, ``update(...)`` and ``result() -> dict[str, float]``, so they work inside the
Avalanche plugin (``clmtl.metrics.plugin``), in ``clmtl eval`` and in tests alike. Each accumulates over a whole
validation set and scores it once (one confusion matrix, one COCOeval), the definitions docs/metrics.md pins.
``merge(other)`` adds what another accumulator of the same kind saw (another process's shard of the set), so the
merged result is the one-process result over the whole set.

A task scores its own classes: in the class scenario its head also predicts other tasks' classes, which count as
errors on its images but are not averaged into its score (``scored`` / ``scored_categories``).
"""
from __future__ import annotations

import contextlib
import io
from typing import Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from clmtl.data.letterbox import Letterbox
from clmtl.models.decode import class_indices
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, IGNORE_INDEX, SEGMENTATION, OutputSpace, TaskSpec


class MeanIoU:
    """Mean IoU from one confusion matrix over the whole val set.

    Pixels whose target is ``ignore_index`` are skipped; background is an ordinary class. The mean runs over the
    classes whose union (target or prediction) is non-empty, which is what torchmetrics'
    ``MulticlassJaccardIndex(num_classes, average="macro", ignore_index=255)`` computes; with ``scored`` only over
    those of the listed classes. With no scored pixel at all the value is undefined; ``result()`` then reports 0.0 so
    that results stay valid JSON.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, scored: Sequence[int] | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.scored = None if scored is None else torch.as_tensor(list(scored), dtype=torch.long)
        self.reset()

    def reset(self) -> None:
        # rows: target class, columns: predicted class
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, output: Tensor, target: Tensor) -> None:
        """Add a batch: ``output`` is logits ``[B, C', H, W]`` (``C' <= C``: a head that has not grown to every class
        yet) or a label map ``[B, H, W]``; ``target`` is ``[B, H, W]``."""
        pred = class_indices(output) if output.dim() == 4 else output
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred = pred.detach().cpu().flatten().long()
        target = target.detach().cpu().flatten().long()
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        for name, labels in (("target", target), ("prediction", pred)):
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"{name} holds labels outside 0..{self.num_classes - 1} on scored pixels")
        cells = torch.bincount(target * self.num_classes + pred, minlength=self.num_classes**2)
        self.confusion += cells.reshape(self.num_classes, self.num_classes)

    def merge(self, other: MeanIoU) -> None:
        self.confusion += other.confusion

    def result(self) -> dict[str, float]:
        """``mIoU``, and ``mIoU_fg`` the same mean without background (class 0): the class-incremental literature's
        score of old and new classes."""
        intersection = self.confusion.diag().double()
        union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - intersection
        scored = torch.arange(self.num_classes) if self.scored is None else self.scored
        return {"mIoU": _mean_iou(intersection[scored], union[scored]),
                "mIoU_fg": _mean_iou(intersection[scored[scored != 0]], union[scored[scored != 0]])}


def _mean_iou(intersection: Tensor, union: Tensor) -> float:
    """The mean IoU of the classes with a non-empty union (0.0 when none has one)."""
    present = union > 0
    return float((intersection[present] / union[present]).mean()) if present.any() else 0.0


class Top1:
    """Fraction of samples whose argmax class is the label (0.0 before any sample)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, output: Tensor, target: Tensor) -> None:
        """Add a batch: ``output`` logits ``[B, C]`` or class ids ``[B]``, ``target`` ``[B]`` class indices."""
        predicted = class_indices(output) if output.dim() == 2 else output
        self.correct += int((predicted.detach().cpu() == target.detach().cpu()).sum())
        self.total += int(target.numel())

    def merge(self, other: Top1) -> None:
        self.correct += other.correct
        self.total += other.total

    def result(self) -> dict[str, float]:
        return {"top1": self.correct / self.total if self.total else 0.0}


class CocoMAP:
    """COCO box mAP (pycocotools COCOeval, bbox) over everything passed to ``update``.

    Ground truth and detections are kept per image and turned into an in-memory COCO dataset at ``result()``:
    ``mAP50_95`` is ``COCOeval.stats[0]`` and ``mAP50`` is ``stats[1]``. Boxes come in xyxy pixels and are scored
    in the coordinates given, unless the target says how to map them back to the file's pixels (below).

    Ids: images are numbered 1, 2, ... in update order unless ``update(..., image_ids=...)`` or the target's
    ``"image_id"`` names them; labels are the contiguous task labels unless ``category_ids[label]`` maps them to a
    file's own category ids. A target may carry an optional ``"iscrowd"`` bool tensor ``[N]``: COCOeval then
    ignores detections matched to crowd boxes.

    A target from a real-format loader (``clmtl.data.coco``) also carries ``"letterbox"`` and ``"original"`` (the
    file's own boxes, labels, crowd flags and image size): detections are then mapped back to original pixels and
    scored against that ground truth, so the result is COCOeval's on the annotation file itself.

    Edge cases, defined here because COCOeval cannot score them: no detection at all gives 0.0 (pycocotools refuses
    an empty result list; AP with ground truth and no detection is 0); no ground-truth box at all gives 0.0
    (COCOeval reports -1, "undefined"; so does a set whose only ground truth is crowd).
    """

    def __init__(self, category_ids: Sequence[int] | None = None,
                 scored_labels: Sequence[int] | None = None) -> None:
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.scored_labels = None if scored_labels is None else list(scored_labels)
        """Labels whose categories COCOeval scores (``params.catIds``); None: every category."""
        self.first_image_id = 1
        """Id of the first image without an id of its own, after a reset. A process scoring a shard of the set that
        starts at sample ``k`` starts at ``k + 1``, so merged shards carry the ids one process would give them."""
        self.reset()

    def reset(self) -> None:
        self._gt: list[dict] = []
        self._dt: list[dict] = []
        self._image_ids: set[int] = set()
        self._next_image_id = self.first_image_id
        self._result: dict[str, float] | None = None

    def merge(self, other: CocoMAP) -> None:
        shared = self._image_ids & other._image_ids
        if shared:
            raise ValueError(f"cannot merge detection scores that both hold images {sorted(shared)[:5]}")
        self._gt += other._gt
        self._dt += other._dt
        self._image_ids |= other._image_ids
        self._next_image_id = max(self._next_image_id, other._next_image_id)
        self._result = None

    def _category(self, label: int) -> int:
        return self.category_ids[label] if self.category_ids is not None else label

    def update(
        self, predictions: list[dict], targets: list[dict], image_ids: Sequence[int] | None = None
    ) -> None:
        """Add a batch of decoded detections (boxes, scores, labels) and their targets (boxes, labels), per image."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        if image_ids is not None and len(image_ids) != len(targets):
            raise ValueError(f"{len(image_ids)} image ids for {len(targets)} targets")
        for index, (pred, target) in enumerate(zip(predictions, targets)):
            image_id = int(image_ids[index] if image_ids is not None else target.get("image_id", self._next_image_id))
            if image_id in self._image_ids:
                raise ValueError(f"image id {image_id} was already scored")
            self._image_ids.add(image_id)
            self._next_image_id = max(self._next_image_id, image_id + 1)
            pred_boxes, truth = pred["boxes"], target
            if "original" in target:
                truth = target["original"]
                pred_boxes = Letterbox.from_tensor(target["letterbox"]).boxes_to_original(pred_boxes, truth["size"])
            crowd = truth.get("iscrowd")
            crowd = [False] * len(truth["labels"]) if crowd is None else crowd.tolist()
            for box, label, is_crowd in zip(truth["boxes"].tolist(), truth["labels"].tolist(), crowd):
                self._gt.append({"image_id": image_id, "category_id": self._category(label),
                                 "bbox": _xywh(box), "iscrowd": int(is_crowd)})
            for box, score, label in zip(pred_boxes.tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
                self._dt.append({"image_id": image_id, "category_id": self._category(label),
                                 "bbox": _xywh(box), "score": float(score)})
        self._result = None

    def result(self) -> dict[str, float]:
        if self._result is None:
            self._result = self._evaluate()
        return dict(self._result)

    def _evaluate(self) -> dict[str, float]:
        if not self._dt:
            return {"mAP50_95": 0.0, "mAP50": 0.0}
        annotations = [
            {**ann, "id": index, "area": ann["bbox"][2] * ann["bbox"][3]} for index, ann in enumerate(self._gt, start=1)
        ]
        categories = self.category_ids
        if categories is None:
            categories = sorted({ann["category_id"] for ann in self._gt + self._dt})
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco_gt = COCO()
            coco_gt.dataset = {
                "images": [{"id": image_id} for image_id in sorted(self._image_ids)],
                "annotations": annotations,
                "categories": [{"id": category} for category in categories],
            }
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes([dict(det) for det in self._dt])  # loadRes adds keys to what it gets
            evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
            if self.scored_labels is not None:
                evaluator.params.catIds = [self._category(label) for label in self.scored_labels]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # COCOeval reports -1 when no category has a (non-crowd) ground-truth box
        return {"mAP50_95": max(float(evaluator.stats[0]), 0.0), "mAP50": max(float(evaluator.stats[1]), 0.0)}


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


Scorer = MeanIoU | CocoMAP | Top1


def update_segmentation(scorer: MeanIoU, logits: Tensor, targets: Tensor, dataset=None, start: int = 0) -> None:
    """Add a batch of segmentation ``logits [B, C, S, S]`` (samples ``start``, ``start + 1`` ... of ``dataset``).

    When ``dataset`` has its files' label maps (``has_original_targets``), each sample is scored at its file's
    resolution, as the segmentation literature scores VOC: its logits mapped back as ``clmtl eval --predictions``
    exports them (letterbox padding cropped, bilinear resize), then the argmax, against the file's own labels.
    Otherwise at the model's resolution, against ``targets``.
    """
    if not getattr(dataset, "has_original_targets", False):
        scorer.update(logits, targets)
        return
    for offset, sample in enumerate(logits):
        meta = dataset.meta(start + offset)
        predicted = class_indices(meta.letterbox.logits_to_original(sample, meta.original_size), 0)
        scorer.update(predicted[None], dataset.original_target(start + offset)[None])


def scorer_for(task: TaskSpec, space: OutputSpace | None = None) -> Scorer:
    """The accumulator that scores ``task`` with its primary and extra metrics, on its own classes within its head
    ``space`` (default: a head of the task's classes alone)."""
    shared = space is not None and len(space.classes) != len(task.classes)
    if task.kind == SEGMENTATION:
        return MeanIoU(len(space.classes) if space else task.num_classes, scored=task.labels if shared else None)
    if task.kind == DETECTION:
        ids = space.category_ids if space else task.category_ids
        return CocoMAP(ids, scored_labels=task.labels if shared else None)
    if task.kind == CLASSIFICATION:
        return Top1()
    raise ValueError(f"no scorer for task kind {task.kind!r}")
