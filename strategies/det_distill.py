"""Detection distillation with ERD's response selection (Feng et al., CVPR 2022, "Overcoming Catastrophic
Forgetting in Incremental Object Detection via Elastic Response Distillation"), adapted to our YOLOv3-style head.

While a new task trains, the previous experience's model runs on the same images, and the new model is pulled toward
its responses where it found something, chosen per image as ERD chooses them:

- **Classification responses.** An anchor is selected when the previous model's confidence there,
  ``sigmoid(objectness) * max_c sigmoid(class_c)``, exceeds the mean plus ``std_factor`` (2, ERD's) standard
  deviations of that confidence over the image's anchors of all levels. On the selected anchors the objectness and
  old-class logits are matched by a mean squared error (ERD's L2 on classification logits; our head has an
  objectness output besides, which says where an object is and is distilled with them).
- **Box responses.** Among the selected anchors, the previous model's boxes go through class-aware NMS at IoU
  ``nms_iou`` (ERD's 0.005: about one box per object), and the kept anchors' raw box outputs (tx, ty, tw, th) are
  matched by a mean squared error. ERD distils GFL's box distributions with a KL divergence; our head regresses a
  box, not a distribution, so the adaptation is an L2.

The penalty is ``weight * (classification + box)``, a mean over the images. Acts in the class scenario on detection
tasks; the selection is tested on a hand-made output (``tests/test_det_distill.py``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from clmtl.models.anchors import AnchorLayout
from clmtl.models.decode import box_from_raw, level_grid
from clmtl.settings import FRACTION, NON_NEGATIVE, setting
from clmtl.strategies.previous_model import PreviousModelPlugin
from clmtl.training.registry import register


def flattened(raw: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image, every anchor of every level ``[B, N, 5 + C]``."""
    return torch.cat([level.flatten(1, -2) for level in raw], 1)


def anchor_boxes(raw: Sequence[torch.Tensor], layout: AnchorLayout) -> torch.Tensor:
    """Per image, every anchor's box ``[B, N, 4]`` xyxy in input pixels, in ``flattened``'s order."""
    boxes = []
    for level, (out, stride) in enumerate(zip(raw, layout.strides)):
        cell, anchor_wh = level_grid(layout.anchors[level], out.shape[2], out.shape[3], out.device, out.dtype)
        boxes.append(box_from_raw(out[..., :4], cell, anchor_wh, stride).flatten(1, -2))
    return torch.cat(boxes, 1)


def confidence(responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sigmoid(objectness) * max_c sigmoid(class_c)`` of each anchor ``[..., 5 + C]``, and that class."""
    best, classes = responses[..., 5:].sigmoid().max(-1)
    return responses[..., 4].sigmoid() * best, classes


def elastic_selection(scores: torch.Tensor, std_factor: float) -> torch.Tensor:
    """ERD's rule: the anchors whose score exceeds the mean plus ``std_factor`` standard deviations of ``scores``."""
    return scores > scores.mean() + std_factor * scores.std()


def response_distillation(new_raw: Sequence[torch.Tensor], old_raw: Sequence[torch.Tensor], layout: AnchorLayout,
                          std_factor: float = 2.0, nms_iou: float = 0.005) -> torch.Tensor:
    """The classification and box terms above, a mean over images."""
    new, old = flattened(new_raw), flattened(old_raw).float()
    old_boxes = anchor_boxes(old_raw, layout).float()
    old_width = old.shape[-1]
    terms = []
    for image_new, image_old, boxes in zip(new, old, old_boxes):
        scores, classes = confidence(image_old)
        selected = elastic_selection(scores, std_factor).nonzero().squeeze(1)
        if not len(selected):
            terms.append(image_new.sum() * 0.0)
            continue
        classification = F.mse_loss(image_new[selected, 4:old_width], image_old[selected, 4:])
        kept = selected[batched_nms(boxes[selected], scores[selected], classes[selected], nms_iou)]
        box = F.mse_loss(image_new[kept, :4], image_old[kept, :4])
        terms.append(classification + box)
    return torch.stack(terms).mean()


class DetectionDistillationPlugin(PreviousModelPlugin):
    """ERD-style distillation of the previous detector's selected responses."""

    method = "det_distill"

    def __init__(self, weight: float = 1.0, std_factor: float = 2.0, nms_iou: float = 0.005) -> None:
        super().__init__()
        self.weight, self.std_factor, self.nms_iou = weight, std_factor, nms_iou

    def before_backward(self, strategy, **kwargs) -> None:
        if self.old_classes(strategy) and self.weight:
            old = self.previous_output(strategy)
            strategy.loss += self.weight * response_distillation(strategy.mb_output, old, strategy.model.anchor_layout,
                                                                 self.std_factor, self.nms_iou)


@dataclass(frozen=True)
class DetectionDistillationSettings:
    """Detection distillation's hyperparameters, ``strategy.det_distill.<key>``."""

    weight: float = setting(1.0, NON_NEGATIVE, help="weight of the distillation", search=(0.5, 1.0, 2.0))
    std_factor: float = setting(2.0, NON_NEGATIVE, help="anchors above the mean plus this many standard deviations "
                                                        "of the previous model's confidence are distilled")
    nms_iou: float = setting(0.005, FRACTION, help="IoU of the NMS that picks the boxes distilled")


register("det_distill", settings=DetectionDistillationSettings, acts_on=("loss",),
         kinds=("detection",))(DetectionDistillationPlugin)
