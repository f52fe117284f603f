"""Joint image + target augmentation through torchvision.transforms.v2, for every target kind.

Targets are wrapped as tv_tensors (``Mask`` for label maps, ``BoundingBoxes`` for boxes), so geometry
follows the image; class ids pass through untouched.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from clmtl.tasks import DETECTION, SEGMENTATION


class JointTransform(Dataset):
    """``dataset`` with ``transform`` applied to each ``(image, target)`` pair of the given task kind."""

    def __init__(self, dataset: Dataset, kind: str, transform: v2.Transform) -> None:
        self.dataset = dataset
        self.kind = kind
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        image, target = self.dataset[i]
        image = tv_tensors.Image(image)
        if self.kind == SEGMENTATION:
            image, mask = self.transform(image, tv_tensors.Mask(target))
            return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        if self.kind == DETECTION:
            boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
            image, boxes = self.transform(image, boxes)
            return image.as_subclass(torch.Tensor), {**target, "boxes": boxes.as_subclass(torch.Tensor)}
        return self.transform(image).as_subclass(torch.Tensor), target


def train_augmentation(dataset: Dataset, kind: str, hflip: float) -> Dataset:
    """Training-time augmentation (a random horizontal flip with probability ``hflip``); identity when 0."""
    if hflip == 0:
        return dataset
    return JointTransform(dataset, kind, v2.RandomHorizontalFlip(p=hflip))
