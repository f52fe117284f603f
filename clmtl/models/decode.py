"""Turning raw model outputs into predictions: ``predict`` for any task kind; for detection the box formula (shared
with the loss) and NMS decoding.

Raw output per level: ``[B, A, H, W, 5 + C]`` = (tx, ty, tw, th, objectness, class logits), all pre-activation.
Box formula (YOLOv5's bounded variant of YOLOv3, so early predictions cannot explode):

    center = (2 * sigmoid(tx, ty) - 0.5 + cell) * stride     # may reach half a cell beyond its own cell
    size   = (2 * sigmoid(tw, th)) ** 2 * anchor             # between 0 and 4x the anchor
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torchvision.ops import batched_nms, clip_boxes_to_image

from clmtl.models.anchors import AnchorLayout
from clmtl.stream.tasks import DETECTION

PRE_NMS_TOP_K = 3000
"""Per image, only the best-scoring (box, class) candidates go to NMS, which bounds its cost at low thresholds."""


def box_from_raw(t: torch.Tensor, cell: torch.Tensor, anchor_wh: torch.Tensor, stride: float) -> torch.Tensor:
    """Boxes ``[..., 4]`` xyxy in input pixels from raw ``t = (tx, ty, tw, th)``, cell (x, y) indices and anchor (w, h).

    The single definition of the box formula: the loss and the decoder both call it.
    """
    center = (t[..., :2].sigmoid() * 2 - 0.5 + cell) * stride
    size = (t[..., 2:4].sigmoid() * 2) ** 2 * anchor_wh
    return torch.cat([center - size / 2, center + size / 2], dim=-1)


@lru_cache(maxsize=32)
def level_grid(
    anchors: tuple[tuple[float, float], ...], height: int, width: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell indices ``[1, 1, H, W, 2]`` (x, y) and anchors ``[1, A, 1, 1, 2]`` of one level, cached across calls."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype), torch.arange(width, device=device, dtype=dtype), indexing="ij"
    )
    cell = torch.stack([xs, ys], dim=-1).view(1, 1, height, width, 2)
    anchor_wh = torch.tensor(anchors, device=device, dtype=dtype).view(1, len(anchors), 1, 1, 2)
    return cell, anchor_wh


def predict(output: Any, kind: str, decode: Callable[[list[torch.Tensor]], list[dict]]) -> Any:
    """What a task predicts from its raw output: per-image box dictionaries (detection, through ``decode``), a class
    map ``[B, H, W]`` (segmentation) or class ids ``[B]`` (classification)."""
    return decode(output) if kind == DETECTION else class_indices(output)


def class_indices(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``logits.argmax(dim)`` computed as ``logits.max(dim).indices``: the same indices (the first maximum), but on CPU
    argmax over a non-innermost dim (the classes of NCHW logits) is many times slower (docs/speed.md)."""
    return logits.max(dim).indices


@torch.no_grad()
def decode_detections(
    raw: list[torch.Tensor],
    layout: AnchorLayout,
    score_threshold: float = 0.01,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """Per image, ``{"boxes": [K, 4] xyxy, "scores": [K], "labels": [K]}`` after class-wise NMS.

    Scores are per class: ``sigmoid(objectness) * sigmoid(class logit)``, so one box may appear with
    several labels (as YOLOv5's multi-label evaluation does), which helps mAP when classes are confusable.
    Boxes are clipped to the input image, whose size is the finest level's grid times its stride.
    """
    boxes, scores = [], []
    for level, (out, stride) in enumerate(zip(raw, layout.strides)):
        b, _, h, w, _ = out.shape
        cell, anchor_wh = level_grid(layout.anchors[level], h, w, out.device, out.dtype)
        boxes.append(box_from_raw(out[..., :4], cell, anchor_wh, stride).reshape(b, -1, 4))
        scores.append((out[..., 4:5].sigmoid() * out[..., 5:].sigmoid()).reshape(b, -1, out.shape[-1] - 5))
    boxes, scores = torch.cat(boxes, dim=1), torch.cat(scores, dim=1)
    image_size = (raw[0].shape[2] * layout.strides[0], raw[0].shape[3] * layout.strides[0])
    boxes = clip_boxes_to_image(boxes, image_size)

    num_classes = scores.shape[-1]
    results = []
    for image_boxes, image_scores in zip(boxes, scores):
        flat = image_scores.flatten()
        top, index = flat.topk(min(PRE_NMS_TOP_K, flat.numel()))
        keep = top > score_threshold
        top, index = top[keep], index[keep]
        candidate_boxes, labels = image_boxes[index // num_classes], index % num_classes
        kept = batched_nms(candidate_boxes, top, labels, iou_threshold)[:max_detections]
        results.append({"boxes": candidate_boxes[kept], "scores": top[kept], "labels": labels[kept]})
    return results
