"""Pseudo-labels: the previous model's confident predictions of old classes join the labels of each new image.

In the class scenario a new task labels only its own classes, so old objects in its images are taught as
background. Before each training step the previous experience's model predicts on the mini-batch:

- **detection**: its detections (``sigmoid(objectness) * sigmoid(class)`` above ``score``, class-wise NMS at IoU 0.5)
  join the image's boxes, except those overlapping a labelled box by IoU ``overlap`` or more (the object is already
  labelled). This is the pseudo-labelling of incremental detectors (e.g. Faster-ILOD's successors, ERD's baselines);
- **segmentation**: a pixel labelled background takes the previous model's class where that model's softmax
  probability is above ``score`` and its class is not background.

The labels are changed after any stored samples are mixed in (the ``targets`` action comes after ``data``), so a
replayed image is pseudo-labelled too; what it has labelled already is left out by the overlap rule (detection) or
is no background (segmentation). Acts in the class scenario; ``strategy_stats`` counts the boxes or pixels added.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

from clmtl.models.decode import decode_detections
from clmtl.settings import FRACTION, setting
from clmtl.strategies.previous_model import PreviousModelPlugin
from clmtl.stream.tasks import DETECTION
from clmtl.training.losses import output_kind
from clmtl.training.registry import register

NMS_IOU = 0.5


def with_detections(target: dict[str, torch.Tensor], detections: dict[str, torch.Tensor],
                    overlap: float) -> dict[str, torch.Tensor]:
    """A copy of one image's ``target`` with the ``detections`` that overlap none of its boxes by ``overlap`` IoU."""
    boxes, labels = target["boxes"], target["labels"]
    found, found_labels = detections["boxes"].to(boxes), detections["labels"].to(labels)
    if len(boxes) and len(found):
        apart = box_iou(found, boxes).max(1).values < overlap
        found, found_labels = found[apart], found_labels[apart]
    return {**target, "boxes": torch.cat([boxes, found]), "labels": torch.cat([labels, found_labels])}


def with_pixels(labels: torch.Tensor, old_logits: torch.Tensor, score: float) -> torch.Tensor:
    """``labels`` with each background pixel given the previous model's class where its probability exceeds
    ``score`` and the class is not background."""
    probability, predicted = old_logits.softmax(1).max(1)
    confident = (labels == 0) & (predicted != 0) & (probability > score)
    return torch.where(confident, predicted, labels)


class PseudoLabelPlugin(PreviousModelPlugin):
    """The previous model's confident old-class predictions join each training image's labels."""

    method = "pseudo_labels"
    state = ("added",)

    def __init__(self, score: float = 0.5, overlap: float = 0.5) -> None:
        super().__init__()
        self.score, self.overlap = score, overlap
        self.added = 0
        """Boxes or pixels added so far (results.json's ``strategy_stats``)."""

    def stats(self) -> dict[str, int]:
        return {"pseudo_labels": self.added}

    def before_forward(self, strategy, **kwargs) -> None:
        if not self.old_classes(strategy):
            return
        old = self.previous_output(strategy)
        targets = strategy.mbatch[1]
        if output_kind(old) == DETECTION:
            found = decode_detections([level.float() for level in old], strategy.model.anchor_layout, self.score,
                                      NMS_IOU)
            labelled = [with_detections(t, d, self.overlap) for t, d in zip(targets, found)]
            self.added += sum(len(new["boxes"]) - len(t["boxes"]) for new, t in zip(labelled, targets))
        else:
            labelled = with_pixels(targets, old.float(), self.score)
            self.added += int((labelled != targets).sum())
        strategy.mbatch[1] = labelled


@dataclass(frozen=True)
class PseudoLabelSettings:
    """Pseudo-labels' hyperparameters, ``strategy.pseudo_labels.<key>``."""

    score: float = setting(0.5, FRACTION, help="lowest confidence of a pseudo-label (detection score, pixel "
                                               "probability)", search=(0.3, 0.5, 0.7))
    overlap: float = setting(0.5, FRACTION, help="detection: a pseudo-box overlapping a labelled box by this IoU is "
                                                 "left out")


register("pseudo_labels", settings=PseudoLabelSettings, acts_on=("targets",),
         kinds=("segmentation", "detection"))(PseudoLabelPlugin)
