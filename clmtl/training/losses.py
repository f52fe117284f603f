"""Per-kind training losses and the dispatcher that picks one from the model output's structure.

The dispatcher is what the template and every plugin (EWC's Fisher, replay, distillation) call as
``criterion(output, target)``, so it must need nothing but the output and the target.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import complete_box_iou_loss

from clmtl.models.anchors import DEFAULT_IMAGE_SIZE, AnchorLayout
from clmtl.models.decode import box_from_raw
from clmtl.stream.tasks import CLASSIFICATION, DETECTION, IGNORE_INDEX, SEGMENTATION

ANCHOR_IOU_THRESHOLD = 0.25
"""A ground truth box is assigned to every anchor whose (w, h) IoU with it exceeds this (plus its best anchor)."""

OBJ_IOU_MIX = 0.5
"""Objectness target of a positive: ``1 - mix + mix * IoU`` (YOLOv5's ``gr``); half of it rewards good boxes,
half keeps the signal strong while early boxes are still poor."""

LEVEL_BALANCE = (4.0, 1.0, 0.4)
"""Objectness weight per level (fine to coarse), YOLOv5's: fine levels have many more, mostly empty, cells."""

BOX_WEIGHT, OBJ_WEIGHT, CLS_WEIGHT = 2.5, 2.0, 0.3125
"""YOLOv5's loss gains (0.05, 1.0 at 640 px, 0.5 / 80 classes) at 128 px, x50 so the total starts near 5-10."""


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy over ``[B, C, H, W]`` logits, ignoring label 255; zero if every pixel is ignored."""
    if not (target != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # keeps the graph; cross_entropy would return NaN
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def classification_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``[B, C]`` logits against ``[B]`` class indices."""
    return F.cross_entropy(logits, target)


def detection_loss_terms(
    raw: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], layout: AnchorLayout
) -> dict[str, torch.Tensor]:
    """The unweighted box (1 - CIoU), objectness (BCE) and class (BCE) terms of the YOLO loss.

    Assignment (YOLOv5-style, vectorised): a ground truth box is positive for every anchor whose
    (w, h) IoU with it exceeds ``ANCHOR_IOU_THRESHOLD`` and for its best anchor over all levels, at the
    cell holding its center and at the two neighbouring cells nearest to that center (the box formula
    lets a cell predict centers up to half a cell outside it). Three cells and several anchors per box
    give many more positives than YOLOv3's single one, which is what makes training fast.
    The objectness target of a positive mixes 1 and its (detached) CIoU with the ground truth
    (``OBJ_IOU_MIX``); of all other anchors it is 0.
    ``box`` and ``cls`` are summed over levels of per-positive means; ``obj`` sums level means
    weighted by ``LEVEL_BALANCE``.
    """
    ref = raw[0]
    batch = ref.shape[0]
    gt_boxes = torch.cat([t["boxes"] for t in targets]).to(ref.device, ref.dtype).reshape(-1, 4)
    gt_labels = torch.cat([t["labels"] for t in targets]).to(ref.device, torch.long)
    gt_image = torch.repeat_interleave(
        torch.arange(batch, device=ref.device), torch.tensor([len(t["boxes"]) for t in targets], device=ref.device)
    )
    gt_center = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    gt_wh = gt_boxes[:, 2:] - gt_boxes[:, :2]
    anchors = torch.tensor(layout.anchors, device=ref.device, dtype=ref.dtype)  # [L, A, 2]

    matches = _match_anchors(gt_wh, anchors)  # [M, L, A]
    zero = ref.sum() * 0.0
    terms = {"box": zero, "obj": zero, "cls": zero}
    for level, (out, stride) in enumerate(zip(raw, layout.strides)):
        _, _, height, width, _ = out.shape
        box_index, anchor_index = matches[:, level].nonzero(as_tuple=True)
        cells, pair = _positive_cells(gt_center[box_index] / stride, width, height)
        box_index, anchor_index = box_index[pair], anchor_index[pair]
        image, gx, gy = gt_image[box_index], cells[:, 0], cells[:, 1]

        obj_target = torch.zeros_like(out[..., 4])
        if box_index.numel():
            pred = out[image, anchor_index, gy, gx]  # [P, 5 + C]
            boxes = box_from_raw(pred[:, :4], cells.to(ref.dtype), anchors[level, anchor_index], stride)
            box_loss = complete_box_iou_loss(boxes, gt_boxes[box_index], reduction="none")
            terms["box"] = terms["box"] + box_loss.mean()
            iou = (1 - box_loss).detach().clamp(0, 1)
            obj_target[image, anchor_index, gy, gx] = 1 - OBJ_IOU_MIX + OBJ_IOU_MIX * iou
            onehot = F.one_hot(gt_labels[box_index], pred.shape[-1] - 5).to(ref.dtype)
            cls_bce = F.binary_cross_entropy_with_logits(pred[:, 5:], onehot, reduction="none")
            terms["cls"] = terms["cls"] + cls_bce.sum(dim=1).mean()
        obj_bce = F.binary_cross_entropy_with_logits(out[..., 4], obj_target)
        terms["obj"] = terms["obj"] + LEVEL_BALANCE[level] * obj_bce
    return terms


def detection_loss(
    raw: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], layout: AnchorLayout
) -> torch.Tensor:
    """Weighted sum of the detection terms; objectness is scaled with image area as YOLOv5 does."""
    terms = detection_loss_terms(raw, targets, layout)
    area = raw[0].shape[2] * raw[0].shape[3] * layout.strides[0] ** 2
    obj_weight = OBJ_WEIGHT * area / DEFAULT_IMAGE_SIZE**2
    return BOX_WEIGHT * terms["box"] + obj_weight * terms["obj"] + CLS_WEIGHT * terms["cls"]


def _match_anchors(gt_wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Boolean ``[M, L, A]``: anchors with (w, h) IoU above the threshold, plus each box's best anchor."""
    inter = torch.minimum(gt_wh[:, None, None], anchors[None]).prod(-1)
    iou = inter / (gt_wh.prod(-1)[:, None, None] + anchors.prod(-1)[None] - inter)
    best = F.one_hot(iou.flatten(1).argmax(1), anchors[..., 0].numel()).view_as(iou).bool()
    return (iou > ANCHOR_IOU_THRESHOLD) | best


def _positive_cells(center: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For centers ``[P, 2]`` in grid units: the cells ``[Q, 2]`` (x, y) that predict them and, per cell, its center.

    Each center gets its own cell plus the horizontal and vertical neighbour on the side nearer to it
    (when that neighbour is inside the grid).
    """
    size = center.new_tensor([width, height])
    frac = center % 1
    use = torch.stack(
        [
            torch.ones_like(center[:, 0], dtype=torch.bool),
            (frac[:, 0] < 0.5) & (center[:, 0] > 1),  # left
            (frac[:, 1] < 0.5) & (center[:, 1] > 1),  # up
            (frac[:, 0] > 0.5) & (center[:, 0] < width - 1),  # right
            (frac[:, 1] > 0.5) & (center[:, 1] < height - 1),  # down
        ]
    )  # [5, P]
    offsets = center.new_tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]])  # cell = center's cell - offset
    which, pair = use.nonzero(as_tuple=True)
    cells = (center[pair].floor() - offsets[which]).long()
    cells = torch.minimum(cells.clamp(min=0), size.long() - 1)
    return cells, pair


def output_kind(output: torch.Tensor | list[torch.Tensor]) -> str:
    """The task kind of a model output, by structure: a list is detection, 4-D segmentation, 2-D classification."""
    if isinstance(output, (list, tuple)):
        return DETECTION
    if output.dim() == 4:
        return SEGMENTATION
    if output.dim() == 2:
        return CLASSIFICATION
    raise ValueError(f"cannot tell the task from an output of shape {tuple(output.shape)}")


class MultiTaskLoss(torch.nn.Module):
    """``loss(output, target)`` for any task: a list is detection, 4-D segmentation, 2-D classification."""

    def __init__(self, layout: AnchorLayout) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, output, target) -> torch.Tensor:
        kind = output_kind(output)
        if kind == DETECTION:
            return detection_loss(list(output), list(target), self.layout)
        if kind == SEGMENTATION:
            return segmentation_loss(output, target)
        return classification_loss(output, target)
